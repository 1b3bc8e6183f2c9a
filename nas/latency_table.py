"""A per-layer latency table: a candidate's latency predicted before any model is built.

Measuring a candidate's latency takes building and converting its model (0.3-1 s);
the guard that keeps candidates within `--max-latency-ms` runs inside the oracle, for
every candidate it proposes, and must cost what the parameter and FLOPs budgets cost.
So each layer is measured once, alone, and a candidate's latency is predicted from its
layers: what the empty model costs (its input passed through: the runtime's own work
per call) plus each layer's entry, the latency of a model of that layer alone less the
empty model's.

A layer's entry is keyed by what decides its time: its kind, its config (as
`nas.architecture.Layer.config` holds it) and the shape of its input, e.g.
`Conv2D {"filters":16,"kernel_size":3,"padding":"same","strides":1,"use_bias":true} 28x28x1`.
Any layer kind keys the same way, so a new kind needs nothing here.

The table of this machine lives in the user's cache folder, one file per CPU model,
engine and thread count (`cache_path`), and grows as a search meets new layers
(`nas.latency.measure_layers` measures them; that needs TensorFlow, this module does
not). A table measured on another device (`--latency-table`) is used as it is: it must
hold every layer a space can have (`space_layers`; `nas latency-table export` writes
them as TFLite models to time there).

What the sum leaves out: a converter that fuses a conv with the batch norm and the
activation after it runs them as one op, so the sum of the three measured alone
overestimates the fused op; a model's layers share caches a layer alone does not. The
prediction ranks candidates; the latency measured after training
(`nas.latency.measure`) is what decides whether a trial may be chosen.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Callable, Iterator

from nas.architecture import (INPUT, Architecture, Builder, Impossible, Layer, Rejection,
                              at_width, hyperparameter_specs)
from nas.counting import assignments, stage_options
from nas.errors import InputError
from nas.state import write_atomic

__all__ = ["FORMAT", "Entry", "LatencyGuard", "LatencyTable", "LatencyTableError",
           "EMPTY_MODEL", "MODELS_INDEX", "cache_path", "from_timings", "how", "key",
           "layer_inputs", "machine_key", "space_layers"]

FORMAT = "nas latency table 1"  # the `format` of the JSON file
# What `nas latency-table export` writes beside the layers' models, to time elsewhere:
MODELS_INDEX = "layers.json"  # {model file: its layer's key}
EMPTY_MODEL = "empty.tflite"  # the empty model (its input passed through)


class LatencyTableError(InputError):
    """A latency table file is missing, malformed, or lacks a layer it is asked for."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """A layer of a candidate as the table knows it: its key, the layer, its input shape."""

    key: str
    layer: Layer
    input_shapes: tuple[tuple[int, ...], ...]  # one for most layers; an Add's, two

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input_shapes[0]

    def describe(self) -> str:
        """"stage_1/conv (Conv2D 16 3x3 stride 1 same on 28x28x1)"."""
        what = f"{self.layer.kind} {self.layer.describe()}".strip()
        return f"{self.layer.name} ({what} on {_shapes(self.input_shapes)})"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _shapes(shapes) -> str:
    return " + ".join(_shape(shape) for shape in shapes)


def key(layer: Layer, input_shapes) -> str:
    """What decides a layer's time: its kind, its config, its inputs' shapes (not its
    name: two stages' equal convs on equal inputs share an entry)."""
    config = json.dumps(layer.config, sort_keys=True, separators=(",", ":"))
    return f"{layer.kind} {config} {_shapes(input_shapes)}"


def layer_inputs(architecture: Architecture) -> list[Entry]:
    """Each layer of `architecture` with the shapes of its inputs."""
    return _entries(architecture.layers, architecture.input_shape)


def _entries(layers, input_shape) -> list[Entry]:
    """`layers` (the first taking an input of `input_shape`) with their inputs' shapes:
    the outputs of the layers they name (`Layer.inputs`), else of the layer before."""
    shape = tuple(input_shape)
    outputs, entries = {INPUT: shape}, []
    for layer in layers:
        shapes = (tuple(outputs[name] for name in layer.inputs) if layer.inputs
                  else (shape,))
        entries.append(Entry(key(layer, shapes), layer, shapes))
        outputs[layer.name] = shape = tuple(layer.output_shape)
    return entries


def machine_key() -> str:
    """This machine as its table's name says it: the OS, the architecture and the CPU
    model as the OS names it ("linux-x86_64-amd-epyc-7b13"). Two machines with the same
    CPU share a table, whatever their clocks, memory and other load."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:  # Linux; elsewhere the architecture's name
            cpu = next((line.split(":", 1)[1] for line in info
                        if line.lower().startswith(("model name", "hardware"))), "")
    except OSError:
        pass
    words = f"{platform.system()} {platform.machine()} {cpu or platform.processor()}"
    return re.sub(r"[^a-z0-9._]+", "-", words.lower()).strip("-") or "unknown"


def cache_path(engine: str, threads: int) -> Path:
    """Where this machine's table for `engine` on `threads` threads lives: the user's
    cache folder ($XDG_CACHE_HOME, else ~/.cache), nas/latency/."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nas" / "latency"
    return folder / f"{machine_key()}-{_how(engine, threads)}.json"


def _how(engine: str, threads: int) -> str:
    # Keras runs on TensorFlow's own threads: its tables are not per thread count.
    return f"tflite-{threads}" if engine == "tflite" else engine


def how(engine: str, threads: int) -> str:
    """What runs a model, as people say it: "TFLite, 1 thread", "Keras"."""
    if engine != "tflite":
        return "Keras"
    return f"TFLite, {threads} thread{'' if threads == 1 else 's'}"


@dataclasses.dataclass
class LatencyTable:
    """Each layer's latency (ms at batch size 1) and the empty model's, as `engine` ran
    them on `threads` threads on `machine`.

    Attributes:
        entries: {key: ms}, the layer's time beyond the empty model's (`key`).
        overhead_ms: The empty model's latency; None until measured.
        path: The file it was read from and is saved to.
        fixed: Measured elsewhere (`--latency-table`): used as it is, never grown.
    """

    engine: str
    threads: int
    machine: str
    entries: dict[str, float] = dataclasses.field(default_factory=dict)
    overhead_ms: float | None = None
    path: Path | None = None
    fixed: bool = False

    @classmethod
    def cached(cls, engine: str, threads: int) -> "LatencyTable":
        """This machine's table for `engine` and `threads` (empty when none was measured).

        Raises:
            LatencyTableError: the cached file is malformed.
        """
        path = cache_path(engine, threads)
        if not path.exists():
            return cls(engine, threads, machine_key(), path=path)
        return dataclasses.replace(cls.load(path), path=path, fixed=False)

    @classmethod
    def load(cls, path) -> "LatencyTable":
        """The table in the JSON file `path` (see `to_dict`), fixed: it is not grown.

        Raises:
            LatencyTableError: the file is missing or not a latency table; names the file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LatencyTableError(f"{path}: no such latency table file") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            why = "not valid JSON" if isinstance(error, ValueError) else str(error)
            raise LatencyTableError(f"{path}: not a latency table ({why})") from None
        problem = _problem(data)
        if problem:
            raise LatencyTableError(f"{path}: not a latency table ({problem})")
        return cls(data["engine"], data["threads"], data["machine"], dict(data["layers"]),
                   data["overhead_ms"], path, fixed=True)

    def to_dict(self) -> dict:
        """As its file holds it."""
        return {"format": FORMAT, "machine": self.machine, "engine": self.engine,
                "threads": self.threads, "overhead_ms": self.overhead_ms,
                "layers": dict(sorted(self.entries.items()))}

    def save(self) -> None:
        """Write the table to its file, atomically, with the entries another process
        (another search on this machine) added to it meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            theirs = json.loads(self.path.read_text())
            self.entries = {**theirs.get("layers", {}), **self.entries}
        except (OSError, ValueError):  # none yet, or unreadable: ours replaces it
            pass
        write_atomic(self.path, json.dumps(self.to_dict(), indent=1) + "\n")

    def missing(self, architecture: Architecture) -> list[Entry]:
        """The layers of `architecture` the table has no entry for, each once."""
        found: dict[str, Entry] = {}
        for entry in layer_inputs(architecture):
            if entry.key not in self.entries:
                found.setdefault(entry.key, entry)
        return list(found.values())

    def predict(self, architecture: Architecture) -> float:
        """`architecture`'s latency in ms: the empty model's plus each layer's entry.

        Raises:
            LatencyTableError: a layer has no entry (see `missing`); names the layer.
        """
        lacking = self.missing(architecture)
        if lacking or self.overhead_ms is None:
            raise self.lacks(lacking)
        return self.overhead_ms + math.fsum(self.entries[entry.key]
                                            for entry in layer_inputs(architecture))

    def lacks(self, entries: list[Entry]) -> LatencyTableError:
        """The error of a table without `entries` (or without the empty model's latency)."""
        where = self.path or "the latency table"
        if not entries:
            return LatencyTableError(f"{where}: no overhead_ms (the empty model's latency)")
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        return LatencyTableError(f"{where}: no entry for the layer {entries[0].describe()}"
                                 f"{more}; key: {entries[0].key}")


def _problem(data) -> str | None:
    """What is wrong with `data` as a latency table's JSON, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for name, kind in (("engine", str), ("threads", int), ("machine", str),
                       ("layers", dict)):
        if not isinstance(data.get(name), kind):
            return f"no {name!r} ({kind.__name__})"
    for name, ms in (("overhead_ms", data.get("overhead_ms")), *data["layers"].items()):
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms >= 0:
            return f"{name}: {ms!r} is not a latency in ms (a number, at least 0)"
    return None


@dataclasses.dataclass
class LatencyGuard:
    """Rejects a candidate the table predicts over `max_ms`, as the oracle's guard
    rejects one over its parameter budget.

    `grow(table, entries)` measures the layers the table lacks into it (in the search's
    own process, with TensorFlow: `nas.latency.measure_layers`); None for a fixed table,
    which must hold them.
    """

    table: LatencyTable
    max_ms: float
    grow: Callable[[LatencyTable, list[Entry]], None] | None = None

    def predict(self, architecture: Architecture) -> float:
        """The latency of `architecture` as it is served, measuring what the table lacks
        first (and saving the table) where it grows.

        Raises:
            LatencyTableError: a fixed table lacks a layer.
        """
        served = architecture.for_serving()
        lacking = self.table.missing(served)
        if (lacking or self.table.overhead_ms is None) and self.grow is not None:
            self.grow(self.table, lacking)
            self.table.save()
        return self.table.predict(served)

    def rejection(self, architecture: Architecture) -> Rejection | None:
        predicted = self.predict(architecture)
        if predicted <= self.max_ms:
            return None
        return Rejection("max_latency_ms", f"predicted {predicted:.3g} ms > max_latency_ms "
                                           f"{self.max_ms:g}")


def space_layers(space, input_shape, num_classes: int, pixel_scale: float = 1.0
                 ) -> dict[str, Entry]:
    """Every layer a candidate of `space` on `input_shape` can have, as served, by key.

    The stages are walked feature map by feature map (the layers a stage's options add
    depend on the map it receives, not on how it got there), then the heads on each map
    a trunk can end with. A continuous knob that changes a layer (a dropout range without
    a step) counts at its lowest value only, as `nas.space` counts it.
    """
    found: dict[str, Entry] = {}
    resolutions = space.resolution.values() if space.resolution is not None else [None]
    for resolution in resolutions:
        for width in space.width.values():  # every stage's filters scaled, one space each
            _walk(at_width(space, width), input_shape, num_classes, pixel_scale, resolution,
                  found)
    return found


def _walk(space, input_shape, num_classes: int, pixel_scale: float, resolution,
          found: dict[str, Entry]) -> None:
    """`space_layers` of a space with no width and no resolution, its images resized to
    `resolution` first (None: not), into `found`."""
    specs = hyperparameter_specs(space)
    convs, pools = stage_options(specs)
    head = [s for s in specs if s.name == "reduce" or s.name.startswith("dense_")]
    depths = set(space.depth.values())

    def add(builder: Builder, shape) -> None:
        for entry in _entries(builder.layers, shape):
            found.setdefault(entry.key, entry)

    start = Builder(tuple(input_shape))
    start.add("rescaling", "Rescaling", {"scale": 1.0 / pixel_scale, "offset": 0.0},
              start.shape, 0, 0)
    start.resize(resolution)
    add(start, input_shape)
    maps = {start.shape}
    for stage in range(1, max(depths) + 1):
        after = set()
        for shape, values in _stage_options(maps, convs, pools, stage):
            builder = Builder(shape)
            try:
                builder.stage(stage, values)
            except Impossible:
                continue
            add(builder, shape)
            after.add(builder.shape)
        maps = after
        if stage in depths:
            for shape in maps:
                for values in assignments(head):
                    builder = Builder(shape)
                    builder.head(values, num_classes)
                    add(builder, shape)


def _stage_options(maps, convs, pools, stage: int) -> Iterator[tuple[tuple, dict]]:
    for shape in sorted(maps):
        for conv in convs:
            for pool in pools:
                yield shape, {f"stage_{stage}/{name}": value
                              for name, value in {**conv, **pool}.items()}


def from_timings(folder, timings, machine: str, threads: int) -> LatencyTable:
    """The table of the TFLite models `nas latency-table export` wrote to `folder`, from
    `timings`: a text file of lines "MODEL_FILE MICROSECONDS" (as TFLite's
    `benchmark_model` reports "Inference (avg)"), one per model, the empty model's too,
    timed on the device `machine` on `threads` threads.

    Raises:
        LatencyTableError: the index or the timings are missing or malformed, or a
            model has no timing; names the file (and the line or the model).
    """
    index_path = Path(folder) / MODELS_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        raise LatencyTableError(f"{index_path}: not the index `nas latency-table export` "
                                f"writes") from None
    timings = Path(timings)
    try:
        lines = timings.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise LatencyTableError(f"{timings}: cannot be read ({error})") from None
    measured: dict[str, float] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        words = line.split()
        try:
            name, microseconds = Path(words[0]).name, float(words[1])
        except (IndexError, ValueError):
            raise LatencyTableError(f"{timings}:{number}: {line.strip()!r} is not "
                                    f"\"MODEL_FILE MICROSECONDS\"") from None
        measured[name] = microseconds / 1000
    lacking = [name for name in [EMPTY_MODEL, *index] if name not in measured]
    if lacking:
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise LatencyTableError(f"{timings}: no timing of {lacking[0]}{more}")
    overhead = measured[EMPTY_MODEL]
    return LatencyTable("tflite", threads, machine,
                        {key: max(0.0, measured[name] - overhead) for name, key in index.items()},
                        overhead)
