"""The latency figure (issue 23): how repeatable `nas.latency.measure` is.

    python bench/run.py --only latency

Candidates of the `cnn` space on Fashion-MNIST's 28x28 images, drawn as a random search
draws them, each measured `REPEATS` times in a row by each engine (TFLite on one thread,
Keras's forward pass); per model, the coefficient of variation (sd / mean) of its
repeated medians. Target: <= 5% for every model. Also what a measurement costs a trial
(the wall time of one `measure`, conversion included).
"""

from __future__ import annotations

import statistics
import time

REPEATS = 5
MODELS = 8
TARGET_CV = 0.05


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
