"""The space as KerasTuner hyperparameters, and the guarded oracles that choose from it.

The oracle decides, the tuner runs. Each oracle here is KerasTuner's own with one
addition, the guard: a proposal whose `Architecture` is impossible or over budget is
rejected inside the oracle, counted, remembered as tried, and replaced by another
proposal. It never becomes a trial, never counts as a failure, and costs no graph.
"""

from __future__ import annotations

import collections
import math
import random
import re
import time
from typing import Callable

import keras_tuner as kt
from keras_tuner.engine import trial as trial_module

from nas import funnel as funnel_module
from nas import ktcompat
from nas.architecture import Rejection, hyperparameter_specs
from nas.settings import DEFAULT_TUNER, TUNERS
from nas.specs import Knob, SearchSpace

__all__ = ["TUNERS", "DEFAULT_TUNER", "KNOWN_GOOD", "MAX_REJECTIONS", "ORACLES", "declare",
           "make_oracle"]

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
        self.trial_seconds = getattr(self, "trial_seconds", {})  # trial id -> its wall time
        self.stopped_by_time = False
        self._since, self._started = time.monotonic(), {}

    def elapsed(self) -> float:
        return self.spent + time.monotonic() - self._since

    def next_trial_estimate(self) -> float:
        return sum(self.durations) / len(self.durations) if self.durations else 0.0

    def out_of_time(self) -> bool:
        """Whether the next trial would not end within the time limit."""
        limit = getattr(self, "time_limit", None)
        return limit is not None and self.elapsed() + self.next_trial_estimate() > limit

    def seconds_left(self, values: dict) -> float | None:
        """What the running trial of `values` may still take before the limit (None: no
        deadline): a trial started in time, longer than the trials before it, stops at
        the limit (after its last epoch that ends in time)."""
        limit = getattr(self, "time_limit", None)
        return None if limit is None else max(0.0, limit - self.elapsed())

    def create_trial(self, tuner_id):
        if self.out_of_time():
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
            self.trial_seconds[trial.trial_id] = self.durations[-1]
        return super().end_trial(trial)

    def get_state(self):
        state = super().get_state()
        state["nas_rejected"] = self.rejected
        state["nas_rejection_reasons"] = dict(self.rejection_reasons)
        if hasattr(self, "_since"):
            state["nas_spent_seconds"] = self.elapsed()
            state["nas_trial_seconds"] = list(self.durations)
            state["nas_seconds_by_trial"] = dict(self.trial_seconds)
        return state

    def set_state(self, state):
        super().set_state(state)
        self.rejected = state.get("nas_rejected", 0)
        self.rejection_reasons = collections.Counter(state.get("nas_rejection_reasons", {}))
        self.spent = state.get("nas_spent_seconds", 0.0)
        self.durations = list(state.get("nas_trial_seconds", []))
        self.trial_seconds = dict(state.get("nas_seconds_by_trial", {}))
        self._since = time.monotonic()


class _Oracle(_Guard, ktcompat.AtomicOracle):
    """What every oracle here adds to KerasTuner's: the guard and a state replaced
    atomically (`nas.ktcompat`)."""


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
# pooling, widening with depth, one dropout-regularized dense layer, Adam at 1e-3. In a
# space of residual or mbconv blocks, the same stages of its blocks (EfficientNet's
# expansion and squeeze-and-excitation where it has those knobs). Each
# is a target, snapped to the nearest value the space allows; knobs a seed leaves out,
# and stages it does not name, take the space's defaults (or the previous stage's values).
_STAGE = {"kernel_size": 3, "stride": 1, "padding": "same", "activation": "relu",
          "batch_norm": True, "pointwise": False, "pool": "max", "pool_size": 2,
          "expand_ratio": 4, "se": 0.25}
_HEAD = {"width": 1.0, "reduce": "flatten", "dense_layers": 1, "dense_1/units": 128,
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
LOOK_TRIES = 20  # proposals tried for a look that ends in the time left, before stopping


class _EvolutionOracle(_Oracle, kt.Oracle):
    """Known-good seeds first, then regularized evolution with one-knob mutations.

    The first trials are `KNOWN_GOOD` snapped to the space. After them, each proposal
    takes a parent (the best of `TOURNAMENT` trials drawn from the latest `POPULATION`
    finished ones) and moves one knob: an ordered knob (depth, filters, a rate) one step
    up or down, any other knob to another of its values. A new stage starts as a copy of
    the one before it. Proposals already tried, impossible or over budget are skipped (the
    guard), so the search never spends a trial twice. Everything it needs (the trials, the
    seed state) is KerasTuner's own state: resuming needs nothing more.
    """

    def __init__(self, seeds=KNOWN_GOOD, **kwargs):
        super().__init__(**kwargs)
        self.seeds = [dict(seed) for seed in seeds]
        self.funnel: funnel_module.Funnel | None = None
        self._parent: str | None = None  # the trial the last mutation moved a knob of

    def set_funnel(self, plan: funnel_module.Funnel, flops: Callable[[dict], int]) -> None:
        """Spend the time limit as `plan` says (`nas.funnel`): looks at a share of the
        data, then full trainings of the best; `flops(values)` is a candidate's cost."""
        self.funnel, self._flops = plan, flops

    def out_of_time(self) -> bool:
        return False if self.funnel is not None else super().out_of_time()

    def seconds_left(self, values: dict) -> float | None:
        if self.funnel is None:
            return super().seconds_left(values)
        left = self.funnel.left(self.elapsed(), self._trained())
        full = funnel_module.fidelity(values)[0] >= 1
        return self.funnel.full_seconds(left) if full else left

    def populate_space(self, trial_id):
        if self.funnel is not None:
            return self._funnel_step()
        values = self._first_accepted(lambda rejected: self._propose())
        if values is None:
            return {"status": trial_module.TrialStatus.STOPPED, "values": None}
        return {"status": trial_module.TrialStatus.RUNNING, "values": values}

    def _funnel_step(self) -> dict:
        """The funnel's next trial: a look at a new candidate (a one-knob move starts from
        its parent's weights) or the full training of a look, from its weights."""
        elapsed, trained = self.elapsed(), self._trained()
        running = tuple(t.hyperparameters.values.get(funnel_module.PARENT, "")
                        for t in self.ongoing_trials.values()
                        if funnel_module.fidelity(t.hyperparameters.values)[0] >= 1)
        step = self.funnel.next(elapsed, trained, running)
        values = None
        if step is not None and step.kind == "full":
            look = self.trials[step.parent].hyperparameters.values
            values = {**funnel_module.architecture_values(look), funnel_module.SHARE: 1.0,
                      funnel_module.EPOCHS: step.epochs, funnel_module.PARENT: step.parent}
        elif step is not None:
            for _ in range(LOOK_TRIES):  # a candidate whose look still ends in time
                candidate = self._first_accepted(lambda rejected: self._propose())
                if candidate is None:
                    break
                if self.funnel.look_fits(self._flops(candidate), elapsed, trained):
                    ktcompat.remember_tried(self, candidate)  # looked at: never again
                    values = {**candidate, funnel_module.SHARE: step.share,
                              funnel_module.EPOCHS: step.epochs,
                              funnel_module.PARENT: self._parent or ""}
                    break
        if values is None:
            self.stopped_by_time = True
            return {"status": trial_module.TrialStatus.STOPPED, "values": None}
        return {"status": trial_module.TrialStatus.RUNNING, "values": values}

    def _trained(self) -> list[funnel_module.Trained]:
        """The ended trials, oldest first, as the funnel plans with them."""
        ended = (trial_module.TrialStatus.COMPLETED, trial_module.TrialStatus.FAILED,
                 trial_module.TrialStatus.INVALID)
        trained = []
        for trial in sorted(self.trials.values(), key=lambda t: _number(t.trial_id)):
            if trial.status not in ended:
                continue
            values = trial.hyperparameters.values
            share, epochs = funnel_module.fidelity(values)
            score = trial.score if trial.status == trial_module.TrialStatus.COMPLETED else None
            trained.append(funnel_module.Trained(
                trial.trial_id, share, epochs or 0, score,
                self.trial_seconds.get(trial.trial_id, 0.0),
                self._flops(funnel_module.architecture_values(values)),
                values.get(funnel_module.PARENT) or None))
        return trained

    def _rng(self) -> random.Random:
        return random.Random(ktcompat.next_seed(self))

    def _propose(self) -> dict | None:
        self._parent = None
        for seed in self.seeds:
            values = self._complete(seed, lambda hp: _snap(hp, seed.get(hp.name)))
            if not ktcompat.tried(self, values) and self._check(values) is None:
                return values
        finished = [t for t in self.trials.values()
                    if t.status == trial_module.TrialStatus.COMPLETED and t.score is not None
                    and t.score == t.score]
        if self.funnel is not None:  # looks are compared with looks
            finished = [t for t in finished
                        if funnel_module.fidelity(t.hyperparameters.values)[0] < 1]
        if not finished:
            return ktcompat.random_values(self)
        finished.sort(key=lambda t: _number(t.trial_id))
        population = finished[-POPULATION:]
        for _ in range(MAX_MOVES):
            rng = self._rng()
            entrants = rng.sample(population, min(TOURNAMENT, len(population)))
            parent = (max if self.objective.direction == "max" else min)(
                entrants, key=lambda t: t.score)
            values = self._mutate(parent.hyperparameters.values, rng)
            if values is not None and not ktcompat.tried(self, values):
                self._parent = parent.trial_id
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


def _number(trial_id: str) -> int:
    return int(re.sub(r"\D", "", trial_id) or 0)


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


def _counted(oracle_class) -> Callable[..., kt.Oracle]:
    """How an oracle that proposes up to `max_trials` trials is made (all but Hyperband)."""
    def make(max_trials: int, max_epochs: int, **common) -> kt.Oracle:
        return oracle_class(max_trials=max_trials, **common)
    return make


def _hyperband(max_trials: int, max_epochs: int, **common) -> kt.Oracle:
    # Hyperband sizes its brackets from max_epochs; the trial count is capped by
    # Oracle.max_trials and enough iterations to reach it.
    oracle = _HyperbandOracle(max_epochs=max_epochs, factor=3, hyperband_iterations=max_trials,
                              **common)
    oracle.max_trials = max_trials
    return oracle


# The tuners (--tuner), each name with how its oracle is made:
# (max_trials, max_epochs, **KerasTuner's common arguments) -> a guarded oracle.
# A new tuner is added here; `nas.settings.TUNERS` names the same ones, in the same
# order, without importing KerasTuner (tests/test_settings.py checks they agree).
ORACLES: dict[str, Callable[..., kt.Oracle]] = {
    "evolution": _counted(_EvolutionOracle),
    "random": _counted(_RandomOracle),
    "bayesian": _counted(_BayesianOracle),
    "hyperband": _hyperband,
    "grid": _counted(_GridOracle),
}


def make_oracle(tuner: str, hyperparameters: kt.HyperParameters, objective: kt.Objective,
                max_trials: int, seed: int, max_epochs: int, max_failures: int,
                check: Callable[[dict], Rejection | None],
                time_limit: float | None = None,
                funnel: tuple[funnel_module.Funnel, Callable[[dict], int]] | None = None,
                ) -> kt.Oracle:
    """The oracle for `tuner` (one of `ORACLES`), guarded by `check`, proposing within
    `time_limit` seconds; `funnel` (evolution only): the plan that spends that time and a
    candidate's FLOPs."""
    if tuner not in ORACLES:
        raise ValueError(f"tuner {tuner!r} is not one of {list(ORACLES)}")
    oracle = ORACLES[tuner](max_trials, max_epochs, objective=objective,
                            hyperparameters=hyperparameters, seed=seed,
                            tune_new_entries=False, allow_new_entries=False,
                            max_consecutive_failed_trials=max_failures)
    oracle.set_guard(check)
    oracle.set_time_limit(time_limit)
    if funnel is not None and isinstance(oracle, _EvolutionOracle):
        oracle.set_funnel(*funnel)
    return oracle
