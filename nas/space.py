"""Look at a search space before searching it: its size, its costs, samples, budgets.

Nothing here imports TensorFlow. `analyse` counts the distinct architectures a space
holds on a given input shape, how many of them are impossible and why, and the range of
their parameter counts and FLOPs, exactly and without enumerating them: the stages of
the trunk are independent given the feature map each one receives, so the count is a
dynamic program over (stage, feature-map shape), and the head over its input width.
The per-stage arithmetic is `nas.architecture`'s own, so every number agrees with
`Architecture.from_values`.

Counting covers the discrete knobs only; a continuous range (a log-sampled learning
rate, a dropout range without a step) has no count and is listed as left out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from typing import Iterable, Iterator

from nas.architecture import (Architecture, HyperparameterSpec, Builder, Impossible,
                              hyperparameter_specs)
from nas.specs import Constraints, Knob, Pipeline, SearchSpace

__all__ = ["SpaceReport", "analyse", "input_signature", "sample", "budget_problem",
           "search_problem", "describe", "describe_candidate"]

# Knobs that shape the training, not the network: counted apart from the architectures.
_TRAINING_KNOBS = ("optimizer", "learning_rate")
# Input shapes of the keras.datasets sources, so no TensorFlow is needed to know them.
_KERAS_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@dataclasses.dataclass(frozen=True)
class SpaceReport:
    """What a space holds on one input shape.

    Attributes:
        architectures: Distinct architectures over the discrete network knobs (only the
            knobs active under each choice count).
        training_settings: Distinct discrete settings of the optimizer knobs.
        left_out: "name: why" for each knob that cannot be counted (continuous ranges).
        impossible: Architectures whose feature map collapses below 1x1.
        impossible_reasons: (why, how many), most common first; `why` names the stage.
        front: The (parameters, FLOPs) pairs no possible architecture beats on both.
        max_params, max_flops: The largest possible architecture's costs (None when no
            architecture is possible).
    """

    space: SearchSpace
    input_shape: tuple[int, int, int]
    num_classes: int
    architectures: int
    training_settings: int
    left_out: tuple[str, ...]
    impossible: int
    impossible_reasons: tuple[tuple[str, int], ...]
    front: tuple[tuple[int, int], ...]
    max_params: int | None
    max_flops: int | None

    @property
    def possible(self) -> int:
        return self.architectures - self.impossible

    @property
    def candidates(self) -> int:
        return self.architectures * self.training_settings

    @property
    def min_params(self) -> int | None:
        return min((p for p, _ in self.front), default=None)

    @property
    def min_flops(self) -> int | None:
        return min((f for _, f in self.front), default=None)

    def fits(self, constraints: Constraints) -> bool:
        """Whether at least one possible architecture meets every budget at once."""
        max_params = constraints.max_params if constraints.max_params is not None else math.inf
        max_flops = constraints.max_flops if constraints.max_flops is not None else math.inf
        return any(p <= max_params and f <= max_flops for p, f in self.front)

    def impossible_by_stage(self) -> dict[int, int]:
        """Impossible architectures by the stage whose feature map collapses."""
        by_stage: dict[int, int] = collections.Counter()
        for why, count in self.impossible_reasons:
            by_stage[_stage_of(why)] += count
        return dict(sorted(by_stage.items()))


def _stage_of(why: str) -> int:
    # The reasons come from nas.architecture and read "stage N: ...".
    return int(why.split(":", 1)[0].split()[-1])


# --- the input shape, without TensorFlow ---------------------------------------------


def input_signature(pipeline: Pipeline) -> tuple[tuple[int, int, int], int, float]:
    """(input shape, number of classes, pixel scale) of a pipeline, without TensorFlow.

    The bundled digits and `npz` files are read (as `nas search` reads them); the shapes
    of the keras.datasets sources are known; a `directory` pipeline's shape comes from
    its `image_size` and `color_mode`, and its classes from its sub-folders.

    Raises:
        nas.data.DataError: the data is missing or malformed.
    """
    from nas.data import class_folders, load_arrays

    if pipeline.data_source in ("digits", "npz"):
        arrays = load_arrays(pipeline)
        return arrays.input_shape, arrays.num_classes, arrays.pixel_scale
    scale = float(pipeline.pixel_scale or 255.0)
    if pipeline.data_source in _KERAS_SHAPES:
        return _KERAS_SHAPES[pipeline.data_source], 10, scale
    classes = class_folders(pipeline)
    channels = 1 if pipeline.color_mode == "grayscale" else 3
    height, width = pipeline.image_size
    return (height, width, channels), len(classes), scale


# --- counting ------------------------------------------------------------------------


def _assignments(specs: list[HyperparameterSpec]) -> Iterator[dict]:
    """Every assignment of `specs` that respects the conditions among them.

    A condition on a knob outside `specs` counts as met; a continuous knob takes its
    lowest value only (it has no count).
    """
    names = {spec.name for spec in specs}

    def extend(index: int, chosen: dict) -> Iterator[dict]:
        if index == len(specs):
            yield dict(chosen)
            return
        spec = specs[index]
        active = all(chosen.get(parent) in allowed for parent, allowed in spec.conditions
                     if parent in names)
        if not active:
            yield from extend(index + 1, chosen)
            return
        values = spec.knob.values()
        if values is None:
            values = [spec.knob.lowest()]
        for value in values:
            chosen[spec.name] = value
            yield from extend(index + 1, chosen)
        del chosen[spec.name]

    return extend(0, {})


def _bare(name: str) -> str:
    return name.rpartition("/")[2]


def _count(specs: list[HyperparameterSpec]) -> int:
    """How many assignments `specs` have; a continuous knob counts once."""
    return sum(1 for _ in _assignments(specs))


def _left_out(space: SearchSpace) -> tuple[str, ...]:
    seen, out = set(), []
    for spec in hyperparameter_specs(space):
        base = _bare(spec.name)
        if spec.knob.values() is None and base not in seen:
            seen.add(base)
            knob = spec.knob
            out.append(f"{base}: continuous, {knob.sampling} from {knob.min:g} to {knob.max:g}")
    return tuple(out)


def _prune(points: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (params, FLOPs) pairs not beaten on both counts, fewest parameters first."""
    front, best_flops = [], math.inf
    for p, f in sorted(set(points)):
        if f < best_flops:
            front.append((p, f))
            best_flops = f
    return front


@dataclasses.dataclass
class _Node:
    """The prefixes of the trunk that reach one feature-map shape."""

    ways: int = 0
    front: list = dataclasses.field(default_factory=list)
    max_params: int = -1
    max_flops: int = -1

    def add(self, other: "_Node", multiplicity: int, params: int, flops: int) -> None:
        self.ways += other.ways * multiplicity
        self.front.extend((p + params, f + flops) for p, f in other.front)
        self.max_params = max(self.max_params, other.max_params + params)
        self.max_flops = max(self.max_flops, other.max_flops + flops)


def _stage_moves(stage: int, shape: tuple, options: list[dict]):
    """Where each option of stage `stage` takes a feature map of `shape`.

    Returns ({(new shape, params, flops): options}, {why impossible: options}).
    """
    moves, dead = collections.Counter(), collections.Counter()
    prefix = f"stage_{stage}/"
    for option in options:
        values = {prefix + name: value for name, value in option.items()}
        builder = Builder(shape)
        try:
            builder.stage(stage, values)
        except Impossible as why:
            dead[str(why)] += 1
            continue
        params = sum(layer.params for layer in builder.layers)
        flops = sum(layer.flops for layer in builder.layers)
        moves[(builder.shape, params, flops)] += 1
    return moves, dead


def _head_costs(specs: list[HyperparameterSpec], shape: tuple,
                num_classes: int) -> tuple[list, int, int]:
    """(front, max params, max FLOPs) of the heads on a trunk that ends in `shape`."""
    costs = set()
    # A dropout rate costs nothing: one rate stands for all (they are counted apart).
    cost_specs = [dataclasses.replace(s, knob=Knob(s.knob.type, choices=(s.knob.lowest(),)))
                  if s.name.endswith("/dropout") else s for s in specs]
    for values in _assignments(cost_specs):
        builder = Builder(shape)
        builder.head(values, num_classes)
        costs.add((sum(layer.params for layer in builder.layers),
                   sum(layer.flops for layer in builder.layers)))
    return _prune(costs), max(p for p, _ in costs), max(f for _, f in costs)


def analyse(space: SearchSpace, input_shape, num_classes: int) -> SpaceReport:
    """Count the space's architectures on `input_shape` and the range of their costs."""
    input_shape = tuple(int(d) for d in input_shape)
    specs = hyperparameter_specs(space)
    # Every stage has the same knobs: one stage's, named without the "stage_1/" prefix.
    stage_options = list(_assignments([
        dataclasses.replace(s, name=_bare(s.name), conditions=tuple(
            (_bare(parent), allowed) for parent, allowed in s.conditions))
        for s in specs if s.name.startswith("stage_1/")]))
    head_specs = [s for s in specs if s.name == "reduce" or s.name.startswith("dense_")]
    training_specs = [s for s in specs if s.name in _TRAINING_KNOBS]
    head_count = _count(head_specs)
    depths = set(space.depth.values())
    per_stage = len(stage_options)

    def completions(stage: int) -> int:
        """Ways to finish an architecture whose prefix ends with stage `stage`."""
        return head_count * sum(per_stage ** (d - stage) for d in depths if d >= stage)

    architectures = sum(head_count * per_stage ** d for d in depths)
    reasons: collections.Counter = collections.Counter()
    final: list[tuple[tuple, _Node]] = []
    level = {input_shape: _Node(1, [(0, 0)], 0, 0)}
    for stage in range(1, max(depths) + 1):
        following: dict[tuple, _Node] = {}
        for shape, node in level.items():
            moves, dead = _stage_moves(stage, shape, stage_options)
            for (new_shape, params, flops), count in moves.items():
                following.setdefault(new_shape, _Node()).add(node, count, params, flops)
            for why, count in dead.items():
                reasons[why] += node.ways * count * completions(stage)
        for node in following.values():
            node.front = _prune(node.front)
        level = following
        if stage in depths:
            final.extend(level.items())

    front, max_params, max_flops = [], None, None
    heads: dict[tuple, tuple] = {}
    for shape, node in final:
        if shape not in heads:
            heads[shape] = _head_costs(head_specs, shape, num_classes)
        head_front, head_params, head_flops = heads[shape]
        front = _prune(front + [(p + hp, f + hf) for p, f in node.front for hp, hf in head_front])
        max_params = max(max_params or 0, node.max_params + head_params)
        max_flops = max(max_flops or 0, node.max_flops + head_flops)

    return SpaceReport(
        space=space, input_shape=input_shape, num_classes=num_classes,
        architectures=architectures, training_settings=_count(training_specs),
        left_out=_left_out(space), impossible=sum(reasons.values()),
        impossible_reasons=tuple(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        front=tuple(front), max_params=max_params, max_flops=max_flops,
    )


# --- sampling ------------------------------------------------------------------------


def _draw(knob: Knob, rng: random.Random):
    values = knob.values()
    if values is not None:
        return rng.choice(values)
    if knob.sampling == "log":
        return math.exp(rng.uniform(math.log(knob.min), math.log(knob.max)))
    if knob.sampling == "reverse_log":
        return knob.max + knob.min - math.exp(rng.uniform(math.log(knob.min), math.log(knob.max)))
    return rng.uniform(knob.min, knob.max)


def sample(space: SearchSpace, input_shape, num_classes: int, count: int, seed: int = 0,
           pixel_scale: float = 1.0, constraints: Constraints = Constraints(),
           attempts: int = 5000) -> tuple[list[Architecture], int]:
    """`count` candidates drawn as a random search draws them, the rejected ones skipped.

    Returns the candidates (fewer when `attempts` draws do not find `count` that can be
    trained) and how many draws were rejected (impossible or over budget).
    """
    rng = random.Random(seed)
    specs = hyperparameter_specs(space)
    found, rejected = [], 0
    for _ in range(attempts):
        if len(found) >= count:
            break
        values: dict = {}
        for spec in specs:
            if all(values.get(parent) in allowed for parent, allowed in spec.conditions):
                values[spec.name] = _draw(spec.knob, rng)
        architecture = Architecture.from_values(space, values, input_shape, num_classes,
                                                pixel_scale)
        if architecture.rejection(constraints):
            rejected += 1
        else:
            found.append(architecture)
    return found, rejected


# --- budgets -------------------------------------------------------------------------


def _shape(input_shape) -> str:
    return "x".join(str(d) for d in input_shape)


def budget_problem(space: SearchSpace, input_shape, num_classes: int,
                   constraints: Constraints, origins: dict[str, str] | None = None
                   ) -> str | None:
    """Why no candidate of `space` can be trained on `input_shape`, or None if some can.

    Either every candidate is impossible, or none meets the budgets; the message then
    gives the smallest parameter count and FLOPs the space reaches. `origins` names where
    each budget came from ({"max_params": "--max-params"}), for the message.
    """
    report = analyse(space, input_shape, num_classes)
    inputs = f"{_shape(report.input_shape)} inputs"
    if report.possible == 0:
        why, _ = report.impossible_reasons[0]
        return (f"{space.source}: every one of the {report.architectures:,} architectures is "
                f"impossible on {inputs} (e.g. {why})")
    if report.fits(constraints):
        return None
    origins = origins or {}
    limits = [f"{origins.get(key, key)} {value:,}" for key, value in
              (("max_params", constraints.max_params), ("max_flops", constraints.max_flops))
              if value is not None]
    both = (" (each alone is reachable, not both at once)" if len(limits) == 2
            and report.min_params <= constraints.max_params
            and report.min_flops <= constraints.max_flops else "")
    return (f"{' and '.join(limits)}: no candidate of {space.source} fits on {inputs}"
            f"{both}; the smallest the space reaches is {report.min_params:,} parameters "
            f"and {report.min_flops:,} FLOPs")


def search_problem(config, input_shape, num_classes: int) -> str | None:
    """`budget_problem` for a `nas.search.SearchConfig`, naming where each budget came from:
    the flag, or the `constraints:` of the pipeline or of the space."""
    constraints = config.constraints
    origins = {}
    for key in ("max_params", "max_flops"):
        value = getattr(constraints, key)
        if getattr(config, key) == value:
            origins[key] = "--" + key.replace("_", "-")
        elif getattr(config.pipeline.constraints, key) == value:
            origins[key] = f"{config.pipeline.source_file}: constraints.{key}"
        else:
            origins[key] = f"{config.space.source}: constraints.{key}"
    return budget_problem(config.space, input_shape, num_classes, constraints, origins)


# --- text ----------------------------------------------------------------------------


def describe(report: SpaceReport, constraints: Constraints = Constraints(),
             reasons_shown: int = 3) -> str:
    """The report as the lines `nas space show` prints."""
    r = report
    lines = [f"architectures      {r.architectures:,} (discrete knobs, active conditional "
             f"knobs only)"]
    if r.training_settings > 1:
        lines.append(f"  x {r.training_settings:,} optimizer settings = {r.candidates:,} "
                     f"candidates")
    for item in r.left_out:
        lines.append(f"  not counted: {item}")
    share = f" ({r.impossible / r.architectures:.1%})" if r.architectures else ""
    lines.append(f"impossible         {r.impossible:,}{share} on "
                 f"{_shape(r.input_shape)} inputs")
    by_stage = r.impossible_by_stage()
    for stage, total in by_stage.items():
        lines.append(f"  stage {stage} collapses in {total:,}")
        shown = [(why, n) for why, n in r.impossible_reasons if _stage_of(why) == stage]
        for why, n in shown[:reasons_shown]:
            lines.append(f"    {n:>13,}  {why.split(': ', 1)[1]}")
        if len(shown) > reasons_shown:
            rest = sum(n for _, n in shown[reasons_shown:])
            lines.append(f"    {rest:>13,}  ({len(shown) - reasons_shown} other reasons)")
    lines.append(f"possible           {r.possible:,}")
    if r.possible:
        lines.append(f"parameters         {r.min_params:,} to {r.max_params:,}")
        lines.append(f"FLOPs              {r.min_flops:,} to {r.max_flops:,}")
    if constraints.max_params is not None or constraints.max_flops is not None:
        limits = ", ".join(f"{key} {value:,}" for key, value in
                           (("max_params", constraints.max_params),
                            ("max_flops", constraints.max_flops)) if value is not None)
        verdict = "some candidates fit" if r.fits(constraints) else "no candidate fits"
        lines.append(f"budget             {limits}: {verdict}")
    return "\n".join(lines)


def describe_candidate(architecture: Architecture) -> str:
    """One sampled candidate: its knob values, then its layer table."""
    groups: dict[str, list[str]] = {}
    for name, value in architecture.values.items():
        group, _, knob = name.rpartition("/")
        groups.setdefault(group, []).append(f"{knob} {_value(value)}")
    lines = [f"{group + ': ' if group else ''}{', '.join(items)}"
             for group, items in groups.items()]
    return "\n".join(lines + [architecture.table()])


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

