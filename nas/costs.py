"""Weigh a space's architectures without enumerating them: their front and largest costs.

Nothing here imports TensorFlow. The stages of the trunk are independent given the
feature map each one receives, so the (parameters, FLOPs) front and the largest costs
are a dynamic program over (stage, feature-map shape), and the head's over the shape
the trunk ends in. Every stage has the same options, so what they do to a feature map
of one shape is worked out once, whatever the stage, with numpy over all options at
once. The per-stage arithmetic is `nas.architecture`'s own, so every number agrees with
`Architecture.from_values`.

The costs are exact unless the program would pass `EXACT_WORK` points (a deep space
with many choices per stage, on large inputs); they are then bounds, computed as if
every stage got the fewest (or the most) channels the space has, and said to be bounds
(`space_costs`). The front a check of two budgets at once needs is exact while it is cheap
(`FRONT_WORK`), else thinned to points that each beat a run of real ones (`_fronts`).
Bounds only ever err towards "may fit": a space holding a candidate that fits is never
refused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from nas.architecture import (Builder, ConvKnobs, HyperparameterSpec, PoolKnobs,
                              conv_costs, pool_costs)
from nas.counting import assignments
from nas.specs import Knob, SearchSpace

__all__ = ["FRONT_WORK", "EXACT_WORK", "space_costs"]

# Candidate (parameters, FLOPs) points the front's dynamic program may weigh in all,
# shared among its steps; past each step's share, the front is thinned to bounds.
FRONT_WORK = 2_000_000
# Points the exact dynamic program may handle in all (options weighed on a feature map,
# moves, candidates) before the costs are bounded instead: about half a second.
EXACT_WORK = 5_000_000


def _total(builder: Builder) -> tuple[int, int]:
    return (sum(layer.params for layer in builder.layers),
            sum(layer.flops for layer in builder.layers))


class _Points(NamedTuple):
    """(parameters, FLOPs) points, each at a state: a feature-map shape, by its number.

    `real` tells a point some architecture (or prefix, or move) costs exactly from one
    that merges several: a bound, which matches or beats each of them on both counts.
    """

    state: np.ndarray
    params: np.ndarray
    flops: np.ndarray
    real: np.ndarray

    @classmethod
    def exact(cls, state, params, flops) -> "_Points":
        return cls(np.asarray(state), params, flops, np.ones(len(params), bool))

    @classmethod
    def join(cls, parts: list["_Points"], dtype) -> "_Points":
        if not parts:
            return cls.exact(np.zeros(0, np.int64), np.zeros(0, dtype), np.zeros(0, dtype))
        return cls(*(np.concatenate(column) for column in zip(*parts)))

    @property
    def size(self) -> int:
        return len(self.state)

    def take(self, index) -> "_Points":
        return _Points(*(column[index] for column in self))


def _fronts(points: _Points, limit: int | None = None) -> tuple[_Points, bool]:
    """Each state's points that no other point of its state matches or beats on both counts.

    Sorted by state, then fewest parameters first. A state left with more than `limit`
    points is thinned to `limit`: each run of neighbours becomes one point with the run's
    fewest parameters and fewest FLOPs, which beats all of them. So a budget check on a
    thinned front can only err towards "may fit", and each state's fewest parameters and
    fewest FLOPs stay exact. Also returns whether anything was thinned.
    """
    if not points.size:
        return points, False
    points = points.take(_candidates(points))
    points = points.take(np.lexsort((~points.real, points.flops, points.params, points.state)))
    # A point stays when its FLOPs are below those of every earlier point of its state: a
    # running minimum over keys that drop, from one state to the next, by more than any
    # difference of FLOPs ranks.
    segment = np.cumsum(_firsts(points.state)) - 1
    key = (segment[-1] - segment) * (points.size + 1) + _ranks(points.flops)
    before = np.concatenate(([key[0] + 1], np.minimum.accumulate(key)[:-1]))
    points = points.take(key < before)
    firsts = _firsts(points.state)
    if limit is None or np.diff(np.flatnonzero(np.append(firsts, True))).max() <= limit:
        return points, False
    starts = np.flatnonzero(firsts)
    sizes = np.diff(np.append(starts, points.size))
    run = (np.arange(points.size) - np.repeat(starts, sizes)) * limit // np.repeat(sizes, sizes)
    first = np.flatnonzero(firsts | np.concatenate(([True], run[1:] != run[:-1])))
    last = np.append(first[1:], points.size) - 1
    return _Points(points.state[first], points.params[first], points.flops[last],
                   points.real[first] & (first == last)), True


def _candidates(points: _Points) -> np.ndarray:
    """Which points may be on their state's front, found without sorting (sorts are slow).

    A front point has no more parameters than its state's point with the fewest FLOPs
    (which would beat it otherwise), and no more FLOPs than its point with the fewest
    parameters.
    """
    state = points.state

    def at_least(key, other):
        # Per state, the fewest `other` among the points with the fewest `key`.
        fewest = np.full(state.max() + 1, key.max() + 1, dtype=key.dtype)
        np.minimum.at(fewest, state, key)
        tied = key == fewest[state]
        bound = np.full(state.max() + 1, other.max() + 1, dtype=other.dtype)
        np.minimum.at(bound, state[tied], other[tied])
        return bound[state]

    return ((points.params <= at_least(points.flops, points.params))
            & (points.flops <= at_least(points.params, points.flops)))


def _firsts(state: np.ndarray) -> np.ndarray:
    """Which entries of a sorted `state` are the first of their state."""
    return np.concatenate(([True], state[1:] != state[:-1]))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank among the distinct `values` (equal values, equal ranks)."""
    return np.unique(values, return_inverse=True)[1].reshape(-1)


class _States:
    """Numbers for the feature-map shapes the trunk reaches, in the order first seen;
    0 stands for the end of an architecture (`_END`)."""

    def __init__(self):
        self.number: dict[tuple, int] = {}
        self.shape: list[tuple] = []
        self(("end",))

    def __call__(self, shape: tuple) -> int:
        if shape not in self.number:
            self.number[shape] = len(self.shape)
            self.shape.append(shape)
        return self.number[shape]


_END = 0
# Entries of one array the dynamic program works on at most (memory, not time).
_CHUNK = 2 ** 20


class _TooLarge(Exception):
    """The exact dynamic program would handle more points than its budget allows."""


class _Budget:
    """Points the exact dynamic program may still handle (None: no limit)."""

    def __init__(self, points: int | None):
        self.left = points

    def spend(self, points: int) -> None:
        """Count `points` about to be handled; raises `_TooLarge` past the budget."""
        if self.left is not None:
            self.left -= points
            if self.left < 0:
                raise _TooLarge


class _Table:
    """Moves (`state`: the state a move leads to) by the state they leave, added a batch
    of leaving states at a time and gathered for many leaving states at once."""

    def __init__(self, dtype):
        self.moves = _Points.join([], dtype)
        self._pending: list[_Points] = []
        self._rows = 0
        self._start = self._count = np.zeros(0, np.int64)

    def add(self, origin: np.ndarray, moves: _Points) -> None:
        """Add every move of the states in `origin`, none of them in the table yet."""
        order = np.argsort(origin, kind="stable")
        leaving, counts = np.unique(origin, return_counts=True)
        self._grow(int(leaving.max(initial=-1)) + 1)
        self._start[leaving] = self._rows + np.cumsum(counts) - counts
        self._count[leaving] = counts
        self._pending.append(moves.take(order))
        self._rows += len(order)

    def gather(self, sources: np.ndarray) -> tuple[np.ndarray, _Points]:
        """(the state each move leaves, the moves) for `sources`, in their order."""
        if self._pending:
            self.moves = _Points.join([self.moves, *self._pending], self.moves.params.dtype)
            self._pending = []
        self._grow(int(sources.max(initial=-1)) + 1)
        count = self._count[sources]
        first = np.repeat(self._start[sources] - (np.cumsum(count) - count), count)
        return np.repeat(sources, count), self.moves.take(first + np.arange(count.sum()))

    def _grow(self, size: int) -> None:
        if size > len(self._count):
            more = np.zeros(size - len(self._count), np.int64)
            self._start, self._count = (np.concatenate([a, more]) for a in (self._start,
                                                                             self._count))


class _Moves(NamedTuple):
    """Where one step takes the feature maps of some states: for each state left and
    each state reached, the (parameters, FLOPs) no other option between them beats
    (`cheapest`), and the most parameters and the most FLOPs an option costs (`dearest`,
    one point). `*_origin` holds the state each move leaves (sorted)."""

    cheapest_origin: np.ndarray
    cheapest: _Points
    dearest_origin: np.ndarray
    dearest: _Points


class _Step:
    """One part of every trunk stage, its convolutions or its pool, on any feature map.

    Every stage has the same options, so what they do to a feature map of one shape is
    worked out once, whatever the stage, and for many shapes at once. A stage's pool
    knobs are independent of its convolutions' (no condition joins them), so a stage
    is its convolutions, then its pool, through the map the first leaves.

    Args:
        knobs: The distinct `ConvKnobs` (or `PoolKnobs`) of the options.
        costs: `nas.architecture.conv_costs` (or `pool_costs`).
        dtype: What to weigh in: int64 is fast, Python integers (object) never overflow.
        channels: The channels every feature map the step leaves is taken to have
            (None: the ones it has), for bounds (see `space_costs`).
    """

    def __init__(self, knobs: list[tuple], costs, dtype, channels: int | None = None):
        self.knobs = type(knobs[0])(*(np.array(column, dtype=dtype) for column in zip(*knobs)))
        self._costs, self.dtype, self._channels = costs, dtype, channels
        self._cheapest, self._dearest = _Table(dtype), _Table(dtype)
        self._weighed: set[int] = set()

    def most(self, shape: tuple) -> int:
        """The most parameters or FLOPs one option costs on a feature map of `shape`."""
        heights, widths, _, params, flops = self._costs(shape, self.knobs)
        fits = (heights >= 1) & (widths >= 1)
        return int(max(params[fits].max(initial=0), flops[fits].max(initial=0)))

    def moves(self, sources: np.ndarray, states: _States, budget: _Budget) -> _Moves:
        """Where the options take the feature maps of `sources` (state numbers, sorted)."""
        new = np.array([n for n in sources.tolist() if n not in self._weighed], np.int64)
        options = len(self.knobs[0])
        budget.spend(len(new) * options)
        rows = max(1, _CHUNK // options)
        for first in range(0, len(new), rows):
            self._weigh(new[first:first + rows], states)
        self._weighed.update(new.tolist())
        return _Moves(*self._cheapest.gather(sources), *self._dearest.gather(sources))

    def _weigh(self, numbers: np.ndarray, states: _States) -> None:
        """Weigh every option on the feature map of each state in `numbers` (a row each)."""
        shapes = np.array([states.shape[n] for n in numbers.tolist()], dtype=self.dtype)
        heights, widths, left, params, flops = self._costs(tuple(shapes.T[:, :, None]),
                                                           self.knobs)
        if self._channels is not None:
            left = self._channels
        heights, widths, left, params, flops = np.broadcast_arrays(heights, widths, left,
                                                                   params, flops)
        fits = (heights >= 1) & (widths >= 1)
        if not fits.any():
            return
        heights, widths, left, params, flops = (a[fits] for a in (heights, widths, left,
                                                                  params, flops))
        # The shape each option leaves, as one number: (height, width, channels).
        tall, deep = int(widths.max()) + 1, int(left.max()) + 1
        codes, reached = np.unique(((heights * tall + widths) * deep + left).astype(np.int64),
                                   return_inverse=True)
        ends = np.array([states((c // deep // tall, c // deep % tall, c % deep))
                         for c in codes.tolist()], np.int64)
        # One number per (state left, state reached) pair, weighed apart.
        rows = np.broadcast_to(np.arange(len(numbers))[:, None], fits.shape)[fits]
        pair = rows * len(ends) + reached.reshape(-1)
        cheapest, _ = _fronts(_Points.exact(pair, params, flops))
        self._cheapest.add(numbers[cheapest.state // len(ends)],
                           cheapest._replace(state=ends[cheapest.state % len(ends)]))
        present = np.flatnonzero(np.bincount(pair, minlength=len(numbers) * len(ends)))
        most = []
        for cost in (params, flops):
            top = np.zeros(len(numbers) * len(ends), dtype=self.dtype)
            np.maximum.at(top, pair, cost)
            most.append(top[present])
        self._dearest.add(numbers[present // len(ends)],
                          _Points.exact(ends[present % len(ends)], *most))


class _Head:
    """The heads a trunk can end with, weighed on the shape it ends in: moves from the
    trunk's last state to `_END`, as `_Step`'s (`dtype` too)."""

    def __init__(self, specs: list[HyperparameterSpec], num_classes: int, dtype):
        self.dtype = dtype
        self.reduces = list(assignments([s for s in specs if s.name == "reduce"]))
        # A dropout rate costs nothing: one rate stands for all (they are counted apart).
        stacks = list(assignments([
            dataclasses.replace(s, knob=Knob(s.knob.type, choices=(s.knob.lowest(),)))
            if s.name.endswith("/dropout") else s for s in specs if s.name != "reduce"]))

        def dense(width: int) -> list[tuple[int, int]]:
            costs = []
            for stack in stacks:
                builder = Builder((width,))
                builder.dense(stack, num_classes)
                costs.append(_total(builder))
            return costs

        # A dense stack's costs grow linearly with the width it is given (its first
        # layer alone reads it): weighed at widths 1 and 2, they are known at all widths.
        one, two = dense(1), dense(2)
        self.slope, self.base = (np.array(pairs, dtype=dtype).T for pairs in (
            [(p2 - p1, f2 - f1) for (p1, f1), (p2, f2) in zip(one, two)],
            [(2 * p1 - p2, 2 * f1 - f2) for (p1, f1), (p2, f2) in zip(one, two)]))
        self._cheapest, self._dearest = _Table(dtype), _Table(dtype)
        self._weighed: set[int] = set()

    def costs(self, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        """(parameters, FLOPs) of every head on a trunk that ends in `shape`."""
        params, flops = [], []
        for reduce in self.reduces:
            builder = Builder(shape)
            builder.reduce(reduce)
            (width,), (reduce_params, reduce_flops) = builder.shape, _total(builder)
            params.append(reduce_params + self.slope[0] * width + self.base[0])
            flops.append(reduce_flops + self.slope[1] * width + self.base[1])
        return np.concatenate(params), np.concatenate(flops)

    def most(self, shape: tuple) -> int:
        """The most parameters or FLOPs one head costs on a trunk that ends in `shape`."""
        return int(max(array.max() for array in self.costs(shape)))

    def moves(self, sources: np.ndarray, states: _States, budget: _Budget) -> _Moves:
        """The heads on the trunks ending at `sources` (state numbers, sorted)."""
        new = [number for number in sources.tolist() if number not in self._weighed]
        if new:
            budget.spend(len(new) * len(self.reduces) * self.slope.shape[1])
            costs = [self.costs(states.shape[number]) for number in new]
            origin = np.repeat(np.array(new, np.int64), [len(params) for params, _ in costs])
            params, flops = (np.concatenate(column) for column in zip(*costs))
            cheapest, _ = _fronts(_Points.exact(origin, params, flops))
            self._cheapest.add(cheapest.state,
                               cheapest._replace(state=np.full(cheapest.size, _END)))
            self._dearest.add(np.array(new, np.int64), _Points.exact(
                np.full(len(new), _END), *(np.array([cost.max() for cost in column],
                                                        dtype=self.dtype)
                                               for column in zip(*costs))))
            self._weighed.update(new)
        return _Moves(*self._cheapest.gather(sources), *self._dearest.gather(sources))


class _Level(NamedTuple):
    """The trunk prefixes of one length: their front at each state they reach, and the
    most parameters and FLOPs of a prefix reaching each state (-1: none does)."""

    front: _Points
    dearest_params: np.ndarray
    dearest_flops: np.ndarray


def _follow(level: _Level, step: _Step | _Head, states: _States, work: int,
            budget: _Budget) -> tuple[_Level, bool]:
    """The prefixes one step longer: each one followed by each of the step's moves.

    When the front would make more than `work` candidate points, it is thinned first
    (see `_fronts`); also returns whether it was.
    """
    dtype = level.dearest_params.dtype
    moves = step.moves(np.unique(level.front.state), states, budget)
    front, thinned = level.front, False
    origin = moves.cheapest_origin
    low = np.searchsorted(origin, front.state, "left")
    many = np.searchsorted(origin, front.state, "right") - low
    if many.sum() > work:
        front, thinned = _fronts(front, max(1, work // moves.cheapest.size))
        low = np.searchsorted(origin, front.state, "left")
        many = np.searchsorted(origin, front.state, "right") - low
    budget.spend(int(many.sum()) + moves.dearest.size)
    point = np.repeat(np.arange(front.size), many)
    move = np.repeat(low - (np.cumsum(many) - many), many) + np.arange(many.sum())
    cheapest = moves.cheapest
    joined = _Points(cheapest.state[move], front.params[point] + cheapest.params[move],
                     front.flops[point] + cheapest.flops[move], front.real[point])
    most = []
    for before, cost in ((level.dearest_params, moves.dearest.params),
                         (level.dearest_flops, moves.dearest.flops)):
        after = np.full(len(states.shape), -1, dtype=dtype)
        np.maximum.at(after, moves.dearest.state, before[moves.dearest_origin] + cost)
        most.append(after)
    return _Level(_fronts(joined)[0], *most), thinned


class _Costs(NamedTuple):
    front: _Points
    thinned: bool
    max_params: int | None
    max_flops: int | None


def _weigh(conv: _Step, pool: _Step, head: _Head, input_shape: tuple, depths: set[int],
           work: int, budget: _Budget) -> _Costs:
    """The front and the largest costs of the possible architectures.

    A dynamic program over (stage, feature-map shape): each shape keeps the front of
    the trunk prefixes that reach it and their largest parameters and FLOPs; at each
    depth the space allows, the heads finish them. Its steps (a stage's convolutions, its
    pool, the heads) share `work` candidate points.

    Raises:
        _TooLarge: it would handle more points than `budget` allows.
    """
    work //= 2 * max(depths) + len(depths)
    states, dtype = _States(), conv.dtype
    start, zero = states(input_shape), np.zeros(1, dtype)
    level = _Level(_Points.exact([start], zero, zero),
                   *(np.zeros(len(states.shape), dtype) for _ in range(2)))
    finished, thinned, dearest = [], False, (-1, -1)
    for number in range(max(depths) + 1):
        if number in depths:
            done, cut = _follow(level, head, states, work, budget)
            finished.append(done.front)
            thinned |= cut
            dearest = (max(dearest[0], int(done.dearest_params[_END])),
                       max(dearest[1], int(done.dearest_flops[_END])))
        if number < max(depths):
            for step in (conv, pool):
                level, cut = _follow(level, step, states, work, budget)
                thinned |= cut
    front, _ = _fronts(_Points.join(finished, dtype))
    if not front.size:
        return _Costs(front, thinned, None, None)
    return _Costs(front, thinned, *dearest)


def space_costs(space: SearchSpace, convs: list[dict], pools: list[dict],
           head_specs: list[HyperparameterSpec], input_shape: tuple, num_classes: int,
           sizes: int, work: int) -> tuple[_Costs, bool]:
    """The costs of the possible architectures, and whether they are exact.

    Exact while the dynamic program handles at most `EXACT_WORK` points; its stages
    meet feature maps of `sizes` heights and widths, each with any of the space's
    filters, so it is known at once when weighing them all would pass that. Past it, it
    runs over feature-map sizes alone: every cost grows with the channels a layer is
    given, so with every stage after the first given the fewest channels the space has,
    the costs are lower bounds; given the most, upper bounds. A block's shortcut is the
    one cost that does not grow with them (a 1x1 conv only where the channels change):
    the lower bounds count it only where it strides, the upper ones everywhere.
    """
    depths = set(space.depth.values())
    conv_knobs, pool_knobs = (list(dict.fromkeys(map(type_.of, options)))
                              for type_, options in ((ConvKnobs, convs), (PoolKnobs, pools)))

    def parts(dtype, channels=None, shortcut="exact") -> tuple:
        costs = functools.partial(conv_costs, shortcut=shortcut)
        return (_Step(conv_knobs, costs, dtype, channels),
                _Step(pool_knobs, pool_costs, dtype), _Head(head_specs, num_classes, dtype))

    # No stage costs more than on the input's height and width with the most channels.
    height, width, channels = input_shape
    filters = space.filters.values()
    conv, pool, head = parts(object)
    widest = (height, width, max(channels, *filters))
    largest = max(depths) * (conv.most(widest) + pool.most(widest)) + head.most(widest)
    dtype = np.int64 if largest < 2 ** 62 else object
    if sizes * len(filters) * len(conv_knobs) <= EXACT_WORK:
        try:
            return _weigh(*parts(dtype), input_shape, depths, work, _Budget(EXACT_WORK)), True
        except _TooLarge:
            pass
    low, high = (_weigh(*parts(dtype, c, shortcut), input_shape, depths, work, _Budget(None))
                 for c, shortcut in ((min(filters), "low"), (max(filters), "high")))
    bounds = low.front._replace(real=np.zeros(low.front.size, bool))
    return _Costs(bounds, True, high.max_params, high.max_flops), False
