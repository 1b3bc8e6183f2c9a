"""Look at a space before searching it: its size, its costs, samples, budgets.

Nothing here imports TensorFlow. `analyse` counts the distinct architectures a space
holds on a given input shape, how many of them are impossible and why, and the range of
their parameter counts and FLOPs, without enumerating them: `nas.counting` counts and
`nas.costs` weighs, and each says how. The counts are always exact; in a space too
large to weigh exactly, the costs and the front a check of two budgets at once needs
are bounds, and the report says so. Bounds only ever err towards "may fit": a space
holding a candidate that fits is never refused.

Counting covers the discrete knobs only; a continuous range (a log-sampled learning
rate, a dropout range without a step) has no count and is listed as left out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random

from nas.architecture import Architecture, Builder, at_width, hyperparameter_specs
from nas.costs import FRONT_WORK, space_costs
from nas.counting import Sizes, count_assignments, count_impossible, left_out, stage_options
from nas.specs import Constraints, Knob, Pipeline, SearchSpace

__all__ = ["SpaceReport", "analyse", "input_signature", "sample", "budget_problem",
           "search_problem", "describe", "describe_candidate", "latency_estimate"]

# Knobs that shape the training, not the network: counted apart from the architectures.
_TRAINING_KNOBS = ("optimizer", "learning_rate")  # and every `augment/...` knob
# (input shape, classes, default pixel scale) of the bundled digits and the well-known
# datasets (nas.datasets), so neither scikit-learn (a second's import) nor TensorFlow is
# needed to know them; tests/test_space.py and tests/test_datasets.py hold them to what
# `nas.data` reads.
_KNOWN_SIGNATURES = {"digits": ((8, 8, 1), 10, 16.0), "mnist": ((28, 28, 1), 10, 255.0),
                     "fashion_mnist": ((28, 28, 1), 10, 255.0),
                     "cifar10": ((32, 32, 3), 10, 255.0)}


@dataclasses.dataclass(frozen=True)
class SpaceReport:
    """What a space holds on one input shape.

    Attributes:
        architectures: Distinct architectures over the discrete network knobs (only the
            knobs active under each choice count).
        training_settings: Distinct discrete settings of the optimizer and augmentation
            knobs.
        left_out: "name: why" for each knob that cannot be counted (continuous ranges).
        impossible: Architectures whose feature map collapses below 1x1.
        impossible_reasons: (why, how many), most common first; `why` names the stage.
        front: The (parameters, FLOPs) pairs no possible architecture beats on both,
            fewest parameters first. When not `front_exact`, some (or all) are lower
            bounds instead, each matching or beating on both counts the architectures it
            stands for: every possible architecture is matched or beaten by a point.
        max_params, max_flops: The largest possible architecture's costs (None when no
            architecture is possible); upper bounds when not `costs_exact`.
        costs_exact: Whether the cost range is exact. A space too large to weigh
            exactly (see `nas.costs.EXACT_WORK`) gets bounds: `min_params` and
            `min_flops` no larger than the smallest architecture's, `max_params` and
            `max_flops` no smaller than the largest's.
        front_exact: Whether `front` is exact; a deep space with many choices per stage
            has it thinned to bounds (see `nas.costs.FRONT_WORK`), and it is bounds
            whenever the costs are. Its fewest parameters and FLOPs are exact either way
            when `costs_exact`.
        reached: The points of `front` a possible architecture costs exactly (all of
            them when `front_exact`).
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
    costs_exact: bool
    front_exact: bool
    reached: tuple[tuple[int, int], ...]

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
        """Whether at least one possible architecture may meet every budget at once.

        False means none does, even when the front is bounds. True is certain when
        `fits_surely` is too.
        """
        max_params, max_flops = _limits(constraints)
        return any(p <= max_params and f <= max_flops for p, f in self.front)

    def fits_surely(self, constraints: Constraints) -> bool:
        """Whether a possible architecture is known to meet every budget at once.

        With exact costs, one budget is always decided (the fewest parameters and FLOPs
        are exact), and both are when the front is exact too; otherwise only `reached`
        points count.
        """
        one = None in (constraints.max_params, constraints.max_flops)
        if self.front_exact or (self.costs_exact and one):
            return self.fits(constraints)
        max_params, max_flops = _limits(constraints)
        return any(p <= max_params and f <= max_flops for p, f in self.reached)

    def impossible_by_stage(self) -> dict[int, int]:
        """Impossible architectures by the stage whose feature map collapses."""
        by_stage: dict[int, int] = collections.Counter()
        for why, count in self.impossible_reasons:
            by_stage[_stage_of(why)] += count
        return dict(sorted(by_stage.items()))


def _limits(constraints: Constraints) -> tuple[float, float]:
    return tuple(math.inf if value is None else value
                 for value in (constraints.max_params, constraints.max_flops))


def _stage_of(why: str) -> int:
    # The reasons come from nas.architecture and read "stage N: ...".
    return int(why.split(":", 1)[0].split()[-1])


# --- the input shape, without TensorFlow ---------------------------------------------


def input_signature(pipeline: Pipeline) -> tuple[tuple[int, int, int], int, float]:
    """(input shape, number of classes, pixel scale) of a pipeline, without TensorFlow.

    An `npz` file is read (as `nas search` reads it); the shapes of the bundled digits
    and of the well-known datasets (mnist, fashion_mnist, cifar10) are known; a
    `directory` pipeline's shape comes from its `image_size` and `color_mode`, and its
    classes from its sub-folders.

    Raises:
        nas.errors.DataError: the data is missing or malformed.
    """
    from nas.data import class_folders, load_arrays

    if pipeline.data_source == "npz":
        arrays = load_arrays(pipeline)
        return arrays.input_shape, arrays.num_classes, arrays.pixel_scale
    if pipeline.data_source in _KNOWN_SIGNATURES:
        shape, classes, scale = _KNOWN_SIGNATURES[pipeline.data_source]
        return shape, classes, float(pipeline.pixel_scale or scale)
    scale = float(pipeline.pixel_scale or 255.0)
    classes = class_folders(pipeline)
    channels = 1 if pipeline.color_mode == "grayscale" else 3
    height, width = pipeline.image_size
    return (height, width, channels), len(classes), scale


# --- counting ------------------------------------------------------------------------


def analyse(space: SearchSpace, input_shape, num_classes: int,
            work: int = FRONT_WORK) -> SpaceReport:
    """Count the space's architectures on `input_shape` and the range of their costs.

    Every count is exact. The costs are exact unless the space is too large to weigh
    exactly (`nas.costs.EXACT_WORK`); they are then bounds (`SpaceReport.costs_exact`).
    The front is thinned to bounds past `work` candidate points (`SpaceReport.front_exact`).

    A space with a width multiplier or a resolution is the union of one space per width
    and resolution: each is weighed on its own (its filters scaled, its images resized)
    and the reports are joined.
    """
    input_shape = tuple(int(d) for d in input_shape)
    widths = space.width.values()
    resolutions = space.resolution.values() if space.resolution is not None else [None]
    if widths == [1.0] and resolutions == [None]:
        return _analyse(space, input_shape, num_classes, work)
    reports = []
    for resolution in resolutions:
        builder = Builder(input_shape)
        builder.resize(resolution)
        resized, resize_flops = builder.shape, sum(layer.flops for layer in builder.layers)
        # The counts are those at width 1 whatever the width (scaled filters may
        # coincide, 1 and 2 at width 0.5, but they are still two choices).
        counted = _analyse(at_width(space, 1.0), resized, num_classes, work // len(widths))
        for width in widths:
            part = counted if width == 1.0 else _analyse(at_width(space, width), resized,
                                                         num_classes, work // len(widths))
            reports.append((part, counted, resize_flops))
    return _joined(space, input_shape, reports)


def _joined(space: SearchSpace, input_shape, reports: list) -> SpaceReport:
    """One report of the union of the spaces `reports` weighed: (report, the report
    whose counts are right, the FLOPs of the resize before them)."""
    reasons: collections.Counter = collections.Counter()
    for _, counted, _ in reports:
        reasons.update(dict(counted.impossible_reasons))
    points = {(params, flops + resize): (params, flops) in part.reached
              for part, _, resize in reports for params, flops in part.front}
    front = []
    for point in sorted(points):  # fewest parameters first; each kept beats the rest on FLOPs
        if not front or point[1] < front[-1][1]:
            front.append(point)
    possible = [(part, resize) for part, counted, resize in reports if counted.possible]
    first = reports[0][1]
    return SpaceReport(
        space=space, input_shape=input_shape, num_classes=first.num_classes,
        architectures=sum(counted.architectures for _, counted, _ in reports),
        training_settings=first.training_settings, left_out=first.left_out,
        impossible=sum(counted.impossible for _, counted, _ in reports),
        impossible_reasons=tuple(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        front=tuple(front),
        max_params=max((part.max_params for part, _ in possible), default=None),
        max_flops=max((part.max_flops + resize for part, resize in possible), default=None),
        costs_exact=all(part.costs_exact for part, _, _ in reports),
        front_exact=all(part.front_exact for part, _, _ in reports),
        reached=tuple(point for point in front if points[point]))


def _analyse(space: SearchSpace, input_shape, num_classes: int, work: int) -> SpaceReport:
    """`analyse` of a space with no width multiplier and no resolution."""
    specs = hyperparameter_specs(space)
    convs, pools = stage_options(specs)
    head_specs = [s for s in specs if s.name == "reduce" or s.name.startswith("dense_")]
    training_specs = [s for s in specs
                      if s.name in _TRAINING_KNOBS or s.name.startswith("augment/")]
    head_count = count_assignments(head_specs)
    depths = set(space.depth.values())
    per_stage = len(convs) * len(pools)
    # Ways to finish an architecture whose prefix ends with each stage.
    completions = {stage: head_count * sum(per_stage ** (d - stage) for d in depths
                                           if d >= stage)
                   for stage in range(1, max(depths) + 1)}
    sizes = Sizes(convs, pools)
    reasons = count_impossible(sizes, input_shape, depths, completions)
    costs, exact = space_costs(space, convs, pools, head_specs, input_shape, num_classes,
                          len(sizes.met), work)
    front = list(zip(costs.front.params.tolist(), costs.front.flops.tolist()))
    return SpaceReport(
        space=space, input_shape=input_shape, num_classes=num_classes,
        architectures=sum(head_count * per_stage ** d for d in depths),
        training_settings=count_assignments(training_specs), left_out=left_out(space),
        impossible=sum(reasons.values()),
        impossible_reasons=tuple(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        front=tuple(front), max_params=costs.max_params, max_flops=costs.max_flops,
        costs_exact=exact, front_exact=exact and not costs.thinned,
        reached=tuple(point for point, real in zip(front, costs.front.real.tolist()) if real),
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


def latency_estimate(candidates: list[Architecture], guard) -> tuple[int, list[float]]:
    """How many of `candidates` (a sample) `guard` (a `nas.latency_table.LatencyGuard`)
    predicts within its budget, and each one's predicted latency (ms), in order. The
    guard's table measures what it lacks first, where it grows (with TensorFlow).

    Raises:
        nas.latency_table.LatencyTableError: a fixed table lacks a layer.
    """
    predicted = [guard.predict(architecture) for architecture in candidates]
    return sum(ms <= guard.max_ms for ms in predicted), predicted


# --- budgets -------------------------------------------------------------------------


def _shape(input_shape) -> str:
    return "x".join(str(d) for d in input_shape)


def budget_problem(space: SearchSpace, input_shape, num_classes: int,
                   constraints: Constraints, origins: dict[str, str] | None = None
                   ) -> str | None:
    """Why no candidate of `space` can be trained on `input_shape`, or None if some can.

    Either every candidate is impossible, or none meets the budgets; the message then
    gives the smallest parameter count and FLOPs the space reaches (lower bounds, said so,
    in a space too large to weigh exactly). A space whose costs are bounds is refused only
    when nothing can fit; None then means some candidate may. `origins` names where each
    budget came from ({"max_params": "`max_params`"}, a parameter the CLI shows as its flag),
    for the message.
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
    alone = "each alone is reachable, " if report.costs_exact else ""
    both = (f" ({alone}not both at once)" if len(limits) == 2
            and report.min_params <= constraints.max_params
            and report.min_flops <= constraints.max_flops else "")
    least = "" if report.costs_exact else "at least "
    return (f"{' and '.join(limits)}: no candidate of {space.source} fits on {inputs}"
            f"{both}; the smallest the space reaches is {least}{report.min_params:,} "
            f"parameters and {least}{report.min_flops:,} FLOPs")


def search_problem(config, input_shape, num_classes: int) -> str | None:
    """`budget_problem` for a `nas.settings.SearchConfig`, naming where each budget came from:
    the parameter (`max_params`, the CLI's flag), or the `constraints:` of the pipeline or
    of the space."""
    constraints = config.constraints
    origins = {}
    for key in ("max_params", "max_flops"):
        value = getattr(constraints, key)
        if getattr(config, key) == value:
            origins[key] = f"`{key}`"
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
        what = ("optimizer and augmentation" if r.space.augment else "optimizer")
        lines.append(f"  x {r.training_settings:,} {what} settings = {r.candidates:,} "
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
    if r.possible and r.costs_exact:
        lines.append(f"parameters         {r.min_params:,} to {r.max_params:,}")
        lines.append(f"FLOPs              {r.min_flops:,} to {r.max_flops:,}")
    elif r.possible:
        lines.append(f"parameters         at least {r.min_params:,}, at most {r.max_params:,}")
        lines.append(f"FLOPs              at least {r.min_flops:,}, at most {r.max_flops:,}")
        lines.append("  (bounds, not the exact range: the space is too large to weigh its costs "
                     "exactly; the counts above are exact)")
    if constraints.max_params is not None or constraints.max_flops is not None:
        limits = ", ".join(f"{key} {value:,}" for key, value in
                           (("max_params", constraints.max_params),
                            ("max_flops", constraints.max_flops)) if value is not None)
        if r.fits_surely(constraints):
            verdict = "some candidates fit"
        elif r.fits(constraints):
            verdict = ("some candidates may fit (an estimate from bounds: the space is too "
                       "large to check this budget exactly; only what cannot fit is ruled out)")
        else:
            verdict = "no candidate fits"
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

