"""Count a space's architectures, and the impossible ones, without enumerating them.

Nothing here imports TensorFlow. The stages of the trunk are independent given the
feature map each one receives, so the impossible architectures are counted by a dynamic
program over (stage, feature-map size): the prefixes that reach each size, times the
options that do not fit it, times the ways to finish (`count_impossible`). The options'
arithmetic is `nas.architecture`'s own, so every count agrees with
`Architecture.from_values`, and every count is exact. What the architectures cost is
weighed in `nas.costs`.

Counting covers the discrete knobs only; a continuous range (a log-sampled learning
rate, a dropout range without a step) has no count and is listed as left out
(`left_out`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterator

import numpy as np

from nas.architecture import (CONV_SHAPE_KNOBS, POOL_KNOBS, Builder, ConvKnobs,
                              HyperparameterSpec, Impossible, PoolKnobs, conv_costs,
                              hyperparameter_specs, pool_costs)
from nas.specs import SearchSpace

__all__ = ["Sizes", "assignments", "count_assignments", "count_impossible", "left_out",
           "stage_options"]


# --- knobs ---------------------------------------------------------------------------


def assignments(specs: list[HyperparameterSpec]) -> Iterator[dict]:
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


def _active(spec: HyperparameterSpec, chosen: dict) -> bool:
    return all(chosen.get(parent) in allowed for parent, allowed in spec.conditions)


def count_assignments(specs: list[HyperparameterSpec]) -> int:
    """How many assignments `specs` have (a continuous knob counts once), without listing
    them: only the knobs others depend on are enumerated."""
    names = {spec.name for spec in specs}
    parents = {parent for spec in specs for parent, _ in spec.conditions if parent in names}
    leaves = [spec for spec in specs if spec.name not in parents]
    return sum(math.prod(len(spec.knob.values() or [None]) for spec in leaves
                         if _active(spec, chosen))
               for chosen in assignments([spec for spec in specs if spec.name in parents]))


def left_out(space: SearchSpace) -> tuple[str, ...]:
    seen, out = set(), []
    for spec in hyperparameter_specs(space):
        base = _bare(spec.name)
        if spec.knob.values() is None and base not in seen:
            seen.add(base)
            knob = spec.knob
            out.append(f"{base}: continuous, {knob.sampling} from {knob.min:g} to {knob.max:g}")
    return tuple(out)


def stage_options(specs: list[HyperparameterSpec]) -> tuple[list[dict], list[dict]]:
    """Every assignment of a stage's knobs but its pool's, and of its pool's.

    Every stage has the same knobs: one stage's are read, named without the "stage_1/"
    prefix. No condition joins the pool's knobs to the others, so a stage's options are
    every pair of the two, and are never listed whole.
    """
    stage = [dataclasses.replace(s, name=_bare(s.name), conditions=tuple(
        (_bare(parent), allowed) for parent, allowed in s.conditions))
        for s in specs if s.name.startswith("stage_1/")]
    return (list(assignments([s for s in stage if s.name not in POOL_KNOBS])),
            list(assignments([s for s in stage if s.name in POOL_KNOBS])))


# --- impossible architectures --------------------------------------------------------


def _rows(options: list[dict], key) -> tuple[list[dict], list[int]]:
    """One option for each distinct `key(option)`, and how many options share it."""
    first: dict = {}
    shared: collections.Counter = collections.Counter()
    for option in options:
        row = key(option)
        first.setdefault(row, option)
        shared[row] += 1
    return list(first.values()), list(shared.values())


class Sizes:
    """Which of a stage's options fit a feature map of each size, and why the others do
    not: the options read by the knobs the feature map's height and width depend on.

    Args:
        convs: Every assignment of a stage's knobs but its pool's.
        pools: Every assignment of its pool's knobs.
    """

    def __init__(self, convs: list[dict], pools: list[dict]):
        self.convs, shares = _rows(
            convs, lambda option: tuple(option.get(name) for name in CONV_SHAPE_KNOBS))
        self.shares, self.pools = np.array(shares, np.int64), pools
        self.conv, self.pool = (type_(*(np.array(column, np.int64) for column in zip(
            *map(type_.of, options)))) for type_, options in ((ConvKnobs, self.convs),
                                                                (PoolKnobs, pools)))
        self._counted: dict[tuple, tuple] = {}
        self._reasons: dict[tuple, str] = {}

    @property
    def met(self) -> list[tuple[int, int]]:
        """The sizes `counts` was asked about."""
        return list(self._counted)

    def counts(self, size: tuple[int, int]) -> tuple[dict, collections.Counter]:
        """({(height, width) left: options}, {why impossible: options}) on a `size` map.

        `why` leaves out the "stage N: " that starts the reason `Builder.stage` gives.
        """
        if size not in self._counted:
            conv_heights, conv_widths, _, _, _ = conv_costs((*size, 1), self.conv)
            heights, widths, _, _, _ = pool_costs(
                (conv_heights[:, None], conv_widths[:, None], 1), self.pool)
            shares = np.broadcast_to(self.shares[:, None], heights.shape)
            fits = (heights >= 1) & (widths >= 1)
            # The size each fitting pair leaves, as one number: (height, width).
            tall = size[1] + 1
            codes, left = np.unique(heights[fits] * tall + widths[fits], return_inverse=True)
            options = np.zeros(len(codes), np.int64)
            np.add.at(options, left.reshape(-1), shares[fits])
            moves = {(code // tall, code % tall): n
                     for code, n in zip(codes.tolist(), options.tolist())}
            dead: collections.Counter = collections.Counter()
            for conv, pool in zip(*np.nonzero(~fits)):
                met = (int(conv_heights[conv]), int(conv_widths[conv]))
                dead[self._why_not(size, int(conv), int(pool), met)] += int(shares[conv, pool])
            self._counted[size] = (moves, dead)
        return self._counted[size]

    def _why_not(self, size: tuple[int, int], conv: int, pool: int, met: tuple) -> str:
        """Why conv option `conv` then pool option `pool` do not fit a `size` map, as
        `Builder.stage` says it; `met` is the map the conv leaves for the pool."""
        # A conv's reason names the map and the conv; a pool's, the map it meets and it.
        key = (size, conv) if min(met) < 1 else (met, pool)
        if key not in self._reasons:
            values = {**self.convs[conv], **self.pools[pool]}
            try:
                Builder((*size, 1)).stage(1, {f"stage_1/{n}": v for n, v in values.items()})
            except Impossible as why:
                self._reasons[key] = str(why).split(": ", 1)[1]
        return self._reasons[key]


def count_impossible(sizes: Sizes, input_shape: tuple, depths: set[int],
                      completions: dict[int, int]) -> collections.Counter:
    """{why: impossible architectures}, exactly: the prefixes that reach each feature-map
    size, stage by stage, times the options that do not fit it, times the ways to finish."""
    reasons: collections.Counter = collections.Counter()
    ways = {input_shape[:2]: 1}
    for number in range(1, max(depths) + 1):
        following: collections.Counter = collections.Counter()
        for size, prefixes in ways.items():
            moves, dead = sizes.counts(size)
            for left, options in moves.items():
                following[left] += prefixes * options
            for why, options in dead.items():
                reasons[f"stage {number}: {why}"] += prefixes * options * completions[number]
        ways = following
    return reasons
