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
import math
import time
from typing import Callable

import keras
import keras_tuner as kt
import tensorflow as tf
from keras_tuner.src.engine import trial as trial_module
from tensorflow.python.framework import ops as _tf_ops

from nas.architecture import Architecture, hyperparameter_specs
from nas.models import build_model
from nas.specs import Knob, SearchSpace

__all__ = ["TUNERS", "declare", "make_oracle", "CandidateModel", "NasTuner"]

TUNERS = ("random", "bayesian", "hyperband", "grid")
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

    def set_guard(self, check: Callable[[dict], str | None]) -> None:
        self._check = check
        self.rejected = getattr(self, "rejected", 0)
        self.rejection_reasons = getattr(self, "rejection_reasons", collections.Counter())

    def _reject(self, values: dict, reason: str) -> None:
        self.rejected += 1
        self.rejection_reasons["over budget" if "max_" in reason else "impossible"] += 1
        self._tried_so_far.add(self._compute_values_hash(values))

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

    def get_state(self):
        state = super().get_state()
        state["nas_rejected"] = self.rejected
        state["nas_rejection_reasons"] = dict(self.rejection_reasons)
        return state

    def set_state(self, state):
        super().set_state(state)
        self.rejected = state.get("nas_rejected", 0)
        self.rejection_reasons = collections.Counter(state.get("nas_rejection_reasons", {}))


class _RandomOracle(_Guard, kt.oracles.RandomSearchOracle):
    pass


class _HyperbandOracle(_Guard, kt.oracles.HyperbandOracle):
    pass


class _BayesianOracle(_Guard, kt.oracles.BayesianOptimizationOracle):
    def populate_space(self, trial_id):
        response = super().populate_space(trial_id)
        values = response.get("values")
        if response["status"] == trial_module.TrialStatus.RUNNING and values:
            reason = self._check(values)
            if reason is not None:
                # The Gaussian process would propose the same point again: fall back
                # to a guarded random proposal.
                self._reject(values, reason)
                return self._random_populate_space()
        return response


class _GridOracle(_Guard, kt.oracles.GridSearchOracle):
    def _get_next_combination(self, values):
        # Walk the grid past rejected points, each from the last one rejected.
        parent = super()._get_next_combination
        return self._first_accepted(lambda rejected: parent(rejected or values))

    def populate_space(self, trial_id):
        response = super().populate_space(trial_id)
        values = response.get("values")
        if values and self._check(values) is not None and len(self.start_order) == 0:
            # The first grid point (all defaults) is impossible: start from the first
            # possible one instead.
            self._reject(values, self._check(values))
            values = self._get_next_combination(values)
            if values is None:
                return {"status": trial_module.TrialStatus.STOPPED, "values": None}
            response = {"status": response["status"], "values": values}
        return response


def make_oracle(tuner: str, hyperparameters: kt.HyperParameters, objective: kt.Objective,
                max_trials: int, seed: int, max_epochs: int, max_failures: int,
                check: Callable[[dict], str | None]) -> kt.Oracle:
    """KerasTuner's oracle for `tuner`, guarded by `check`."""
    common = dict(objective=objective, hyperparameters=hyperparameters, seed=seed,
                  tune_new_entries=False, allow_new_entries=False,
                  max_consecutive_failed_trials=max_failures)
    if tuner == "random":
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

    def architecture(self, values: dict) -> Architecture:
        return Architecture.from_values(self.space, values, self.input_shape, self.num_classes,
                                        self.pixel_scale)

    def check(self, values: dict, constraints) -> str | None:
        return self.architecture(values).rejection(constraints)

    def build(self, hp):
        architecture = self.architecture(hp.values)
        if architecture.impossible:
            raise kt.errors.FailedTrialError(architecture.impossible)
        return build_model(architecture, jit_compile=self.jit_compile,
                           mixed_precision=self.mixed_precision)

    def fit(self, hp, model, *args, **kwargs):
        start = time.perf_counter()
        try:
            return model.fit(*args, **kwargs)
        finally:
            self.last_fit_seconds = time.perf_counter() - start


class NasTuner(kt.Hyperband):
    """Runs trials for any of the guarded oracles and reports each one through `hooks`.

    It derives from `keras_tuner.Hyperband` only for Hyperband's `run_trial` and
    `_build_hypermodel`, which act on the `tuner/*` values the Hyperband oracle sets
    and do nothing for the other oracles; `__init__` skips Hyperband's own, which
    would create a second, unguarded oracle.

    `hooks` receives `trial_started(trial, architecture)`, `batch_ended()`,
    `epoch_ended(trial, epoch, logs)` and `trial_ended(trial, architecture, history,
    fit_seconds, error)`.
    """

    def __init__(self, oracle, hypermodel: CandidateModel, hooks, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)
        self.hooks = hooks
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
        architecture = self.hypermodel.architecture(trial.hyperparameters.values)
        self.hooks.trial_started(trial, architecture)
        self.hypermodel.last_fit_seconds = 0.0
        registered = _custom_gradients()
        try:
            histories = super().run_trial(trial, *args, **kwargs)
        except BaseException as error:
            self.hooks.trial_ended(trial, architecture, None, self.hypermodel.last_fit_seconds,
                                   error)
            raise
        finally:
            _forget_custom_gradients(registered)
        self.hooks.trial_ended(trial, architecture, histories[-1].history,
                               self.hypermodel.last_fit_seconds, None)
        return histories

    def on_epoch_begin(self, trial, model, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, trial, model, batch, logs=None):
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


def _custom_gradients() -> set:
    registry = getattr(getattr(_tf_ops, "_gradient_registry", None), "_registry", None)
    return set(registry) if registry is not None else set()


def _forget_custom_gradients(before: set) -> None:
    """Drop the custom gradients a trial's training registered in TensorFlow's registry.

    Every traced train step registers a `CustomGradient-N` (tf.distribute's all-reduce)
    in a global registry that is never emptied, and it holds the whole traced graph: about
    10 MB per trial that `clear_session` does not free. The trial's model is done with
    them once its training has ended. (TensorFlow internals: if they move, this does
    nothing.)
    """
    registry = getattr(getattr(_tf_ops, "_gradient_registry", None), "_registry", None)
    if registry is None:
        return
    for name in [n for n in registry if n not in before and n.startswith("CustomGradient-")]:
        del registry[name]


def early_stopping(objective: str, direction: str, patience: int | None) -> list:
    """The callbacks every trial's fit gets: early stopping on the objective."""
    if not patience:
        return []
    return [keras.callbacks.EarlyStopping(monitor=objective, mode=direction, patience=patience)]
