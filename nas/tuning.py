"""The Tuner that runs the trials the oracle (`nas.oracles`) proposes, and its callbacks.

The oracle decides, the tuner runs: a trial's candidate is built (`CandidateModel`),
trained, stopped early when it is unpromising (`MedianStopping`, `early_stopping`) and
saved each epoch so an interrupted trial resumes there (`Resume`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt

from nas import funnel, ktcompat, tfcompat, tracking
from nas.architecture import Architecture, Rejection
from nas.models import build_model
from nas.specs import SearchSpace
from nas.state import StateError, read_json, write_atomic

__all__ = ["CandidateModel", "CosineDecay", "Deadline", "NasTuner", "MedianStopping",
           "early_stopping", "inherit", "stopping_rule", "trained_model"]

class CandidateModel(kt.HyperModel):
    """Builds the candidate a trial's values pick, and times its `fit`."""

    def __init__(self, space: SearchSpace, input_shape, num_classes: int, pixel_scale: float,
                 jit_compile: bool | str = "auto", mixed_precision: bool = False,
                 augment: tuple = (), label_smoothing: float = 0.0):
        super().__init__(name="candidate")
        self.space = space
        # the pipeline's `train.augment`, as the values of a space's augment knobs
        self.augment = {f"augment/{name}": value for name, value in augment}
        self.label_smoothing = label_smoothing  # the pipeline's `train.label_smoothing`
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.pixel_scale = pixel_scale
        self.jit_compile = jit_compile
        self.mixed_precision = mixed_precision
        self.last_fit_seconds = 0.0
        self.resume: Resume | None = None  # set by NasTuner for the trial it runs

    def architecture(self, values: dict) -> Architecture:
        return Architecture.from_values(self.space, self._augmented(values), self.input_shape,
                                        self.num_classes, self.pixel_scale)

    def _augmented(self, values: dict) -> dict:
        """`values` with the pipeline's augmentations when the trial trains on all the
        training data and the space chooses none itself. A funnel's looks (a few epochs
        on a share of the data, `nas.funnel`) train without: augmentation pays only over
        many epochs, and would rank the looks by how fast they learn despite it."""
        if (not self.augment or funnel.fidelity(values)[0] < 1
                or any(name.startswith("augment/") for name in values)):
            return values
        return {**values, **self.augment}

    def check(self, values: dict, constraints, latency=None) -> Rejection | None:
        """Why the candidate `values` pick must not be trained: impossible, over a budget
        of `constraints`, or predicted over the latency budget by `latency` (a
        `nas.latency_table.LatencyGuard`, asked last: it may measure layers); or None."""
        architecture = self.architecture(values)
        rejection = architecture.rejection(constraints)
        if rejection is None and latency is not None:
            return latency.rejection(architecture)
        return rejection

    def build(self, hp):
        architecture = self.architecture(hp.values)
        if architecture.impossible:
            raise kt.errors.FailedTrialError(architecture.impossible)
        return build_model(architecture, jit_compile=self.jit_compile,
                           mixed_precision=self.mixed_precision,
                           label_smoothing=self.label_smoothing)

    def fit(self, hp, model, *args, **kwargs):
        """`model.fit`, timed; continued from the trial's last finished epoch when an
        earlier process left one (`Resume`), and saving each epoch for the next."""
        resume = self.resume
        prior = resume.prior if resume is not None else None
        if resume is not None:
            callbacks = list(kwargs.get("callbacks") or [])
            if prior is not None:
                model.optimizer.build(model.trainable_variables)  # its state is saved too
                model.load_weights(str(resume.folder / prior["weights"]))
                kwargs["initial_epoch"] = prior["epoch"] + 1
                _restore(callbacks, prior["callbacks"])
            callbacks.append(_EpochState(resume, hp.values, callbacks, prior))
            kwargs["callbacks"] = callbacks
        start = time.perf_counter()
        try:
            history = model.fit(*args, **kwargs)
        finally:
            self.last_fit_seconds = time.perf_counter() - start
        if prior is not None:  # the whole trial's curves, as if it had never stopped
            earlier = prior["history"]
            history.history = {k: earlier.get(k, []) + list(history.history.get(k, []))
                               for k in {*earlier, *history.history}}
            history.epoch = list(range(max(map(len, history.history.values()), default=0)))
        return history


# --- a trial resumes at its last finished epoch (issue 12) ------------------------------

RESUME_STATE = "resume.json"  # in a trial's folder: its last saved epoch, see `Resume`
# An epoch is saved once the training since the last save took this many times what that
# save took: at most 1/20 (5%) of a trial's time goes to saving. Where an epoch takes 20
# saves or more (any dataset bigger than the bundled digits), that is every epoch.
RESUME_SAVE_FACTOR = 20


class Resume:
    """Where a trial keeps what continuing it needs, and what an earlier process left.

    After an epoch `_EpochState` writes the model's weights and optimizer state
    (`resume-<epoch>.weights.h5`), then `resume.json`: that epoch, the file's name, the
    trial's values, its MLflow run, its curves so far and the state of its callbacks
    (early stopping's wait and best, the median rule's curve, KerasTuner's best value).
    Each is replaced atomically and the json is written last, so it always names a whole
    weights file. `prior` is that state when it belongs to this very candidate.
    """

    def __init__(self, folder: Path, run_id: Callable[[], str | None], values: dict):
        self.folder, self.run_id = Path(folder), run_id
        self.prior = None
        try:
            state = read_json(self.folder / RESUME_STATE)
        except (FileNotFoundError, StateError):
            return
        if (state.get("values") == json.loads(json.dumps(values))
                and (self.folder / state.get("weights", "")).is_file()):
            self.prior = state

    def clear(self) -> None:
        """The trial has ended: nothing to resume."""
        for path in [self.folder / RESUME_STATE, *self.folder.glob("resume-*.weights.h5")]:
            path.unlink(missing_ok=True)


class _EpochState(keras.callbacks.Callback):
    """Saves, after an epoch, what continuing the trial from there needs (`Resume`): every
    epoch that is long against a save, else every few (`RESUME_SAVE_FACTOR`).

    Runs after every other callback of the fit (KerasTuner's checkpoint included)."""

    def __init__(self, resume: Resume, values: dict, callbacks: list, prior: dict | None):
        super().__init__()
        self.resume, self.values, self.others = resume, dict(values), callbacks
        self.history = {k: list(v) for k, v in (prior or {}).get("history", {}).items()}
        self.run_id = (prior or {}).get("run_id")
        self._saved_at, self._cost = time.perf_counter(), 0.0

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        start = time.perf_counter()
        if start - self._saved_at < RESUME_SAVE_FACTOR * self._cost:
            return
        self._save(epoch)
        self._saved_at = time.perf_counter()
        self._cost = self._saved_at - start

    def _save(self, epoch: int) -> None:
        self.run_id = self.resume.run_id() or self.run_id
        folder, name = self.resume.folder, f"resume-{epoch}.weights.h5"
        aside = folder / f".resume.{os.getpid()}.tmp.weights.h5"
        self.model.save_weights(str(aside))
        os.replace(aside, folder / name)
        write_atomic(folder / RESUME_STATE, json.dumps({
            "epoch": epoch, "weights": name, "values": self.values, "run_id": self.run_id,
            "history": self.history, "callbacks": _callback_states(self.others)}))
        for older in folder.glob("resume-*.weights.h5"):
            if older.name != name:
                older.unlink(missing_ok=True)


def _callback_states(callbacks: list) -> dict:
    states = {}
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.EarlyStopping):
            states["early_stopping"] = {"wait": callback.wait, "best": callback.best,
                                        "best_epoch": callback.best_epoch}
        elif isinstance(callback, ktcompat.SaveBestEpoch):
            states["best_value"] = callback.best_value
        elif isinstance(getattr(callback, "curve", None), list):
            states["curve"] = list(callback.curve)
    return states


def _restore(callbacks: list, states: dict) -> None:
    for callback in callbacks:
        if isinstance(callback, _EarlyStopping) and "early_stopping" in states:
            callback.restored = states["early_stopping"]
        elif isinstance(callback, ktcompat.SaveBestEpoch) and "best_value" in states:
            callback.best_value = states["best_value"]
        elif isinstance(getattr(callback, "curve", None), list) and "curve" in states:
            callback.curve[:] = states["curve"]


class _EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping, carrying a resumed trial's wait and best over."""

    restored: dict | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.restored:
            self.wait = self.restored["wait"]
            self.best = self.restored["best"]
            self.best_epoch = self.restored["best_epoch"]


class NasTuner(ktcompat.AtomicTuner, kt.Hyperband):
    """Runs trials for any of the guarded oracles and reports each one through `hooks`.

    It derives from `keras_tuner.Hyperband` only for Hyperband's `run_trial` and
    `_build_hypermodel`, which act on the `tuner/*` values the Hyperband oracle sets
    and do nothing for the other oracles; `__init__` skips Hyperband's own, which
    would create a second, unguarded oracle.

    `hooks` receives `trial_started(trial, architecture)`, `batch_ended()`,
    `epoch_ended(trial, epoch, logs)` and `trial_ended(trial, architecture, history,
    fit_seconds, error)`.

    A performance trick, off unless asked for (`nas.assembly` turns it on):
    `forget_gradients`, the custom gradients a trial leaves in TensorFlow's registry
    dropped once it has ended (`nas.tfcompat.forget_custom_gradients`).
    """

    def __init__(self, oracle, hypermodel: CandidateModel, hooks,
                 stopping: MedianStopping | None = None, forget_gradients: bool = False,
                 latency: Callable | None = None, **kwargs):
        from nas import tracking  # the MLflow side, loaded by now: imported once, not per batch

        ktcompat.install()  # atomic checkpoints
        self._tracking = tracking
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)
        self.hooks = hooks
        self.stopping = stopping
        self.latency = latency  # model -> nas.latency.Latency; None: not measured
        self._epoch = 0
        self._forget_gradients = forget_gradients

    def _try_build(self, hp):
        # KerasTuner's own calls `keras.backend.clear_session()` and collects garbage twice
        # before every build, ~60 ms a trial here. Instead the last trial's model and
        # graphs (nothing refers to them any more) are collected once. The session is not
        # cleared: that only resets Keras's name counters and global settings and empties
        # TensorFlow's kernel cache (every build ~15 ms slower); it frees nothing the
        # collection does not. The collection runs here, in the thread that trains. It once
        # ran in a background thread while the next trial trained (10-20 ms saved a
        # trial); that was removed when processes crashed, a crash later traced mostly to
        # TensorFlow's oneDNN kernels on one space (bench/README.md, "Garbage collected in
        # the background"), and freeing TensorFlow's objects beside a running training
        # step is not worth 10-20 ms.
        gc.collect()
        return self._build_hypermodel(hp)

    def _populate_initial_space(self):
        # The space is declared up front (see `nas.oracles.declare`); KerasTuner's default
        # would build throwaway models to discover it.
        pass

    def run_trial(self, trial, *args, **kwargs):
        values = trial.hyperparameters.values
        architecture = self.hypermodel.architecture(values)
        args, kwargs = self._fidelity(values, args, kwargs)
        # Hyperband's trials continue earlier trials by design (tuner/initial_epoch).
        resume = (None if "tuner/epochs" in values else
                  Resume(self.get_trial_dir(trial.trial_id), self.hooks.current_run_id, values))
        prior = resume.prior if resume is not None else None
        self.hooks.trial_started(trial, architecture, resumed=prior)
        self.hypermodel.last_fit_seconds = 0.0
        self.hypermodel.resume = resume
        registered = tfcompat.custom_gradients() if self._forget_gradients else None
        if self.stopping is not None and not _full_training(values):
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), self.stopping.callback()]
        try:
            histories = super().run_trial(trial, *args, **kwargs)
        except BaseException as error:
            if resume is not None and not isinstance(error, (KeyboardInterrupt,
                                                             _interruptions())):
                resume.clear()  # failed: it is not continued, it is over
            self.hooks.trial_ended(trial, architecture, None, self.hypermodel.last_fit_seconds,
                                   error)
            raise
        finally:
            self.hypermodel.resume = None
            if registered is not None:
                tfcompat.forget_custom_gradients(registered)
        if resume is not None:
            resume.clear()
        self.hooks.trial_ended(trial, architecture, histories[-1].history,
                               self.hypermodel.last_fit_seconds, None,
                               *self._latency(architecture))
        return histories

    def _latency(self, architecture: Architecture) -> tuple[dict, dict]:
        """(metrics, tags) of the trial's measured latency (`latency`, `nas.latency`), on
        its architecture as served, freshly built (weights do not change it). One that
        cannot be measured (a layer TFLite cannot convert) is a tag, not a failed trial."""
        if self.latency is None:
            return {}, {}
        try:
            model = build_model(architecture.for_serving(), jit_compile=False)
            return self.latency(model).metrics(), {}
        except Exception as error:
            message = f"{error.__class__.__name__}: {error}".strip().splitlines()[0][:500]
            return {}, {tracking.TAG_LATENCY_ERROR: message}

    def _fidelity(self, values: dict, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The fit's arguments for a trial of a funnel (`nas.funnel`): a look trains on its
        share of the training data; its epochs are the trial's, over which the learning
        rate decays, within the time the search has left (`CosineDecay`); a full training
        is not stopped early but by that time."""
        share, epochs = funnel.fidelity(values)
        left = (self.oracle.seconds_left(values) if hasattr(self.oracle, "seconds_left")
                else None)
        if epochs is None:  # not a funnel's: its epochs, but none past the time limit
            if left is not None:
                kwargs = {**kwargs, "callbacks": [*kwargs.get("callbacks", []),
                                                  Deadline(left)]}
            return args, kwargs
        if share < 1:
            args = (self.shares(share), *args[1:])
        callbacks = [c for c in kwargs.get("callbacks", [])
                     if not (_full_training(values)
                             and isinstance(c, keras.callbacks.EarlyStopping))]
        callbacks.append(CosineDecay(values["learning_rate"], epochs, left))
        return args, {**kwargs, "epochs": epochs, "callbacks": callbacks}

    def _build_hypermodel(self, hp):
        model = super()._build_hypermodel(hp)
        parent = hp.values.get(funnel.PARENT)
        if parent:  # a child starts from its parent's weights wherever a layer is the same
            inherit(model, self._parent_model(parent))
        return model

    def _parent_model(self, trial_id: str):
        """The model of trial `trial_id` at its best epoch, or None when it or its weights
        are gone (a lost working folder: the child then starts afresh)."""
        try:
            values = self.oracle.get_trial(trial_id).hyperparameters.values
        except (KeyError, AttributeError):
            return None
        return trained_model(self.hypermodel, values,
                             Path(self.get_trial_dir(trial_id)) / tracking.WEIGHTS)

    def on_epoch_begin(self, trial, model, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, trial, model, batch, logs=None):
        if self._tracking.pending_interruption is not None:  # a signal's raise was swallowed
            raise self._tracking.pending_interruption
        self.hooks.batch_ended()
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise kt.errors.FailedTrialError(
                f"the loss became {float(loss)} at epoch {self._epoch + 1}, batch {batch + 1}"
            )

    def on_epoch_end(self, trial, model, epoch, logs=None):
        self.hooks.epoch_ended(trial, epoch, logs or {})


def _full_training(values: dict) -> bool:
    """Whether a trial is a funnel's full training, which the funnel sized to its time."""
    share, epochs = funnel.fidelity(values)
    return epochs is not None and share >= 1


def trained_model(hypermodel: CandidateModel, values: dict, checkpoint: Path):
    """The candidate `values` picks, with the weights saved in `checkpoint` (its optimizer's
    state left out), or None when the file is gone."""
    if not Path(checkpoint).is_file():
        return None
    model = build_model(hypermodel.architecture(values), jit_compile=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(checkpoint))
    return model


def inherit(model, parent) -> list[str]:
    """Start `model` from `parent`'s weights wherever a layer of the same name holds
    weights of the same shapes (Lamarckian inheritance, as in network morphism): a layer
    whose shape changed, or that the parent lacks, keeps its fresh weights. Returns the
    names of the layers inherited (none when `parent` is None)."""
    if parent is None:
        return []
    names = {layer.name for layer in parent.layers}
    inherited = []
    for layer in model.layers:
        mine = layer.get_weights()
        if not mine or layer.name not in names:
            continue
        theirs = parent.get_layer(layer.name).get_weights()
        if len(theirs) == len(mine) and all(a.shape == b.shape for a, b in zip(theirs, mine)):
            layer.set_weights(theirs)
            inherited.append(layer.name)
    return inherited


class Deadline(keras.callbacks.Callback):
    """Stops training when another epoch would not end within `seconds` (None: never),
    judged by the epochs timed so far (the first, which also traces the training step,
    only until a later one is timed)."""

    def __init__(self, seconds: float | None):
        super().__init__()
        self.end = None if seconds is None else time.monotonic() + seconds
        self._times: list[float] = []
        self._began = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self._times.append(now - self._began)
        if self.end is not None and now + self._epoch_seconds() > self.end:
            self.model.stop_training = True

    def _epoch_seconds(self) -> float:
        later = self._times[1:] or self._times
        return sum(later) / len(later)


class CosineDecay(Deadline):
    """The learning rate from `initial` down towards zero over `epochs` epochs along half a
    cosine (SGDR without restarts, Loshchilov & Hutter), set at each epoch's start, so that
    a trial given a known number of epochs converges by its end.

    With `seconds` (the time the search has left), the epochs are also made to fit it:
    once an epoch has been timed, the decay ends at the last epoch that still ends in time
    when that comes first, and training stops when another epoch would not end in time
    (`Deadline`). Epochs count from the trial's start: a resumed trial goes on where its
    rate was.
    """

    def __init__(self, initial: float, epochs: int, seconds: float | None = None):
        super().__init__(seconds)
        self.initial, self.epochs = float(initial), max(1, int(epochs))
        self.horizon = self.epochs

    def rate(self, epoch: int) -> float:
        return self.initial * 0.5 * (1 + math.cos(math.pi * min(epoch, self.horizon)
                                                  / self.horizon))

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if self.end is not None and self._times:
            fit = int((self.end - self._began) // self._epoch_seconds())
            self.horizon = max(1, min(self.epochs, epoch + fit))
        self.model.optimizer.learning_rate = self.rate(epoch)


class MedianStopping:
    """The median stopping rule (Golovin et al., Google Vizier, 2017) over a search's curves.

    A trial is stopped after epoch `e` (from `grace` epochs on) when its best objective so
    far is worse than the median, over the earlier trials that trained that long, of
    their objective's running average up to epoch `e`; at least `min_trials` such trials
    are needed. It only ever compares the validation objective, as the search does. The
    curves are those this process trained (a resumed search or a Ray worker starts anew).
    """

    def __init__(self, objective: str, direction: str, grace: int = 3, min_trials: int = 3):
        self.objective, self.direction = objective, direction
        self.grace, self.min_trials = grace, min_trials
        self.curves: list[list[float]] = []  # the objective per epoch of each ended trial

    def callback(self) -> keras.callbacks.Callback:
        """A fresh callback for one trial's fit; its curve joins the others when it ends."""
        rule = self

        class Stop(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.curve: list[float] = []  # carried over when a trial resumes

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(rule.objective)
                if value is None or value != value:
                    return
                self.curve.append(float(value))
                if rule.should_stop(self.curve):
                    self.model.stop_training = True

            def on_train_end(self, logs=None):
                if self.curve:
                    rule.curves.append(list(self.curve))

        return Stop()

    def should_stop(self, curve: list[float]) -> bool:
        epoch = len(curve)
        if epoch < self.grace:
            return False
        averages = sorted(sum(c[:epoch]) / epoch for c in self.curves if len(c) >= epoch)
        if len(averages) < self.min_trials:
            return False
        middle = len(averages) // 2
        median = (averages[middle] if len(averages) % 2
                  else (averages[middle - 1] + averages[middle]) / 2)
        best = max(curve) if self.direction == "max" else min(curve)
        return best < median if self.direction == "max" else best > median


def stopping_rule(tuner: str, objective: str, direction: str) -> MedianStopping | None:
    """The rule that stops a strategy's unpromising trials early: evolution's median rule;
    KerasTuner's own tuners run as KerasTuner runs them (Hyperband has its brackets)."""
    return MedianStopping(objective, direction) if tuner == "evolution" else None


def early_stopping(objective: str, direction: str, patience: int | None) -> list:
    """The callbacks every trial's fit gets: early stopping on the objective."""
    if not patience:
        return []
    return [_EarlyStopping(monitor=objective, mode=direction, patience=patience)]


def _interruptions() -> tuple:
    from nas.tracking import Interrupted

    return (Interrupted,)
