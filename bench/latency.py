"""The latency figures (issue 23): how repeatable `nas.latency.measure` is, and how well
the per-layer table (`nas.latency_table`) predicts it.

    python bench/run.py --only latency
    python bench/run.py --only latency --latency-space mobile --latency-candidates 50

Repeatability: candidates of the `cnn` space on Fashion-MNIST's 28x28 images, drawn as a
random search draws them, each measured `REPEATS` times in a row by each engine (TFLite
on one thread, Keras's forward pass); per model, the coefficient of variation (sd / mean)
of its repeated medians. Target: <= 5% for every model. Also what a measurement costs a
trial (the wall time of one `measure`, conversion included).

Prediction: `CANDIDATES` candidates of a space (`--latency-space`, a built-in name or a
YAML file) on the same images, drawn as a random search draws them; each one's latency
predicted by a per-layer table measured afresh for this run (TFLite, one thread; in a
temporary cache folder, so the table's own cost is measured too), then measured whole.
The Spearman rank correlation of predicted and measured latencies, beside FLOPs' (how
well counting FLOPs would rank the same candidates). Target: the table ranks at least
as well as FLOPs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

TARGET_SPEARMAN = 0.9  # issue 23: the table's rank correlation with measured latency
REPEATS = 5
MODELS = 8
TARGET_CV = 0.05
CANDIDATES = 50
QUICK_CANDIDATES = 15


def figure_latency(table, log, quick: bool = False) -> None:
    from nas import latency
    from nas.models import build_model
    from nas.space import sample
    from nas.specs import load_space

    models = 2 if quick else MODELS
    candidates, _ = sample(load_space("cnn"), (28, 28, 1), 10, models, seed=0,
                           pixel_scale=255.0)
    for engine in latency.ENGINES:
        worst, cost, rows = 0.0, [], []
        for architecture in candidates:
            model = build_model(architecture.for_serving(), jit_compile=False)
            medians = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                medians.append(latency.measure(model, engine).median_ms)
                cost.append(time.perf_counter() - start)
            cv = statistics.stdev(medians) / statistics.mean(medians)
            worst = max(worst, cv)
            rows.append(f"{architecture.flops / 1e6:.1f}M FLOPs: {statistics.mean(medians):.3f}"
                        f" ms, CV {cv:.1%}")
            log(f"latency ({engine}): {rows[-1]}")
        table.add(f"latency: worst CV of {REPEATS} repeats, {len(candidates)} models "
                  f"({engine})", f"{worst:.3f}", "-", "-", f"<= {TARGET_CV}",
                  worst <= TARGET_CV)
        table.notes.append(
            f"latency ({engine}{', 1 thread' if engine == 'tflite' else ''}): per model, "
            f"the mean of {REPEATS} repeated medians and their CV: {'; '.join(rows)}; one "
            f"measurement takes {statistics.median(cost):.2f} s (median; at most "
            f"{max(cost):.2f} s), conversion included")


def figure_prediction(table, log, space: str = "cnn", candidates: int | None = None,
                      quick: bool = False) -> None:
    """The per-layer table's predictions against measured latency (see the module)."""
    import numpy as np

    from nas import latency
    from nas.latency_table import LatencyGuard, LatencyTable
    from nas.models import build_model
    from nas.space import sample
    from nas.specs import load_space

    count = candidates or (QUICK_CANDIDATES if quick else CANDIDATES)
    chosen = load_space(space)
    drawn, _ = sample(chosen, (28, 28, 1), 10, count, seed=0, pixel_scale=255.0)
    before = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="nas-latency-table-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache  # a table measured afresh, never the user's
        try:
            guard = LatencyGuard(LatencyTable.cached("tflite", 1), float("inf"),
                                 latency.measure_layers)
            start = time.perf_counter()
            predicted = [guard.predict(architecture) for architecture in drawn]
            building = time.perf_counter() - start
        finally:
            if before is None:
                os.environ.pop("XDG_CACHE_HOME")
            else:
                os.environ["XDG_CACHE_HOME"] = before
    layers = len(guard.table.entries)
    log(f"latency prediction: a table of {layers} layers measured in {building:.0f} s")
    measured = []
    for architecture, guess in zip(drawn, predicted):
        model = build_model(architecture.for_serving(), jit_compile=False)
        measured.append(latency.measure(model, "tflite").median_ms)
        log(f"latency prediction: {architecture.flops / 1e6:.2f}M FLOPs, predicted "
            f"{guess:.4f} ms, measured {measured[-1]:.4f} ms")
    flops = [architecture.flops for architecture in drawn]
    by_table, by_flops = _spearman(predicted, measured), _spearman(flops, measured)
    table.add(f"latency: Spearman, table's prediction vs measured, {len(drawn)} of {space}",
              f"{by_table:.3f}", f"{by_flops:.3f}", "-",
              f">= {TARGET_SPEARMAN} (baseline: FLOPs')", by_table >= TARGET_SPEARMAN)
    ratios = np.array(predicted) / np.array(measured)
    table.notes.append(
        f"latency prediction ({space}, 28x28x1, TFLite, 1 thread): {len(drawn)} candidates "
        f"drawn as a random search draws them (seed 0); predicted / measured: median "
        f"{np.median(ratios):.2f}, from {ratios.min():.2f} to {ratios.max():.2f}; measured "
        f"{min(measured):.4f} to {max(measured):.4f} ms; the table: {layers} layers and the "
        f"empty model ({guard.table.overhead_ms:.4f} ms), measured in {building:.0f} s; "
        f"baseline = FLOPs' Spearman with the measured latencies")


def _spearman(a, b) -> float:
    """Spearman's rank correlation of `a` and `b`: the Pearson correlation of their ranks,
    ties ranked by their mean rank (as scipy.stats.spearmanr, which is not a dependency)."""
    import numpy as np

    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values):
    import numpy as np

    values = np.asarray(values, dtype=float)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # the mean rank (from 1) of each distinct value, given to every one equal to it
    mean_rank = np.cumsum(counts) - (counts - 1) / 2
    return mean_rank[inverse]
