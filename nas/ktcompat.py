"""KerasTuner's internals, fenced: every private name of it that nas uses, checked against
keras-tuner 1.4.8 (pinned in setup.cfg).

What nas adds to KerasTuner that needs them:

- an atomic state: KerasTuner writes `oracle.json`, `trial.json` and `tuner0.json` with
  a plain `open("w")` (`keras_tuner.src.utils.save_json`) and a trial's best-epoch
  checkpoint with `model.save_weights` straight onto the old one (`tuner_utils.
  SaveBestEpoch`): a kill -9 during a write leaves half a file. Here each is written aside
  and renamed (`nas.state.write_atomic`), and a state unreadable anyway is a
  `nas.state.StateError`, not a `JSONDecodeError` (`AtomicOracle`, `AtomicTuner`,
  `install`); `rebuild` gives a fresh oracle a search's history from MLflow's trial runs.
- what the guard and the evolution oracle (`nas.oracles`) need of an oracle's bookkeeping:
  `remember_tried`, `tried`, `random_values`, `next_seed`, `random_populate_space`,
  `trials_started`, `stopped_trial`.
- a chief's oracle that knows its workers (`LostWorkers`), under KerasTuner's own lock
  (`synchronized`), and the gRPC service and client it is served by (`OracleServicer`,
  `OracleClient`, `messages`, `add_servicer`, `stub`, `CALL_TIMEOUT`, `quiet_conditions`).

The private names used here: how `keras_tuner.synchronized` (public) locks in 1.4.8 (one
lock per oracle, entered again by the thread that holds it, kept when the method raises),
`Oracle.ongoing_trials`, `Oracle._retry_queue`,
`Oracle.start_order`, `Oracle.end_order`, `Oracle.tuner_ids`, `Oracle._seed_state`,
`Oracle._tried_so_far`, `Oracle._compute_values_hash`, `Oracle._duplicate`,
`Oracle._random_values`, `Oracle._record_values`, `Oracle._save_trial`,
`Oracle._get_trial_dir`, `Oracle._get_oracle_fname`, `Oracle._project_dir`,
`Oracle._set_project_dir`, `BayesianOptimizationOracle._random_populate_space`,
`BaseTuner._get_tuner_fname`, `BaseTuner._is_worker`, `tuner_utils.SaveBestEpoch` with its
`_save_model` and `best_value`, `keras_tuner.src.protos`,
`keras_tuner.src.distribute.oracle_chief.OracleServicer`,
`keras_tuner.src.distribute.oracle_client.OracleClient` and `TIMEOUT`,
`keras_tuner.src.engine.conditions` (its `print`), and the text of the RuntimeError
`Oracle._check_consecutive_failures` raises (`too_many_failures`).

Overridden private methods: in nas/oracles.py, `Oracle._random_values` (`_Guard`) and
`GridSearchOracle._get_next_combination` (`_GridOracle`); in nas/tuning.py,
`BaseTuner._try_build` (which calls `Tuner._build_hypermodel`) and
`BaseTuner._populate_initial_space` (`NasTuner`).
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import time

import keras_tuner as kt
from keras_tuner.engine import trial as trial_module
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief, oracle_client
from keras_tuner.src.engine import conditions, tuner_utils

from nas.state import StateError, read_json, write_atomic

CHECKED_AGAINST = "1.4.8"
_STATUS = trial_module.TrialStatus


class AtomicOracle:
    """Oracle mixin: `oracle.json` and every `trial.json` replaced atomically, and read back
    without tracebacks."""

    def save(self):
        write_atomic(self._get_oracle_fname(), json.dumps(self.get_state()))

    def _save_trial(self, trial):
        folder = self._get_trial_dir(trial.trial_id)
        write_atomic(os.path.join(folder, "trial.json"), json.dumps(trial.get_state()))

    def reload(self):
        """KerasTuner's `Oracle.reload`, with unreadable files reported, not raised raw.

        Raises:
            StateError: `oracle.json` or a `trial.json` is empty, truncated or not JSON.
        """
        for fname in sorted(glob.glob(os.path.join(self._project_dir, "trial_*",
                                                   "trial.json"))):
            try:
                state = read_json(fname)  # StateError when not JSON
                trial = trial_module.Trial.from_state(state)
            except (KeyError, TypeError, AttributeError) as error:
                raise StateError(f"{fname} does not hold a KerasTuner trial "
                                 f"({error.__class__.__name__}: {error})") from None
            self.trials[trial.trial_id] = trial
        try:
            self.set_state(read_json(self._get_oracle_fname()))
        except (KeyError, TypeError) as error:
            raise StateError(f"{self._get_oracle_fname()} does not hold a KerasTuner "
                             f"oracle's state ({error.__class__.__name__}: {error})") from None
        for trial in self.ongoing_trials.values():  # as KerasTuner: sent for retry
            self._retry_queue.append(trial.trial_id)
        self.ongoing_trials = {}


class AtomicTuner:
    """Tuner mixin: `tuner0.json` replaced atomically, checkpoints too (see `install`)."""

    def save(self):
        if not self._is_worker():
            self.oracle.save()
        write_atomic(self._get_tuner_fname(), json.dumps(self.get_state()))

    def reload(self):
        if not self._is_worker():
            self.oracle.reload()
        self.set_state(read_json(self._get_tuner_fname()))


SaveBestEpoch = tuner_utils.SaveBestEpoch  # KerasTuner's own (trials use the subclass below)


class _AtomicSaveBestEpoch(SaveBestEpoch):
    """KerasTuner's best-epoch checkpoint, written aside and renamed over the last one."""

    def _save_model(self):
        if not self.filepath.endswith(".weights.h5"):
            return super()._save_model()
        aside = self.filepath[: -len(".weights.h5")] + f".{os.getpid()}.tmp.weights.h5"
        try:
            self.model.save_weights(aside)
            with open(aside, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(aside, self.filepath)
        except BaseException:
            if os.path.exists(aside):
                os.remove(aside)
            raise


def install() -> None:
    """Make KerasTuner's trial checkpoints atomic in this process (`Tuner.run_trial` looks
    `SaveBestEpoch` up in `tuner_utils` on every trial)."""
    tuner_utils.SaveBestEpoch = _AtomicSaveBestEpoch


def rebuild(oracle, trials: list[dict], directory, project_name: str) -> None:
    """Give a fresh `oracle` the history of a search whose KerasTuner state was lost.

    `trials`: one dict per trial as the tracking store holds it, with `trial_id`,
    `values` (the hyperparameters), `status` (KerasTuner's: COMPLETED, FAILED, or RUNNING
    for a trial that never ended), `score` and `best_step`. Ended trials are history, as
    if the oracle had run them; one that never ended is queued to run again, as
    KerasTuner does with the trials a dead process left running. The state is saved in
    `directory`/`project_name`.
    """
    oracle._set_project_dir(directory, project_name)
    for found in sorted(trials, key=lambda t: int(t["trial_id"])):
        hyperparameters = oracle.hyperparameters.copy()
        hyperparameters.values = dict(found["values"])
        trial = trial_module.Trial(hyperparameters=hyperparameters,
                                   trial_id=found["trial_id"], status=found["status"])
        trial.score, trial.best_step = found["score"], found["best_step"]
        oracle.trials[trial.trial_id] = trial
        oracle._record_values(trial)  # remembered as tried: never proposed again
        oracle.start_order.append(trial.trial_id)
        if found["status"] == _STATUS.RUNNING:
            oracle._retry_queue.append(trial.trial_id)
        else:
            oracle.end_order.append(trial.trial_id)
        oracle._save_trial(trial)
    oracle.save()


# --- the guard's and the evolution oracle's bookkeeping (nas.oracles) --------------------


def remember_tried(oracle, values: dict) -> None:
    """Count `values` as tried: `oracle` never proposes them again."""
    oracle._tried_so_far.add(oracle._compute_values_hash(values))


def tried(oracle, values: dict) -> bool:
    """Whether `oracle` has proposed `values` (or was told to count them as tried)."""
    return oracle._duplicate(values)


def random_values(oracle) -> dict | None:
    """KerasTuner's own random proposal (none of nas's guard), None when it finds no untried
    values."""
    return kt.Oracle._random_values(oracle)


def random_populate_space(oracle) -> dict:
    """A Bayesian oracle's random proposal, as `populate_space` returns it."""
    return oracle._random_populate_space()


def next_seed(oracle) -> int:
    """A new seed from `oracle`'s seed state, which it saves: a resumed search goes on."""
    oracle._seed_state += 1
    return oracle._seed_state


def trials_started(oracle) -> int:
    return len(oracle.start_order)


def stopped_trial(oracle, tuner_id: str):
    """A STOPPED trial, for a tuner told the search is over, which `oracle` then forgets (as
    KerasTuner's own `create_trial` does when it stops)."""
    oracle.tuner_ids.discard(tuner_id)
    return trial_module.Trial(oracle.get_space(), status=_STATUS.STOPPED)


# --- a chief's oracle: its workers, under KerasTuner's own lock -------------------------


def synchronized(method):
    """`keras_tuner.synchronized`: `method` holds the oracle's lock, the one KerasTuner's own
    `create_trial`, `update_trial` and `end_trial` hold (entered again by the thread holding
    it). Unlike KerasTuner 1.4.8's, the lock is released when `method` raises."""

    def outcome(oracle, *args, **kwargs):  # not named "end_trial": KerasTuner tests the name
        try:
            return method(oracle, *args, **kwargs), None
        except BaseException as error:
            return None, error

    locked = kt.synchronized(outcome)

    @functools.wraps(method)
    def wrapped(oracle, *args, **kwargs):
        result, error = locked(oracle, *args, **kwargs)
        if error is not None:
            raise error
        return result

    return wrapped


class LostWorkers:
    """Oracle mixin for a chief: heartbeats, a lost worker's trial handed back, the hold at
    the end.

    A worker silent for longer than the timeout, or asking for a trial while it holds one
    (it restarted), is lost: its trial goes back to KerasTuner's retry queue, or fails once
    its workers have been lost `max_losses` times (it probably kills them). Once every trial
    is handed out, idle workers are told to wait (IDLE) rather than to stop until the trials
    still running have ended: a lost trial still finds a worker. Every method that reads or
    changes the trials holds the oracle's one lock (`synchronized`), so the chief's gRPC
    threads and its watch loop see one consistent oracle. Call `set_workers` first.

    A lost worker is reported as (trial id, worker, reason), for the caller to act on.
    """

    def set_workers(self, timeout: float, linger: float, max_losses: int) -> None:
        """`timeout`: seconds of silence after which a worker is lost; `linger`: seconds of
        silence after which a worker told to stop is taken to have heard it."""
        self.worker_timeout, self.linger, self.max_losses = timeout, linger, max_losses
        self.heard: dict[str, float] = {}  # worker -> when it last called
        self.losses: collections.Counter = collections.Counter()  # trial id -> lost workers
        self.fatal: str | None = None  # why the search stopped (too many failed trials)
        self.handed_out = False  # every trial has been handed out

    def hear(self, worker: str | None) -> str | None:
        """`worker` has just called. Outside the lock: a heartbeat counts even while a long
        proposal holds it."""
        if worker:
            self.heard[worker] = time.monotonic()
        return worker

    @synchronized
    def hand_out(self, worker: str) -> tuple:
        """(the trial for `worker`, the workers lost meanwhile): a new trial or one handed
        back, STOPPED (the search is over) or IDLE (the hold: ask again later)."""
        lost = []
        if worker in self.ongoing_trials:
            lost.append(self._lose(worker, "it restarted"))
        self.hear(worker)
        trial = stopped_trial(self, worker) if self.fatal else self.create_trial(worker)
        if trial.status == _STATUS.STOPPED:
            self.handed_out = True
            if self.ongoing_trials or self._retry_queue:
                # Hold: a running trial may still lose its worker and need this one.
                self.tuner_ids.add(worker)
                trial = trial_module.Trial(self.get_space(), status=_STATUS.IDLE)
        return trial, lost

    @synchronized
    def take_result(self, trial, worker: str | None) -> tuple | None:
        """End `trial` as `worker` reports it: (the ended trial, who ran it, how many trials
        have ended); None for a late result (the trial was given to another worker)."""
        trial_id = trial.trial_id
        owner = next((w for w, t in self.ongoing_trials.items() if t.trial_id == trial_id),
                     None)
        if owner is None and trial_id in self._retry_queue:
            # Its worker was taken for lost, yet it finished: keep the result.
            self._retry_queue.remove(trial_id)
        elif (owner is None and trial_id in self.end_order) or (
                owner is not None and worker is not None and owner != worker):
            return None
        try:
            self.end_trial(trial)
        except RuntimeError as error:  # too many consecutive failed trials
            self.fatal = str(error)
            self.ongoing_trials.pop(owner, None)
        return self.trials[trial_id], worker or owner, len(self.end_order)

    @synchronized
    def take_back_silent(self) -> list:
        """Take back the trials of the workers silent for longer than the timeout; the
        workers lost."""
        now, lost = time.monotonic(), []
        for worker in list(self.ongoing_trials):
            silent = now - self.heard.get(worker, now)
            if silent > self.worker_timeout:
                lost.append(self._lose(worker, f"silent for {silent:.0f} s"))
        return lost

    @synchronized
    def all_ended(self) -> bool:
        """Every trial has ended and every worker still alive has been told to stop."""
        if not self.handed_out or self.ongoing_trials or self._retry_queue:
            return False
        now = time.monotonic()
        return all(now - self.heard.get(w, 0.0) > self.linger for w in self.tuner_ids)

    @synchronized
    def update_trial(self, trial_id, metrics, step=0):
        return super().update_trial(trial_id, metrics, step=step)

    @synchronized
    def get_trial(self, trial_id):
        return super().get_trial(trial_id)

    @synchronized
    def get_best_trials(self, num_trials=1):
        return super().get_best_trials(num_trials)

    def _lose(self, worker: str, reason: str) -> tuple:
        """Take `worker`'s trial back: to the retry queue, or failed after `max_losses`."""
        trial = self.ongoing_trials.pop(worker)
        self.tuner_ids.discard(worker)
        self.heard.pop(worker, None)
        self.losses[trial.trial_id] += 1
        if self.losses[trial.trial_id] >= self.max_losses:
            trial.status = _STATUS.FAILED
            trial.message = f"the workers running it were lost {self.max_losses} times"
            self.end_order.append(trial.trial_id)
            self._save_trial(trial)
        else:
            self._retry_queue.append(trial.trial_id)
        self.save()
        return trial.trial_id, worker, reason


# --- KerasTuner's gRPC service and client ---------------------------------------------

OracleServicer = oracle_chief.OracleServicer  # the chief's service, over its oracle
OracleClient = oracle_client.OracleClient  # a worker's oracle: calls the chief's service
CALL_TIMEOUT = oracle_client.TIMEOUT  # seconds KerasTuner's client waits for an answer


def messages():
    """The module of the service's requests and responses (`CreateTrialRequest`, ...)."""
    return protos.get_service()


def add_servicer(servicer, server) -> None:
    """Serve `servicer` (an `OracleServicer`) on the gRPC `server`."""
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)


def stub(channel):
    """A client of the oracle service over the gRPC `channel`."""
    return protos.get_service_grpc().OracleStub(channel)


def quiet_conditions() -> None:
    """Silence `Parent.to_proto`, which prints the first value of every condition: each
    trial sent over gRPC would print lines of stray numbers."""
    conditions.print = lambda *args, **kwargs: None


def too_many_failures(error: BaseException) -> bool:
    """Whether `error` is KerasTuner's end of a search whose trials failed too often in a
    row: 1.4.8's `Oracle._check_consecutive_failures` raises a plain RuntimeError("Number of
    consecutive failures exceeded the limit of N.") from `end_trial`."""
    return isinstance(error, RuntimeError) and "consecutive failures" in str(error)
