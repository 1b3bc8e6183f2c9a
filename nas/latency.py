"""How long a model takes to classify one image, measured on this machine.

A latency a person names (a phone, a CPU service) is what a deployed model must meet, and
FLOPs are a poor stand-in for it: a depthwise conv has few FLOPs and is slow per FLOP on
most CPUs. `measure` times a Keras model at batch size 1, as it will be served:

- `tflite` (the default): converted by TensorFlow's TFLite converter and run by LiteRT's
  interpreter (`ai_edge_litert`, TFLite's runtime, with its default XNNPACK delegate on
  a CPU) on a fixed number of threads, as a phone or an embedded CPU runs it;
- `keras`: the model's own forward pass, traced once (`tf.function`), as a TensorFlow
  service runs a SavedModel.

Warm-up runs first (the first calls allocate and, for TFLite, pick kernels), then the
median of `RUNS` timed samples, with their spread (the interquartile range): one slow
run, another process's burst on a shared CPU, moves neither. A sample times as many runs
in a row as take `SAMPLE_SECONDS` (one run of a small model takes microseconds, too
little to time alone: the clock and the loop around it would be most of what is timed);
Python's garbage collector is off while they run, as `timeit` has it.
A model's weights do not change its latency, so a trial's is measured on its
architecture freshly built.

`measure_layers` measures layers one at a time into a per-layer table
(`nas.latency_table`), from which the guard predicts a candidate's latency before it is
trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import math
import os
import statistics
import sys
import time
from typing import Iterator

__all__ = ["ENGINES", "Latency", "measure", "measure_layers", "write_layer_models"]

ENGINES = ("tflite", "keras")
WARMUP = 10  # runs before timing
RUNS = 100  # timed samples; their median is the latency
SAMPLE_SECONDS = 0.002  # a sample times as many runs in a row as take this long


@dataclasses.dataclass(frozen=True)
class Latency:
    """A model's measured latency at batch size 1."""

    engine: str
    threads: int
    median_ms: float
    spread_ms: float  # the interquartile range of the timed runs
    runs: int  # timed in all

    def metrics(self) -> dict:
        """As a run logs it."""
        return {"latency_ms": self.median_ms, "latency_spread_ms": self.spread_ms}

    @property
    def how(self) -> str:
        """What ran it: "TFLite, 1 thread", "Keras"."""
        from nas.latency_table import how

        return how(self.engine, self.threads)

    def describe(self) -> str:
        return (f"{self.median_ms:.3f} ms at batch size 1 ({self.how}; {self.runs} runs "
                f"timed, spread {self.spread_ms:.3f} ms)")


def measure(model, engine: str = "tflite", threads: int = 1, runs: int = RUNS,
            warmup: int = WARMUP) -> Latency:
    """The latency of the Keras `model` (one image in, class probabilities out) at batch
    size 1, run by `engine` on `threads` threads (`keras`: TensorFlow's own setting)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown latency engine {engine!r}; one of {list(ENGINES)}")
    if threads < 1:
        raise ValueError(f"threads: {threads} must be at least 1")
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.random((1, *tensor.shape[1:]), dtype=np.float32) for tensor in model.inputs]
    run = _tflite(model, images, threads) if engine == "tflite" else _keras(model, images)
    begin = time.perf_counter()
    for _ in range(warmup):
        run()
    each = (time.perf_counter() - begin) / max(1, warmup)
    in_a_row = max(1, math.ceil(SAMPLE_SECONDS / max(each, 1e-9)))
    times: list[float] = []
    with _no_garbage_collection():
        for _ in range(runs):
            begin = time.perf_counter()
            for _ in range(in_a_row):
                run()
            times.append((time.perf_counter() - begin) * 1000 / in_a_row)
    quartiles = statistics.quantiles(times, n=4)
    return Latency(engine, threads, statistics.median(times), quartiles[2] - quartiles[0],
                   runs * in_a_row)


def measure_layers(table, entries, runs: int = RUNS) -> None:
    """Measure each of `entries` (`nas.latency_table.Entry`: a layer and its input shape)
    into `table` (a `nas.latency_table.LatencyTable`), and the empty model's latency
    first when the table has none, as the table's engine runs them on its threads.

    A layer is measured as a model of it alone (`nas.models.layer_model`, built as a
    candidate's layers are); its entry is that model's latency less the empty model's
    (the runtime's own work per call, counted once per candidate), at least 0.
    """
    from nas.models import layer_model

    if table.overhead_ms is None:
        shape = entries[0].input_shape if entries else (1, 1, 1)
        table.overhead_ms = measure(layer_model(None, shape), table.engine, table.threads,
                                    runs).median_ms
    for entry in entries:
        model = layer_model(entry.layer, *entry.input_shapes)
        measured = measure(model, table.engine, table.threads, runs).median_ms
        table.entries[entry.key] = max(0.0, measured - table.overhead_ms)


def write_layer_models(entries, folder) -> None:
    """Each of `entries` (`nas.latency_table.Entry`) as a TFLite model of it alone,
    `folder`/00001.tflite..., the empty model (`nas.latency_table.EMPTY_MODEL`) and their
    index (`nas.latency_table.MODELS_INDEX`): what to time on another device, for
    `nas.latency_table.from_timings`."""
    import json
    from pathlib import Path

    from nas.latency_table import EMPTY_MODEL, MODELS_INDEX
    from nas.models import layer_model

    folder = Path(folder)
    shape = entries[0].input_shape if entries else (1, 1, 1)
    (folder / EMPTY_MODEL).write_bytes(_converted(layer_model(None, shape)))
    index = {}
    for number, entry in enumerate(entries, 1):
        name = f"{number:05d}.tflite"
        (folder / name).write_bytes(_converted(layer_model(entry.layer, *entry.input_shapes)))
        index[name] = entry.key
    (folder / MODELS_INDEX).write_text(json.dumps(index, indent=1) + "\n")


def _converted(model) -> bytes:
    """`model` converted by TensorFlow's TFLite converter."""
    import tensorflow as tf

    with _quiet():
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def _tflite(model, images, threads: int):
    """Convert with TensorFlow's TFLite converter; run with LiteRT's interpreter (the
    maintained home of `tf.lite.Interpreter`, which TensorFlow deprecates)."""
    from ai_edge_litert.interpreter import Interpreter

    converted = _converted(model)
    with _quiet():
        interpreter = Interpreter(model_content=converted, num_threads=threads)
        interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():  # in TFLite's order, not always Keras's
        image = next(image for image in images if image.shape == tuple(detail["shape"]))
        interpreter.set_tensor(detail["index"], image)
    return interpreter.invoke


@contextlib.contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """Python's collector off while runs are timed (as `timeit` does): a collection the
    Keras engine's allocations set off would land in one sample and not the next."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TFLite's converter prints where it saved the model (stdout) and LiteRT that it made
    an XNNPACK delegate (stderr, from C++): neither is the user's business."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _keras(model, images):
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    tensor = [tf.constant(image) for image in images] if len(images) > 1 else tf.constant(
        images[0])
    return lambda: forward(tensor).numpy()
