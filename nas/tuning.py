"""The space as KerasTuner hyperparameters, guarded oracles, and the Tuner that runs trials.

The oracle decides, the tuner runs. Each oracle here is KerasTuner's own with one
addition, the guard: a proposal whose `Architecture` is impossible or over budget is
rejected inside the oracle, counted, remembered as tried, and replaced by another
proposal. It never becomes a trial, never counts as a failure, and costs no graph.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt
import tensorflow as tf
from keras_tuner.engine import trial as trial_module

from nas import ktcompat, tfcompat
from nas.architecture import Architecture, Rejection, hyperparameter_specs
from nas.models import build_model
from nas.settings import TUNERS
from nas.specs import Knob, SearchSpace
from nas.state import StateError, read_json, write_atomic

__all__ = ["TUNERS", "DEFAULT_TUNER", "KNOWN_GOOD", "declare", "make_oracle", "CandidateModel",
           "NasTuner", "MedianStopping", "stopping_rule", "early_stopping"]

DEFAULT_TUNER = "evolution"
# Collects the garbage of finished trials while the next one trains (see NasTuner._try_build).
_COLLECTOR = concurrent.futures.ThreadPoolExecutor(1, "nas-gc")
# Consecutive rejected proposals after which the valid part of the space counts as used up.
MAX_REJECTIONS = 5000


def declare(space: SearchSpace) -> kt.HyperParameters:
    """The whole space as `keras_tuner.HyperParameters`, conditions included.

    Declared before the first trial, so Bayesian optimization sees every knob.
    """
    hp = kt.HyperParameters()
    for spec in hyperparameter_specs(space):
        scopes = [hp.conditional_scope(parent, list(values)) for parent, values in spec.conditions]
        for scope in scopes:
            scope.__enter__()
        try:
            _declare_knob(hp, spec.name, spec.knob)
        finally:
            for scope in reversed(scopes):
                scope.__exit__(None, None, None)
    return hp


def _declare_knob(hp: kt.HyperParameters, name: str, knob: Knob) -> None:
    if knob.is_fixed:
        hp.Fixed(name, knob.fixed)
    elif knob.choices is not None:
        if knob.type == "bool" and set(knob.choices) == {False, True}:
            hp.Boolean(name, default=knob.choices[0])
        else:
            hp.Choice(name, list(knob.choices), ordered=knob.type in ("int", "float"))
    elif knob.type == "int":
        hp.Int(name, int(knob.min), int(knob.max), step=int(knob.step) if knob.step else None,
               sampling=knob.sampling)
    else:
        hp.Float(name, knob.min, knob.max, step=knob.step, sampling=knob.sampling)


class _Guard:
    """Oracle mixin: impossible or over-budget proposals never become trials.

    `check(values)` returns why a candidate must not be trained, or None.
    """

    def set_guard(self, check: Callable[[dict], Rejection | None]) -> None:
        self._check = check
        self._on_reject = None  # called with each `Rejection` (`nas.events`)
        self.rejected = getattr(self, "rejected", 0)
        self.rejection_reasons = getattr(self, "rejection_reasons", collections.Counter())

    def on_reject(self, callback) -> None:
        """Call `callback` with each rejected candidate's `Rejection` (None: nobody)."""
        self._on_reject = callback

    def _reject(self, values: dict, reason) -> None:
        self.rejected += 1
        over = getattr(reason, "over_budget", False)  # a `nas.architecture.Rejection`
        self.rejection_reasons["over budget" if over else "impossible"] += 1
        if self._on_reject is not None:
            self._on_reject(reason)
        ktcompat.remember_tried(self, values)

    def _first_accepted(self, propose: Callable[[dict | None], dict | None]) -> dict | None:
        """The first proposal the guard accepts; None when the proposals run out.

        `propose` gets the last rejected values (None at first) and returns the next.
        """
        values = None
        for _ in range(MAX_REJECTIONS):
            values = propose(values)
            if values is None:
                return None
            reason = self._check(values)
            if reason is None:
                return values
            self._reject(values, reason)
        return None

    def _random_values(self):
        return self._first_accepted(lambda rejected: super(_Guard, self)._random_values())

    # --- the time limit: no trial is started that would not end within it ---------------

    def set_time_limit(self, seconds: float | None) -> None:
        """Stop proposing once the time spent, plus what a trial has taken on average so
        far, would pass `seconds` (None: no limit). The time spent counts across resumes."""
        self.time_limit = seconds
        self.spent = getattr(self, "spent", 0.0)
        self.durations = getattr(self, "durations", [])
        self.stopped_by_time = False
        self._since, self._started = time.monotonic(), {}

    def elapsed(self) -> float:
        return self.spent + time.monotonic() - self._since

    def next_trial_estimate(self) -> float:
        return sum(self.durations) / len(self.durations) if self.durations else 0.0

    def create_trial(self, tuner_id):
        limit = getattr(self, "time_limit", None)
        if limit is not None and self.elapsed() + self.next_trial_estimate() > limit:
            self.stopped_by_time = True
            return ktcompat.stopped_trial(self, tuner_id)
        trial = super().create_trial(tuner_id)
        if trial.status == trial_module.TrialStatus.RUNNING and hasattr(self, "_started"):
            self._started.setdefault(trial.trial_id, time.monotonic())
        return trial

    def end_trial(self, trial):
        started = getattr(self, "_started", {}).pop(trial.trial_id, None)
        if started is not None:
            self.durations.append(time.monotonic() - started)
        return super().end_trial(trial)

    def get_state(self):
        state = super().get_state()
        state["nas_rejected"] = self.rejected
        state["nas_rejection_reasons"] = dict(self.rejection_reasons)
        if hasattr(self, "_since"):
            state["nas_spent_seconds"] = self.elapsed()
            state["nas_trial_seconds"] = list(self.durations)
        return state

    def set_state(self, state):
        super().set_state(state)
        self.rejected = state.get("nas_rejected", 0)
        self.rejection_reasons = collections.Counter(state.get("nas_rejection_reasons", {}))
        self.spent = state.get("nas_spent_seconds", 0.0)
        self.durations = list(state.get("nas_trial_seconds", []))
        self._since = time.monotonic()


class _Oracle(_Guard, ktcompat.LostWorkers, ktcompat.AtomicOracle):
    """What every oracle here adds to KerasTuner's: the guard, a chief's lost workers
    (`nas.distributed`) and a state replaced atomically (`nas.ktcompat`)."""


class _RandomOracle(_Oracle, kt.oracles.RandomSearchOracle):
    pass


class _HyperbandOracle(_Oracle, kt.oracles.HyperbandOracle):
    pass


class _BayesianOracle(_Oracle, kt.oracles.BayesianOptimizationOracle):
    def populate_space(self, trial_id):
        response = super().populate_space(trial_id)
        values = response.get("values")
        if response["status"] == trial_module.TrialStatus.RUNNING and values:
            reason = self._check(values)
            if reason is not None:
                # The Gaussian process would propose the same point again: fall back
                # to a guarded random proposal.
                self._reject(values, reason)
                return ktcompat.random_populate_space(self)
        return response


class _GridOracle(_Oracle, kt.oracles.GridSearchOracle):
    def _get_next_combination(self, values):
        # Walk the grid past rejected points, each from the last one rejected.
        parent = super()._get_next_combination
        return self._first_accepted(lambda rejected: parent(rejected or values))

    def populate_space(self, trial_id):
        response = super().populate_space(trial_id)
        values = response.get("values")
        if values and self._check(values) is not None and ktcompat.trials_started(self) == 0:
            # The first grid point (all defaults) is impossible: start from the first
            # possible one instead.
            self._reject(values, self._check(values))
            values = self._get_next_combination(values)
            if values is None:
                return {"status": trial_module.TrialStatus.STOPPED, "values": None}
            response = {"status": response["status"], "values": values}
        return response


# --- evolution: known-good seeds, then one-knob moves near the best ------------------------

# Where a search of a classic CNN space starts (as AutoKeras's greedy oracle starts from
# `initial_hps`): VGG-like stages of 3x3 "same" convolutions with batch norm and max
# pooling, widening with depth, one dropout-regularized dense layer, Adam at 1e-3. Each
# is a target, snapped to the nearest value the space allows; knobs a seed leaves out,
# and stages it does not name, take the space's defaults (or the previous stage's values).
_STAGE = {"kernel_size": 3, "stride": 1, "padding": "same", "activation": "relu",
          "batch_norm": True, "pointwise": False, "pool": "max", "pool_size": 2}
_HEAD = {"reduce": "flatten", "dense_layers": 1, "dense_1/units": 128,
         "dense_1/dropout": 0.25, "optimizer": "adam", "learning_rate": 1e-3}


def _stages(*stages: dict) -> dict:
    return {f"stage_{n}/{k}": v for n, stage in enumerate(stages, 1)
            for k, v in {**_STAGE, **stage}.items()}


KNOWN_GOOD = (
    {"depth": 2, **_stages({"filters": 64, "pool": "none"}, {"filters": 64}), **_HEAD},
    {"depth": 3, **_stages({"filters": 32}, {"filters": 64}, {"filters": 128}), **_HEAD},
    {"depth": 2, **_stages({"filters": 32}, {"filters": 64}), **_HEAD},
)
TOURNAMENT = 3  # parents are the best of this many recent trials (regularized evolution)
POPULATION = 10  # ... drawn from this many of the latest finished trials
MAX_MOVES = 200  # tries at a new, untried move before falling back to a random candidate


class _EvolutionOracle(_Oracle, kt.Oracle):
    """Known-good seeds first, then regularized evolution with one-knob mutations.

    The first trials are `KNOWN_GOOD` snapped to the space. After them, each proposal
    takes a parent (the best of `TOURNAMENT` trials drawn from the latest `POPULATION`
    finished ones) and moves one knob: an ordered knob (depth, filters, a rate) one step
    up or down, any other knob to another of its values. A new stage starts as a copy of
    the one before it. Proposals already tried, impossible or over budget are skipped (the
    guard), so the search never spends a trial twice. Everything it needs (the trials, the
    seed state) is KerasTuner's own state: resuming and workers need nothing more.
    """

    def __init__(self, seeds=KNOWN_GOOD, **kwargs):
        super().__init__(**kwargs)
        self.seeds = [dict(seed) for seed in seeds]

    def populate_space(self, trial_id):
        values = self._first_accepted(lambda rejected: self._propose())
        if values is None:
            return {"status": trial_module.TrialStatus.STOPPED, "values": None}
        return {"status": trial_module.TrialStatus.RUNNING, "values": values}

    def _rng(self) -> random.Random:
        return random.Random(ktcompat.next_seed(self))

    def _propose(self) -> dict | None:
        for seed in self.seeds:
            values = self._complete(seed, lambda hp: _snap(hp, seed.get(hp.name)))
            if not ktcompat.tried(self, values) and self._check(values) is None:
                return values
        finished = [t for t in self.trials.values()
                    if t.status == trial_module.TrialStatus.COMPLETED and t.score is not None
                    and t.score == t.score]
        if not finished:
            return ktcompat.random_values(self)
        finished.sort(key=lambda t: int(re.sub(r"\D", "", t.trial_id) or 0))
        population = finished[-POPULATION:]
        for _ in range(MAX_MOVES):
            rng = self._rng()
            entrants = rng.sample(population, min(TOURNAMENT, len(population)))
            parent = (max if self.objective.direction == "max" else min)(
                entrants, key=lambda t: t.score).hyperparameters.values
            values = self._mutate(parent, rng)
            if values is not None and not ktcompat.tried(self, values):
                return values
        return ktcompat.random_values(self)

    def _complete(self, chosen: dict, pick) -> dict:
        """Values for every active knob: `pick(hp)` where it says, else a stand-in."""
        hps = kt.HyperParameters()
        for hp in self.hyperparameters.space:
            hps.merge([hp])
            if hps.is_active(hp):
                value = pick(hp)
                if value is None:  # a new stage copies the one before it
                    earlier = re.sub(r"_(\d+)/", lambda m: f"_{int(m.group(1)) - 1}/", hp.name)
                    value = hps.values.get(earlier, hp.default)
                hps.values[hp.name] = value
        return hps.values

    def _mutate(self, parent: dict, rng: random.Random) -> dict | None:
        tunable = [hp for hp in self.hyperparameters.space
                   if hp.name in parent and not isinstance(hp, kt.engine.hyperparameters.Fixed)]
        if not tunable:
            return None
        knob = rng.choice(tunable)
        moved = _move(knob, parent[knob.name], rng)
        if moved is None:
            return None
        return self._complete(parent, lambda hp: moved if hp.name == knob.name
                              else parent.get(hp.name))


def _ordered_values(hp) -> list | None:
    """A knob's values in order, when stepping up or down means something."""
    if isinstance(hp, kt.engine.hyperparameters.Choice):
        return sorted(hp.values) if hp.ordered else None
    if isinstance(hp, kt.engine.hyperparameters.Int) or (
            isinstance(hp, kt.engine.hyperparameters.Float) and hp.step is not None):
        return list(hp.values)
    return None


def _move(hp, value, rng: random.Random):
    """`value` moved one step (ordered knobs) or to another value (the others)."""
    if isinstance(hp, kt.engine.hyperparameters.Boolean):
        return not value
    if isinstance(hp, kt.engine.hyperparameters.Float) and hp.step is None:
        # A continuous rate: a factor of about 2 up or down, on its sampling's scale.
        low, high = hp.min_value, hp.max_value
        if hp.sampling == "log":
            moved = value * math.exp(rng.choice((-1, 1)) * 0.7)
        else:
            moved = value + rng.choice((-1, 1)) * (high - low) / 4
        return min(max(moved, low), high)
    ordered = _ordered_values(hp)
    if ordered is not None:
        index = min(range(len(ordered)), key=lambda i: abs(ordered[i] - value))
        steps = [i for i in (index - 1, index + 1) if 0 <= i < len(ordered)]
        return ordered[rng.choice(steps)] if steps else None
    others = [v for v in hp.values if v != value]
    return rng.choice(others) if others else None


def _snap(hp, target):
    """The value of `hp` nearest to `target` (None: no target for this knob)."""
    if target is None:
        return None
    if isinstance(hp, kt.engine.hyperparameters.Fixed):
        return hp.value
    if isinstance(hp, kt.engine.hyperparameters.Boolean):
        return bool(target)
    if isinstance(hp, kt.engine.hyperparameters.Float) and hp.step is None:
        return min(max(float(target), hp.min_value), hp.max_value)
    values = list(hp.values)
    if target in values:
        return target
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and isinstance(target, (int, float)) and not isinstance(target, bool):
        def distance(v):  # rates and widths are compared on a log scale
            return abs(math.log(v / target)) if v > 0 and target > 0 else abs(v - target)
        return min(numbers, key=distance)
    return hp.default


def make_oracle(tuner: str, hyperparameters: kt.HyperParameters, objective: kt.Objective,
                max_trials: int, seed: int, max_epochs: int, max_failures: int,
                check: Callable[[dict], Rejection | None],
                time_limit: float | None = None) -> kt.Oracle:
    """The oracle for `tuner`, guarded by `check`, proposing within `time_limit` seconds."""
    common = dict(objective=objective, hyperparameters=hyperparameters, seed=seed,
                  tune_new_entries=False, allow_new_entries=False,
                  max_consecutive_failed_trials=max_failures)
    if tuner == "evolution":
        oracle = _EvolutionOracle(max_trials=max_trials, **common)
    elif tuner == "random":
        oracle = _RandomOracle(max_trials=max_trials, **common)
    elif tuner == "bayesian":
        oracle = _BayesianOracle(max_trials=max_trials, **common)
    elif tuner == "grid":
        oracle = _GridOracle(max_trials=max_trials, **common)
    elif tuner == "hyperband":
        # Hyperband sizes its brackets from max_epochs; the trial count is capped by
        # Oracle.max_trials and enough iterations to reach it.
        oracle = _HyperbandOracle(max_epochs=max_epochs, factor=3,
                                  hyperband_iterations=max_trials, **common)
        oracle.max_trials = max_trials
    else:
        raise ValueError(f"tuner {tuner!r} is not one of {list(TUNERS)}")
    oracle.set_guard(check)
    oracle.set_time_limit(time_limit)
    return oracle


class CandidateModel(kt.HyperModel):
    """Builds the candidate a trial's values pick, and times its `fit`."""

    def __init__(self, space: SearchSpace, input_shape, num_classes: int, pixel_scale: float,
                 jit_compile: bool | str = "auto", mixed_precision: bool = False):
        super().__init__(name="candidate")
        self.space = space
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.pixel_scale = pixel_scale
        self.jit_compile = jit_compile
        self.mixed_precision = mixed_precision
        self.last_fit_seconds = 0.0
        self.resume: Resume | None = None  # set by NasTuner for the trial it runs

    def architecture(self, values: dict) -> Architecture:
        return Architecture.from_values(self.space, values, self.input_shape, self.num_classes,
                                        self.pixel_scale)

    def check(self, values: dict, constraints) -> Rejection | None:
        return self.architecture(values).rejection(constraints)

    def build(self, hp):
        architecture = self.architecture(hp.values)
        if architecture.impossible:
            raise kt.errors.FailedTrialError(architecture.impossible)
        return build_model(architecture, jit_compile=self.jit_compile,
                           mixed_precision=self.mixed_precision)

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
    """

    def __init__(self, oracle, hypermodel: CandidateModel, hooks,
                 stopping: MedianStopping | None = None, **kwargs):
        from nas import tracking  # the MLflow side, loaded by now: imported once, not per batch

        ktcompat.install()  # atomic checkpoints
        self._tracking = tracking
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)
        self.hooks = hooks
        self.stopping = stopping
        self._epoch = 0
        self._collect = False  # the last trial's garbage waits for this trial's first batch
        self._on_gpu = bool(tf.config.list_logical_devices("GPU"))

    def _try_build(self, hp):
        # KerasTuner's own calls `keras.backend.clear_session()` and collects garbage twice
        # before every build, ~60 ms a trial here. Instead the last trial's model and
        # graphs (nothing refers to them any more) are collected by a background thread
        # once this trial's first batch has trained: the main thread then mostly waits on
        # TensorFlow's kernels, so the collection overlaps the training. The session is
        # not cleared: that only resets Keras's name counters and global settings and
        # empties TensorFlow's kernel cache (every build ~15 ms slower); it frees nothing
        # the collection does not. Collected now instead: on a GPU, whose memory the last
        # model must leave before this one takes it, and after a trial that never trained
        # a batch (its garbage and its predecessor's would wait for the next trial).
        if self._collect or self._on_gpu:
            gc.collect()
            self._collect = False
        else:
            self._collect = True
        return self._build_hypermodel(hp)

    def _populate_initial_space(self):
        # The space is declared up front (see `declare`); KerasTuner's default would
        # build throwaway models to discover it.
        pass

    def run_trial(self, trial, *args, **kwargs):
        values = trial.hyperparameters.values
        architecture = self.hypermodel.architecture(values)
        # Hyperband's trials continue earlier trials by design (tuner/initial_epoch).
        resume = (None if "tuner/epochs" in values else
                  Resume(self.get_trial_dir(trial.trial_id), self.hooks.current_run_id, values))
        prior = resume.prior if resume is not None else None
        self.hooks.trial_started(trial, architecture, resumed=prior)
        self.hypermodel.last_fit_seconds = 0.0
        self.hypermodel.resume = resume
        registered = tfcompat.custom_gradients()
        if self.stopping is not None:
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
            tfcompat.forget_custom_gradients(registered)
        if resume is not None:
            resume.clear()
        self.hooks.trial_ended(trial, architecture, histories[-1].history,
                               self.hypermodel.last_fit_seconds, None)
        return histories

    def on_epoch_begin(self, trial, model, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, trial, model, batch, logs=None):
        if self._tracking.pending_interruption is not None:  # a signal's raise was swallowed
            raise self._tracking.pending_interruption
        self.hooks.batch_ended()
        if self._collect:
            self._collect = False
            _COLLECTOR.submit(gc.collect)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise kt.errors.FailedTrialError(
                f"the loss became {float(loss)} at epoch {self._epoch + 1}, batch {batch + 1}"
            )

    def on_epoch_end(self, trial, model, epoch, logs=None):
        self.hooks.epoch_ended(trial, epoch, logs or {})


class MedianStopping:
    """The median stopping rule (Golovin et al., Google Vizier, 2017) over a search's curves.

    A trial is stopped after epoch `e` (from `grace` epochs on) when its best objective so
    far is worse than the median, over the earlier trials that trained that long, of
    their objective's running average up to epoch `e`; at least `min_trials` such trials
    are needed. It only ever compares the validation objective, as the search does. The
    curves are those this process trained (a resumed search or a worker starts anew).
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
