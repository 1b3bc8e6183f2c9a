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
little to time alone: the clock and the loop around it would be most of what is timed).
A model's weights do not change its latency, so a trial's is measured on its
architecture freshly built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import statistics
import sys
import time
from typing import Iterator

__all__ = ["ENGINES", "Latency", "measure"]

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
        threads = f"{self.threads} thread{'' if self.threads == 1 else 's'}"
        return f"TFLite, {threads}" if self.engine == "tflite" else "Keras"

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

    image = np.random.default_rng(0).random((1, *model.input_shape[1:]), dtype=np.float32)
    run = _tflite(model, image, threads) if engine == "tflite" else _keras(model, image)
    begin = time.perf_counter()
    for _ in range(warmup):
        run()
    each = (time.perf_counter() - begin) / max(1, warmup)
    in_a_row = max(1, math.ceil(SAMPLE_SECONDS / max(each, 1e-9)))
    times: list[float] = []
    for _ in range(runs):
        begin = time.perf_counter()
        for _ in range(in_a_row):
            run()
        times.append((time.perf_counter() - begin) * 1000 / in_a_row)
    quartiles = statistics.quantiles(times, n=4)
    return Latency(engine, threads, statistics.median(times), quartiles[2] - quartiles[0],
                   runs * in_a_row)


def _tflite(model, image, threads: int):
    """Convert with TensorFlow's TFLite converter; run with LiteRT's interpreter (the
    maintained home of `tf.lite.Interpreter`, which TensorFlow deprecates)."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    with _quiet():
        converted = tf.lite.TFLiteConverter.from_keras_model(model).convert()
        interpreter = Interpreter(model_content=converted, num_threads=threads)
        interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
    return interpreter.invoke


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


def _keras(model, image):
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    tensor = tf.constant(image)
    return lambda: forward(tensor).numpy()
