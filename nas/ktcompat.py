"""KerasTuner internals that make a search's state atomic, checked against keras-tuner 1.4.8.

KerasTuner 1.4.8 writes `oracle.json`, `trial.json` and `tuner0.json` with a plain
`open("w")` (`keras_tuner.src.utils.save_json`) and a trial's best-epoch checkpoint with
`model.save_weights` straight onto the old one (`keras_tuner.src.engine.tuner_utils.
SaveBestEpoch`): a kill -9 during a write leaves half a file. Here each is replaced by a
write aside and a rename (`nas.state.write_atomic`), and a state that is unreadable
anyway becomes a `nas.state.StateError` rather than a `JSONDecodeError`.

`rebuild` gives a fresh oracle the history of a search from MLflow's trial runs.

The private names used (pinned version: setup.cfg): `Oracle._get_oracle_fname`,
`Oracle._get_trial_dir`, `Oracle._save_trial`, `Oracle._project_dir`,
`Oracle._set_project_dir`, `Oracle._record_values`, `Oracle.ongoing_trials`,
`Oracle._retry_queue`, `Oracle.start_order`, `Oracle.end_order`,
`BaseTuner._get_tuner_fname`, `BaseTuner._is_worker`, `tuner_utils.SaveBestEpoch`, its
`_save_model` and `best_value` (read and restored by `nas.tuning` for a resumed trial).
"""

from __future__ import annotations

import glob
import json
import os

from keras_tuner.src.engine import trial as trial_module
from keras_tuner.src.engine import tuner_utils

from nas.state import StateError, read_json, write_atomic

CHECKED_AGAINST = "1.4.8"


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
        if found["status"] == trial_module.TrialStatus.RUNNING:
            oracle._retry_queue.append(trial.trial_id)
        else:
            oracle.end_order.append(trial.trial_id)
        oracle._save_trial(trial)
    oracle.save()
