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

None of KerasTuner's own distributed mode (`keras_tuner.src.distribute`, its gRPC chief
and workers) is used: a search scales out on Ray (`nas.scaleout`), whose tasks get their
trials pickled, not as KerasTuner's protos.

The private names used here: `Oracle.ongoing_trials`, `Oracle._retry_queue`,
`Oracle.start_order`, `Oracle.end_order`, `Oracle.tuner_ids`, `Oracle._seed_state`,
`Oracle._tried_so_far`, `Oracle._compute_values_hash`, `Oracle._duplicate`,
`Oracle._random_values`, `Oracle._record_values`, `Oracle._save_trial`,
`Oracle._get_trial_dir`, `Oracle._get_oracle_fname`, `Oracle._project_dir`,
`Oracle._set_project_dir`, `BayesianOptimizationOracle._random_populate_space`,
`BaseTuner._get_tuner_fname`, `tuner_utils.SaveBestEpoch` with its `_save_model` and
`best_value`, and the text of the RuntimeError `Oracle._check_consecutive_failures` raises
(`too_many_failures`).

Overridden private methods: in nas/oracles.py, `Oracle._random_values` (`_Guard`) and
`GridSearchOracle._get_next_combination` (`_GridOracle`); in nas/tuning.py,
`BaseTuner._try_build` (which calls `Tuner._build_hypermodel`) and
`BaseTuner._populate_initial_space` (`NasTuner`).
"""

from __future__ import annotations

import glob
import json
import os

import keras_tuner as kt
from keras_tuner.engine import trial as trial_module
from keras_tuner.src.engine import tuner_utils

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
        self.oracle.save()
        write_atomic(self._get_tuner_fname(), json.dumps(self.get_state()))

    def reload(self):
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


def too_many_failures(error: BaseException) -> bool:
    """Whether `error` is KerasTuner's end of a search whose trials failed too often in a
    row: 1.4.8's `Oracle._check_consecutive_failures` raises a plain RuntimeError("Number of
    consecutive failures exceeded the limit of N.") from `end_trial`."""
    return isinstance(error, RuntimeError) and "consecutive failures" in str(error)
