"""Benchmarks of issue 5: what a search costs beyond its training, and how well it searches.

    python bench/run.py                  # every figure (about 10 minutes on 2 cores)
    python bench/run.py --quick          # smaller sizes: a smoke run of every figure
    python bench/run.py --only memory    # one figure (repeatable: --only data --only startup)
    python bench/run.py --only quality --tuners random,bayesian,hyperband
    python bench/run.py --only shapes    # the quality comparison on generated shapes
    python bench/run.py --only fashion --time-limit 30m   # real data (bench/fashion.py)
    python bench/run.py --only space     # how long looking at a space takes (bench/spaces.py)
    python bench/run.py --only scale     # a search on Ray: driver and store per trial
    python bench/run.py --only latency   # how repeatable a model's measured latency is,
                                         # how well the per-layer table predicts it
    python bench/run.py --only latency --latency-space mobile --latency-candidates 50

Prints one table (figure, nas, baseline, ratio, target, ok) and exits 1 when a target is
missed. Every baseline is measured by this same run. Each measurement runs in a fresh
Python process (this script with `--worker`), so TensorFlow start-up, MLflow autolog's
patches and the memory of one measurement never leak into another. Every tracking store
and working folder lives in a temporary folder, never in the repository.

The parent process imports neither TensorFlow nor Keras; progress goes to stderr and the
table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blocks
import fashion
import latency
import scale
import spaces
from baselines import small_cnn_build
from runs import search_runs

FIGURES = ("overhead", "startup", "memory", "rejection", "space", "data", "quality", "shapes",
           "images", "augment", "fashion", "scale", "latency", "blocks")
_RESULT = "BENCH_RESULT "
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
_ENV.pop("MLFLOW_TRACKING_URI", None)


# --- sizes ---------------------------------------------------------------------------

FULL = dict(q_trials=10, q_epochs=20, q_seeds=(0, 1, 2, 3, 4), s_per_class=200, s_size=16,
            s_seeds=(0, 1, 2), i_small=2000, i_large=20000, i_size=64, a_seeds=(0, 1, 2, 3, 4),
            a_trials=10,
            trials=10, epochs=10, seeds=(0, 1, 2), mem_trials=35, mem_epochs=2, mem_early=5,
            mem_late=30, decisions=5000, builds=30, data_epochs=5, data_rounds=5,
            startup_repeats=3)
QUICK = dict(q_trials=3, q_epochs=3, q_seeds=(0, 1), s_per_class=30, s_size=16, s_seeds=(0,),
             i_small=200, i_large=2000, i_size=32, a_seeds=(0,), a_trials=3,
             trials=3, epochs=3, seeds=(0,), mem_trials=8, mem_epochs=1, mem_early=2,
             mem_late=8, decisions=500, builds=5, data_epochs=2, data_rounds=2,
             startup_repeats=2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- running workers -----------------------------------------------------------------


def run_worker(name: str, cwd: Path, **kwargs) -> tuple[dict, float]:
    """Run `name` in a fresh Python; return its result and the process's wall time."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, json.dumps(kwargs)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=_ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT):]), wall


def nas_executable() -> str:
    beside = Path(sys.executable).with_name("nas")
    return str(beside) if beside.exists() else (shutil.which("nas") or "nas")


def default_tuner() -> str:
    """The `--tuner` default of `nas search` (read from the CLI, so it follows changes)."""
    from nas import cli  # click only: no TensorFlow

    return next(p.default for p in cli.main.commands["search"].params if p.name == "tuner")


def default_ensemble() -> int:
    """The `--ensemble` default of `nas search`."""
    from nas import cli

    return next(p.default for p in cli.main.commands["search"].params if p.name == "ensemble")


class NasSearches:
    """`nas search` runs as a user starts them (the CLI, as a subprocess), cached by settings."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[tuple, dict] = {}

    def get(self, seed: int, trials: int, epochs: int, tuner: str | None = None) -> dict:
        key = (seed, trials, epochs, tuner)
        if key not in self.done:
            self.done[key] = self._run(seed, trials, epochs, tuner)
        return self.done[key]

    def _run(self, seed, trials, epochs, tuner) -> dict:
        folder = Path(tempfile.mkdtemp(prefix=f"search-s{seed}-", dir=self.root))
        uri = f"sqlite:///{folder}/mlflow.db"
        command = [nas_executable(), "search", "--max-trials", str(trials), "--epochs",
                   str(epochs), "--seed", str(seed), "--tracking-uri", uri, "--workdir",
                   str(folder / "work"), "--experiment", "bench"]
        if tuner:
            command += ["--tuner", tuner]
        log(f"nas search: seed {seed}, {trials} trials x {epochs} epochs, "
            f"tuner {tuner or default_tuner()} (default space)")
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=_ENV, capture_output=True, text=True)
        process_wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"nas search failed (exit {done.returncode}):\n"
                               f"{done.stderr[-3000:]}")
        found = read_store(uri)
        found.update(process_wall=process_wall, uri=uri, folder=str(folder))
        log(f"  best val_accuracy {found['best']:.4f}; parent run {found['search_wall']:.1f} s, "
            f"fits {found['fit_sum']:.1f} s, process {process_wall:.1f} s")
        return found


def read_store(uri: str) -> dict:
    """A finished search's parent run (wall, best) and its trials' fit times."""
    parent, trials = search_runs(uri)
    fits = [r.data.metrics.get("fit_time_s", 0.0) for r in trials]
    return {
        "search_wall": (parent.info.end_time - parent.info.start_time) / 1000.0,
        "fit_sum": sum(fits),
        "trials": len(trials),
        "best": parent.data.metrics.get("best_objective", float("nan")),
    }


# --- the table -----------------------------------------------------------------------


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.notes: list[str] = []

    def add(self, figure, nas, baseline, ratio, target, ok: bool | None) -> None:
        self.rows.append((figure, nas, baseline, ratio, target,
                          "info" if ok is None else ("yes" if ok else "NO")))

    def missed(self) -> list[str]:
        return [row[0] for row in self.rows if row[5] == "NO"]

    def render(self) -> str:
        rows = [("figure", "nas", "baseline", "ratio", "target", "ok")] + self.rows
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])


# --- figures (parent side) -----------------------------------------------------------


def figure_overhead(table: Table, sizes: dict, searches: NasSearches, root: Path) -> None:
    trials, epochs = sizes["trials"], sizes["epochs"]
    nas = searches.get(0, trials, epochs)
    log(f"baseline: KerasTuner RandomSearch + mlflow.tensorflow.autolog, {trials} x {epochs}")
    folder = Path(tempfile.mkdtemp(prefix="baseline-", dir=root))
    base, base_process = run_worker("baseline", folder, build="same_knobs", autolog=True,
                                    trials=trials, epochs=epochs, seed=0, folder=str(folder))
    log(f"  search() {base['search_wall']:.1f} s, fits {base['fit_sum']:.1f} s, "
        f"process {base_process:.1f} s")
    nas_ratio = nas["search_wall"] / nas["fit_sum"]
    # The baseline's fits are timed inside model.fit (on_train_begin to on_train_end):
    # timed around model.fit they would also hold autolog's own run and model logging,
    # hiding the cost the baseline is there to show.
    base_ratio = base["search_wall"] / base["train_sum"]
    table.add(f"overhead: search wall / sum of fits ({trials}x{epochs})", f"{nas_ratio:.3f}",
              f"{base_ratio:.3f}", f"{nas_ratio / base_ratio:.2f}", "nas <= 1.05",
              nas_ratio <= 1.05)
    nas_e2e = nas["process_wall"] / nas["fit_sum"]
    base_e2e = base_process / base["train_sum"]
    table.add("overhead end to end: process / sum of fits", f"{nas_e2e:.3f}", f"{base_e2e:.3f}",
              f"{nas_e2e / base_e2e:.2f}", "(informational)", None)
    table.notes.append(
        f"overhead: nas = parent run {nas['search_wall']:.1f} s over {nas['trials']} trial "
        f"runs' fit_time_s {nas['fit_sum']:.1f} s (process {nas['process_wall']:.1f} s); "
        f"baseline = KerasTuner search() {base['search_wall']:.1f} s over the training "
        f"inside its {base['trials']} model.fit calls {base['train_sum']:.1f} s (process "
        f"{base_process:.1f} s); timed around model.fit, autolog's run and model logging "
        f"included, its fits took {base['fit_sum']:.1f} s (ratio "
        f"{base['search_wall'] / base['fit_sum']:.3f})")


def figure_startup(table: Table, sizes: dict, searches: NasSearches, root: Path) -> None:
    repeats = sizes["startup_repeats"]
    if searches.done:
        uri = next(iter(searches.done.values()))["uri"]
    else:  # a small finished search to list
        folder = Path(tempfile.mkdtemp(prefix="startup-", dir=root))
        uri = f"sqlite:///{folder}/mlflow.db"
        log("start-up: a small search to list")
        subprocess.run([nas_executable(), "search", "--space", "tiny", "--max-trials", "2",
                        "--epochs", "1", "--tracking-uri", uri, "--workdir",
                        str(folder / "work"), "--experiment", "bench"],
                       cwd=folder, env=_ENV, check=True, capture_output=True)

    def best_of(command) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, cwd=root, env=_ENV, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        return min(times)

    log(f"start-up: best of {repeats}")
    tf_import = best_of([sys.executable, "-c", "import tensorflow"])
    bare = best_of([sys.executable, "-c", "pass"])
    for label, command in (("nas --help", [nas_executable(), "--help"]),
                           ("nas trials", [nas_executable(), "trials", "--tracking-uri", uri])):
        seconds = best_of(command)
        table.add(f"start-up: {label} (s)", f"{seconds:.2f}", f"{tf_import:.2f}",
                  f"{seconds / tf_import:.2f}", "nas < 0.5 s", seconds < 0.5)
    table.notes.append(f"start-up: baseline = python -c 'import tensorflow'; best of {repeats} "
                       f"subprocess runs each; a bare `python -c pass` takes {bare:.2f} s")


def figure_memory(table: Table, sizes: dict, root: Path) -> None:
    early, late = sizes["mem_early"], sizes["mem_late"]
    log(f"memory: {sizes['mem_trials']} trials x {sizes['mem_epochs']} epochs, cnn space")
    folder = Path(tempfile.mkdtemp(prefix="memory-", dir=root))
    mem, _ = run_worker("memory", folder, trials=sizes["mem_trials"],
                        epochs=sizes["mem_epochs"], folder=str(folder))
    samples = {int(k): v for k, v in mem["samples"].items()}
    if late not in samples or early not in samples:
        raise RuntimeError(f"memory: the search finished only {sorted(samples)} trials")
    rss_early, peak_early = samples[early]
    rss_late, peak_late = samples[late]
    ratio = peak_late / rss_early
    table.add(f"memory: peak RSS after trial {late} / RSS after {early} (MB)",
              f"{peak_late:.0f}", f"{rss_early:.0f}", f"{ratio:.3f}", "ratio <= 1.10",
              ratio <= 1.10)
    table.add(f"memory: RSS after trial {late} / RSS after {early} (MB)", f"{rss_late:.0f}",
              f"{rss_early:.0f}", f"{rss_late / rss_early:.3f}", "(informational)", None)
    curve = ", ".join(f"{n}: {samples[n][0]:.0f}" for n in sorted(samples)
                      if n in (1, 2, early, 10, 15, 20, 25, late, max(samples)))
    table.notes.append(f"memory: one search of {len(samples)} trials (cnn space, "
                       f"{sizes['mem_epochs']} epochs each); RSS (MB) after trial {curve}; peak "
                       f"after trial {early} was {peak_early:.0f} MB")


def figure_rejection(table: Table, sizes: dict, root: Path) -> None:
    log(f"rejection: {sizes['decisions']} sampled candidates of the cnn space on 8x8x1")
    decide, _ = run_worker("decide", root, count=sizes["decisions"])
    build, _ = run_worker("build", root, count=sizes["builds"])
    mean_ms = decide["mean_s"] * 1000
    build_ms = build["mean_s"] * 1000
    table.add("rejection: ms per decision (vs building the model)", f"{mean_ms:.4f}",
              f"{build_ms:.1f}", f"{mean_ms / build_ms:.5f}", "nas < 1 ms", mean_ms < 1.0)
    loaded = decide["loaded"]
    table.add("rejection: TensorFlow/Keras imported to decide", ", ".join(loaded) or "none",
              "-", "-", "none", not loaded)
    table.notes.append(
        f"rejection: {decide['count']} candidates, {decide['impossible']} impossible, "
        f"{decide['over_budget']} over budget ({decide['constraints']}); per rejected "
        f"candidate {decide['mean_rejected_s'] * 1000:.4f} ms, slowest decision "
        f"{decide['max_s'] * 1000:.3f} ms; baseline = build_model (layers + compile) of "
        f"{build['count']} possible candidates, median {build['median_s'] * 1000:.1f} ms")


def figure_data(table: Table, sizes: dict, root: Path) -> None:
    log("data: model.fit on make_datasets(...) vs on numpy arrays")
    result, _ = run_worker("data", root, epochs=sizes["data_epochs"],
                           rounds=sizes["data_rounds"])
    ratio = result["tfdata"] / result["numpy"]
    table.add("data: training steps per second", f"{result['tfdata']:.0f}",
              f"{result['numpy']:.0f}", f"{ratio:.2f}", "ratio >= 0.9", ratio >= 0.9)
    table.notes.append(
        f"data: one model ({result['params']:,} parameters), batch 32, {result['steps']} steps "
        f"x {sizes['data_epochs']} epochs with validation, median of {sizes['data_rounds']} "
        f"alternating rounds after a warm-up; baseline = the same fit on the numpy arrays")



def _image_folder(folder: Path, count: int, size: int) -> Path:
    """`count` RGB PNG images of `size`x`size` in three class folders: tests/shapes.py's
    shapes, each in its own colour."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import numpy as np
    from PIL import Image
    from shapes import CLASSES, draw

    rng = np.random.default_rng(0)
    for n in range(count):
        kind = CLASSES[n % len(CLASSES)]
        (folder / kind).mkdir(parents=True, exist_ok=True)
        gray = draw(kind, size, rng).astype("float32") / 255
        colour = rng.uniform(0.3, 1.0, 3)
        Image.fromarray((gray[..., None] * colour * 255).astype("uint8")).save(
            folder / kind / f"{n:06d}.png")
    return folder


def figure_images(table: Table, sizes: dict, root: Path) -> None:
    """A `directory` source at two sizes: the peak RSS of a 1-trial search, its time to
    the first batch, and training steps per second against the same images in memory."""
    small, large, size = sizes["i_small"], sizes["i_large"], sizes["i_size"]
    found = {}
    for count in (small, large):
        folder = root / f"images-{count}"
        log(f"images: writing {count:,} {size}x{size} RGB PNG images")
        _image_folder(folder / "data", count, size)
        (folder / "pipeline.yaml").write_text(
            f"data: {{source: directory, path: data, image_size: {size}, color_mode: rgb}}\n"
            f"train: {{epochs: 1, batch_size: 32}}\n")
        log(f"images: a 1-trial search on {count:,} images")
        found[count], _ = run_worker("images_search", folder, pipeline=str(folder / "pipeline.yaml"))
    rss = {count: found[count]["peak_rss_mb"] for count in found}
    ratio = rss[large] / rss[small]
    table.add(f"images: peak RSS of a 1-trial search, {large:,} / {small:,} images (MB)",
              f"{rss[large]:.0f}", f"{rss[small]:.0f}", f"{ratio:.2f}", "ratio <= 1.3",
              ratio <= 1.3)
    for count in (small, large):
        table.add(f"images: nas search to the first batch, {count:,} images (s)",
                  f"{found[count]['first_batch_s']:.1f}", "-", "-", "(informational)", None)
    log(f"images: steps per second on {small:,} images, streamed vs in memory")
    steps, _ = run_worker("images_steps", root / f"images-{small}",
                          pipeline=str(root / f"images-{small}" / "pipeline.yaml"),
                          epochs=sizes["data_epochs"], rounds=sizes["data_rounds"])
    ratio = steps["tfdata"] / steps["numpy"]
    table.add(f"images: training steps per second, {small:,} images (tf.data vs arrays)",
              f"{steps['tfdata']:.0f}", f"{steps['numpy']:.0f}", f"{ratio:.2f}",
              "ratio >= 0.9", ratio >= 0.9)
    table.add(f"images: training steps per second, {small:,} images read from disk every "
              f"epoch (cache: none)", f"{steps['disk']:.0f}", f"{steps['numpy']:.0f}",
              f"{steps['disk'] / steps['numpy']:.2f}", "(informational)", None)
    for count in (small, large):
        f = found[count]
        table.notes.append(
            f"images, {count:,} images of {size}x{size}x3: listing and header check "
            f"{f['load_s']:.2f} s, cached in memory: {f['in_memory']}, trial "
            f"{f['trial_s']:.1f} s, process peak RSS {f['peak_rss_mb']:.0f} MB")
    table.notes.append(
        f"images: steps per second over {steps['steps']} steps x {sizes['data_epochs']} "
        f"epochs, median of {sizes['data_rounds']} alternating rounds after a warm-up, one "
        f"model ({steps['params']:,} parameters), batch 32; baseline = the same fit on the "
        f"decoded images as numpy arrays")


def figure_augment(table: Table, sizes: dict, root: Path) -> None:
    """The default space with and without its `augment:` section on tests/shapes.py's
    shapes (100 per class, 32x32), each seed a new set of images and a new split: the best
    validation accuracy of 10 trials (the issue's target) and the final model's test
    accuracy."""
    from nas.specs import load_space

    default = load_space("cnn")
    text = default.text
    if default.augment:  # the row without: the same space, its augment: section cut
        import yaml

        plain_text = yaml.safe_dump({key: value for key, value in yaml.safe_load(text).items()
                                     if key != "augment"}, sort_keys=False)
        rows = {"cnn (default, with augment:)": None, "cnn without augment:": plain_text}
    else:
        rows = {"cnn (default, no augment:)": None,
                "cnn + augment: translation, zoom, flip": text + (
                    "augment:\n  translation: [0.1, 0.0]\n  zoom: [0.1, 0.0]\n"
                    "  flip: [horizontal, none]\n")}
    found = {row: [] for row in rows}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from shapes import make_shapes

    for seed in sizes["a_seeds"]:
        folder = Path(tempfile.mkdtemp(prefix=f"augment-s{seed}-", dir=root))
        images = make_shapes(folder / "data", per_class=100, size=32, seed=seed)
        pipeline = folder / "pipeline.yaml"
        pipeline.write_text(f"data: {{source: directory, path: {images}, image_size: 32, "
                            f"validation_split: 0.2, seed: {seed}}}\n"
                            f"train: {{epochs: 20, batch_size: 16, early_stopping_patience: 3}}\n")
        for n, (row, space_text) in enumerate(rows.items()):
            extra = []
            if space_text is not None:
                (folder / "space.yaml").write_text(space_text)
                extra = ["--space", str(folder / "space.yaml")]
            found[row].append(quality_search(folder / f"row{n}", pipeline, default_tuner(),
                                             sizes["a_trials"], seed, *extra))

    def spread(values, digits=4):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    for row, results in found.items():
        best = [r["best"] for r in results]
        table.add(f"augment: shapes 32x32, best val_accuracy of {sizes['a_trials']} trials "
                  f"({row})", spread(best), "-", "-", "mean >= 0.95",
                  statistics.mean(best) >= 0.95)
        table.add(f"augment: shapes 32x32, test accuracy ({row})",
                  spread([r["test"] for r in results]), "-", "-", "(informational)", None)
        tests = ", ".join(f"{r['test']:.4f}" for r in results)
        walls = spread([r["wall"] for r in results], 1)
        table.notes.append(f"augment ({row}): per seed best val "
                           f"{', '.join(f'{v:.4f}' for v in best)}; test {tests}; wall {walls} s")

def figure_quality(table: Table, sizes: dict, root: Path, tuners: list[str]) -> None:
    """Test accuracy of the final model over several digits splits, at equal compute.

    Each split seed S gives a 60/20/20 split (`data.seed: S`); every method trains on the
    same training data, selects on the same validation data and is scored once on the
    same test data. The nas rows are `nas search` as a user runs it (default space, the
    digits pipeline's 20 epochs and patience 3, `--seed S`).
    """
    def pipeline(seed: int) -> str:
        return (f"data: {{source: digits, seed: {seed}}}\n"
                f"train: {{epochs: {sizes['q_epochs']}, batch_size: 32, "
                f"early_stopping_patience: 3}}\n")

    _quality(table, sizes, root, "digits", pipeline, sizes["q_seeds"], tuners, variants=True,
             targets=True)


def figure_shapes(table: Table, sizes: dict, root: Path, tuners: list[str]) -> None:
    """The same comparison where translation invariance matters: tests/shapes.py's circles,
    squares and triangles at random places and sizes, in noise."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from shapes import make_shapes

    per_class, size = sizes["s_per_class"], sizes["s_size"]
    images = make_shapes(root / "shapes-data", per_class=per_class, size=size, seed=0)

    def pipeline(seed: int) -> str:
        return (f"data: {{source: directory, path: {images}, image_size: [{size}, {size}], "
                f"color_mode: grayscale, validation_split: 0.2, seed: {seed}}}\n"
                f"train: {{epochs: {sizes['q_epochs']}, batch_size: 32, "
                f"early_stopping_patience: 3}}\n")

    _quality(table, sizes, root, f"shapes ({3 * per_class} images of {size}x{size})", pipeline,
             sizes["s_seeds"], [t for t in tuners if t == "random"], variants=False,
             targets=False)


def _quality(table: Table, sizes: dict, root: Path, task: str, pipeline_text, seeds,
             tuners: list[str], variants: bool, targets: bool) -> None:
    """`nas search` with each tuner, the hand-written KerasTuner search and an SVC grid on
    `task` (the pipeline `pipeline_text(seed)` for each split seed), scored on test data."""
    trials = sizes["q_trials"]
    default = default_tuner()
    methods = [default] + [t for t in tuners if t != default]
    single = f"{default} --ensemble 1"  # the default strategy's final model without the ensemble
    # The default given random's measured search wall on the same split as --time-limit.
    matched = f"{default} --time-limit <random's wall>"
    # ... and a third of it: the "reaches random's test accuracy in 1/3 of its wall".
    third = f"{default} --time-limit <random's wall / 3>"
    refit = f"{default} --refit"  # its final model retrained on training + validation data
    extra_rows = ([single, refit] + ([matched, third] if "random" in methods else [])
                  if variants else [])
    found: dict[str, list[dict]] = {m: [] for m in methods + extra_rows + ["keras-tuner", "svc"]}
    methods.sort(key=lambda m: m != "random")  # random first: its wall sets the matched limit
    for seed in seeds:
        folder = Path(tempfile.mkdtemp(prefix=f"quality-s{seed}-", dir=root))
        pipeline = folder / "pipeline.yaml"
        pipeline.write_text(pipeline_text(seed))
        for tuner in methods:
            found[tuner].append(quality_search(folder / tuner, pipeline, tuner, trials, seed))
        if single in found:
            found[single].append(quality_search(folder / "single", pipeline, default, trials,
                                                seed, "--ensemble", "1"))
        if refit in found:
            found[refit].append(quality_search(folder / "refit", pipeline, default, trials, seed,
                                               "--refit"))
        for row, share in ((matched, 1), (third, 3)):
            if row in found:
                limit = found["random"][-1]["wall"] / share
                found[row].append(quality_search(folder / f"limit-{share}", pipeline, default,
                                                 trials, seed, "--time-limit", f"{limit:.1f}s"))
        log(f"quality baseline: hand-written KerasTuner RandomSearch, split seed {seed}")
        base, _ = run_worker("baseline", folder, build="small_cnn", autolog=False,
                             trials=trials, epochs=sizes["q_epochs"], seed=seed,
                             folder=str(folder), split_seed=seed, pipeline=str(pipeline))
        log(f"  test accuracy {base['test']:.4f}, {base['search_wall']:.1f} s")
        found["keras-tuner"].append({"test": base["test"], "wall": base["search_wall"],
                                     "epochs": base["epochs"]})
        svc, _ = run_worker("svc", folder, split_seed=seed, pipeline=str(pipeline))
        log(f"quality baseline: SVC, split seed {seed}: test accuracy {svc['test']:.4f} "
            f"(C={svc['C']}, gamma={svc['gamma']})")
        found["svc"].append(svc)

    def spread(rows, key, digits=4):
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.mean(values), f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    labels = {default: f"nas {default} (default: --ensemble {default_ensemble()})",
              single: f"nas {single}", refit: f"nas {refit}", matched: f"nas {matched}",
              third: f"nas {third}",
              "keras-tuner":
              "KerasTuner, hand-written", "svc": "SVC (C, gamma) grid"}
    means = {}
    for method, rows in found.items():
        means[method], shown = spread(rows, "test")
        wall = spread(rows, "wall", 1)[1]
        extra = f"; {spread(rows, 'epochs', 0)[1]} epochs" if "epochs" in rows[0] else ""
        label = labels.get(method, "nas " + method)
        table.add(f"quality: {task} test accuracy ({label})", shown, "-", "-",
                  "(informational)", None)
        table.notes.append(f"quality, {task} ({label}): test accuracy per split seed "
                           + ", ".join(f"{r['test']:.4f}" for r in rows)
                           + f"; wall {wall} s{extra}")
    others = {m: v for m, v in means.items()
              if m not in (default, single, refit, matched, third)}
    best_other = max(others, key=others.get)
    if not targets:
        table.add(f"quality: {task}: default's mean test accuracy vs the best other "
                  f"({best_other})", f"{means[default]:.4f}", f"{others[best_other]:.4f}",
                  f"{means[default] - others[best_other]:+.4f}", "(informational)", None)
        return
    ok = means[default] >= 0.99 and all(means[default] > v for v in others.values())
    table.add(f"quality: default's mean test accuracy vs the best other ({best_other})",
              f"{means[default]:.4f}", f"{others[best_other]:.4f}",
              f"{means[default] - others[best_other]:+.4f}", ">= 0.99 and above every row", ok)
    if "random" in found:
        walls = [r["wall"] for r in found[default]], [r["wall"] for r in found["random"]]
        ratio = statistics.mean(walls[0]) / statistics.mean(walls[1])
        table.add("quality: default's search wall / random's", f"{statistics.mean(walls[0]):.1f}",
                  f"{statistics.mean(walls[1]):.1f}", f"{ratio:.2f}", "ratio <= 1", ratio <= 1)
        if matched in found:
            walls = [r["wall"] for r in found[matched]], walls[1]
            ratio = statistics.mean(walls[0]) / statistics.mean(walls[1])
            table.add("quality: default with --time-limit at random's wall: wall / random's",
                      f"{statistics.mean(walls[0]):.1f}", f"{statistics.mean(walls[1]):.1f}",
                      f"{ratio:.2f}", "ratio <= 1", ratio <= 1)
            ok = means[matched] >= 0.99 and all(means[matched] > v for v in others.values())
            table.add(f"quality: that search's mean test accuracy vs the best other "
                      f"({best_other})", f"{means[matched]:.4f}", f"{others[best_other]:.4f}",
                      f"{means[matched] - others[best_other]:+.4f}",
                      ">= 0.99 and above every row", ok)
        if third in found:
            # The "reaches random's test accuracy in at most 1/3 of its wall": the
            # default given a third of random's wall, final model and test score included.
            walls = [r["wall"] for r in found[third]], walls[1]
            ratio = statistics.mean(walls[0]) / statistics.mean(walls[1])
            ok = ratio <= 1 / 3 and means[third] >= means["random"]
            table.add("quality: default with --time-limit at 1/3 of random's wall: mean test "
                      "accuracy vs random's (wall ratio)", f"{means[third]:.4f}",
                      f"{means['random']:.4f}", f"{means[third] - means['random']:+.4f} "
                      f"({ratio:.2f})", ">= random's, wall <= 1/3", ok)
        # When the default's best validation score so far first matched random's final one.
        reach = [_time_to(d["curve"], r["best"]) / r["wall"]
                 for d, r in zip(found[default], found["random"])]
        table.notes.append("quality: time for the default to reach random's final best "
                           "validation accuracy, over random's search wall, per split seed: "
                           + ", ".join(f"{x:.2f}" for x in reach))


def _time_to(curve: list[tuple[float, float]], target: float) -> float:
    """The first time (s) the best score so far in `curve` [(seconds, score)] reached
    `target`; infinity if never."""
    best = -math.inf
    for seconds, score in sorted(curve):
        best = max(best, score)
        if best >= target - 1e-9:
            return seconds
    return math.inf


def quality_search(folder: Path, pipeline: Path, tuner: str, trials: int, seed: int,
                   *extra: str) -> dict:
    """One `nas search` on `pipeline`: its test accuracy, wall, epochs and curve."""
    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    log(f"nas search --tuner {tuner} {' '.join(extra)}: split seed {seed}, {trials} trials")
    done = subprocess.run([nas_executable(), "search", "--pipeline", str(pipeline), "--tuner",
                           tuner, "--max-trials", str(trials), "--seed", str(seed),
                           "--tracking-uri", uri, "--workdir", str(folder / "work"),
                           "--experiment", "bench", *extra],
                          cwd=folder, env=_ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nas search failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    parent, runs = search_runs(uri)
    start = parent.info.start_time
    curve = [((r.info.end_time - start) / 1000.0, r.data.metrics["objective"])
             for r in runs if "objective" in r.data.metrics and r.info.end_time]
    found = {"test": parent.data.metrics["test_accuracy"],
             "best": parent.data.metrics["best_objective"],
             "wall": (parent.info.end_time - start) / 1000.0,
             "epochs": sum(r.data.metrics.get("epochs_trained", 0) for r in runs),
             "curve": curve}
    log(f"  test accuracy {found['test']:.4f} (best val_accuracy {found['best']:.4f}), "
        f"{found['wall']:.1f} s, {found['epochs']:.0f} epochs")
    return found


# --- workers (each in its own process) -----------------------------------------------


def _same_knobs_build(space, input_shape, num_classes, pixel_scale):
    """A hand-written build function over the cnn space's knobs, as a KerasTuner user
    would write it: a layer that cannot apply (a feature map too small) is skipped."""
    import keras

    def build(hp):
        inputs = keras.Input(input_shape)
        x = keras.layers.Rescaling(1.0 / pixel_scale)(inputs)
        for stage in range(hp.Int("depth", space.depth.lowest(), space.depth.highest())):
            size = x.shape[1]
            kernel = hp.Choice(f"kernel_{stage}", space.kernel_size.values())
            padding = hp.Choice(f"padding_{stage}", space.padding.values())
            stride = hp.Choice(f"stride_{stage}", space.stride.values())
            if padding == "valid" and kernel > size:
                padding = "same"
            x = keras.layers.Conv2D(hp.Choice(f"filters_{stage}", space.filters.values()),
                                    kernel, strides=stride, padding=padding)(x)
            if hp.Boolean(f"batch_norm_{stage}"):
                x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Activation("relu")(x)
            if hp.Boolean(f"pointwise_{stage}"):
                x = keras.layers.Conv2D(x.shape[-1], 1, activation="relu")(x)
            pool = hp.Choice(f"pool_{stage}", space.pool_type.values())
            if pool != "none" and x.shape[1] >= 2:
                layers = keras.layers
                x = (layers.MaxPooling2D if pool == "max" else layers.AveragePooling2D)(2)(x)
        reduce = hp.Choice("reduce", space.reduce.values())
        x = {"flatten": keras.layers.Flatten, "global_avg": keras.layers.GlobalAveragePooling2D,
             "global_max": keras.layers.GlobalMaxPooling2D}[reduce]()(x)
        for layer in range(hp.Int("dense_layers", space.dense_layers.lowest(),
                                  space.dense_layers.highest())):
            x = keras.layers.Dense(hp.Choice(f"units_{layer}", space.dense_units.values()),
                                   activation="relu")(x)
            x = keras.layers.Dropout(hp.Choice(f"dropout_{layer}", space.dropout.values()))(x)
        outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        lr = space.learning_rate
        learning_rate = hp.Float("learning_rate", lr.min, lr.max, sampling=lr.sampling)
        optimizer = (keras.optimizers.Adam(learning_rate)
                     if hp.Choice("optimizer", space.optimizer.values()) == "adam"
                     else keras.optimizers.SGD(learning_rate, momentum=0.9))
        model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    return build


def worker_baseline(build: str, autolog: bool, trials: int, epochs: int, seed: int,
                    folder: str, split_seed: int = 0, pipeline: str = "digits") -> dict:
    """A plain KerasTuner RandomSearch on `pipeline`'s data; model.fit wrapped to time it.

    Trained on the split of `split_seed`; its best model is scored on that split's test data.
    """
    import dataclasses

    import keras
    import keras_tuner as kt

    from nas.data import images, load_arrays
    from nas.specs import load_pipeline, load_space

    pipeline = dataclasses.replace(load_pipeline(pipeline), seed=split_seed)
    arrays = load_arrays(pipeline)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        images(arrays, split) for split in ("train", "val", "test"))
    keras.utils.set_random_seed(seed)
    if build == "same_knobs":
        build_fn = _same_knobs_build(load_space("cnn"), arrays.input_shape, arrays.num_classes,
                                     arrays.pixel_scale)
    else:
        build_fn = small_cnn_build(arrays.input_shape, arrays.num_classes, arrays.pixel_scale)
    if autolog:
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        mlflow.set_experiment("baseline")  # creates the store before the timed search
        mlflow.tensorflow.autolog()
    fits, trains, epochs_run = [], [], []

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()
            epochs_run.append(0)

        def on_epoch_end(self, epoch, logs=None):
            epochs_run[-1] += 1

        def on_train_end(self, logs=None):
            trains.append(time.perf_counter() - self.start)

    class HyperModel(kt.HyperModel):
        def build(self, hp):
            return build_fn(hp)

        def fit(self, hp, model, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + [Timer()]
            start = time.perf_counter()
            try:
                return model.fit(*args, **kwargs)
            finally:
                fits.append(time.perf_counter() - start)

    tuner = kt.RandomSearch(HyperModel(), objective="val_accuracy", max_trials=trials,
                            seed=seed, directory=os.path.join(folder, "kt"),
                            project_name="baseline", overwrite=True)
    start = time.perf_counter()
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs,
                 batch_size=pipeline.batch_size, verbose=0,
                 callbacks=[keras.callbacks.EarlyStopping(
                     monitor=pipeline.objective, mode="max",
                     patience=pipeline.early_stopping_patience)])
    search_wall = time.perf_counter() - start
    best = tuner.oracle.get_best_trials(1)[0].score
    (model,) = tuner.get_best_models(1)
    test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    return {"search_wall": search_wall, "fit_sum": sum(fits), "train_sum": sum(trains),
            "trials": len(fits), "best": float(best), "test": float(test["accuracy"]),
            "epochs": sum(epochs_run)}


def worker_svc(split_seed: int, pipeline: str = "digits") -> dict:
    """scikit-learn's SVC (RBF), C and gamma chosen on the validation data, scored on test."""
    import dataclasses
    import itertools

    from sklearn.svm import SVC

    from nas.data import images, load_arrays
    from nas.specs import load_pipeline

    arrays = load_arrays(dataclasses.replace(load_pipeline(pipeline), seed=split_seed))
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        images(arrays, split) for split in ("train", "val", "test"))

    def flat(x):
        return x.reshape(len(x), -1) / arrays.pixel_scale

    start = time.perf_counter()
    best = None
    for c, gamma in itertools.product((1, 3, 10, 30, 100), ("scale", 0.01, 0.03, 0.1)):
        model = SVC(C=c, gamma=gamma).fit(flat(x_train), y_train)
        score = model.score(flat(x_val), y_val)
        if best is None or score > best[0]:
            best = (score, c, gamma, model)
    score, c, gamma, model = best
    test = model.score(flat(x_test), y_test)
    return {"test": float(test), "val": float(score), "C": c, "gamma": gamma,
            "wall": time.perf_counter() - start}


def worker_memory(trials: int, epochs: int, folder: str) -> dict:
    """One nas search; RSS and peak RSS sampled as each trial ends (its event)."""
    import resource

    from nas.events import Callback
    from nas.search import SearchConfig, prepare, run
    from nas.specs import load_pipeline, load_space

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    samples = {}

    class Sampler(Callback):
        def on_trial_end(self, event) -> None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            samples[event.trial] = (rss_mb(), peak)

    config = SearchConfig(space=load_space("cnn"), pipeline=load_pipeline("digits"),
                          tuner="random", max_trials=trials, epochs=epochs, seed=0,
                          experiment="memory", tracking_uri=f"sqlite:///{folder}/mlflow.db",
                          workdir=os.path.join(folder, "work"), max_failures=10)
    run(prepare(config), Sampler())
    return {"samples": samples}


def _sample_values(space, rng: random.Random) -> dict:
    """One proposal as a random oracle draws it: every active knob, parents first."""
    from nas.architecture import hyperparameter_specs

    values: dict = {}
    for spec in hyperparameter_specs(space):
        if all(values.get(parent) in allowed for parent, allowed in spec.conditions):
            knob = spec.knob
            choices = knob.values()
            if choices is not None:
                values[spec.name] = rng.choice(choices)
            elif knob.sampling == "log":
                values[spec.name] = math.exp(rng.uniform(math.log(knob.min), math.log(knob.max)))
            else:
                values[spec.name] = rng.uniform(knob.min, knob.max)
    return values


_SHAPE, _CLASSES, _SCALE = (8, 8, 1), 10, 16.0  # digits


def worker_decide(count: int) -> dict:
    """Time `Architecture.from_values(...).rejection(...)`; TensorFlow must stay unloaded."""
    from nas.architecture import Architecture
    from nas.specs import Constraints, load_space

    space = load_space("cnn")
    rng = random.Random(0)
    proposals = [_sample_values(space, rng) for _ in range(count)]
    constraints = Constraints(max_params=50_000, max_flops=2_000_000)
    for values in proposals[:50]:  # warm-up
        Architecture.from_values(space, values, _SHAPE, _CLASSES, _SCALE).rejection(constraints)
    times, reasons = [], []
    for values in proposals:
        start = time.perf_counter()
        reason = Architecture.from_values(space, values, _SHAPE, _CLASSES,
                                          _SCALE).rejection(constraints)
        times.append(time.perf_counter() - start)
        reasons.append(reason)
    rejected = [t for t, r in zip(times, reasons) if r]
    loaded = sorted({name.split(".")[0] for name in sys.modules
                     if name.split(".")[0] in ("tensorflow", "keras", "tf_keras")})
    return {"count": count, "mean_s": statistics.mean(times), "max_s": max(times),
            "mean_rejected_s": statistics.mean(rejected) if rejected else 0.0,
            "impossible": sum(bool(r) and not r.over_budget for r in reasons),
            "over_budget": sum(bool(r) and r.over_budget for r in reasons),
            "constraints": f"max_params {constraints.max_params:,}, "
                           f"max_flops {constraints.max_flops:,}",
            "loaded": loaded}


def worker_build(count: int) -> dict:
    """Time building (and compiling) the Keras model of possible candidates."""
    from nas.architecture import Architecture
    from nas.models import build_model
    from nas.specs import load_space

    space = load_space("cnn")
    rng = random.Random(0)
    candidates = []
    while len(candidates) < count + 1:
        architecture = Architecture.from_values(space, _sample_values(space, rng), _SHAPE,
                                                _CLASSES, _SCALE)
        if not architecture.impossible:
            candidates.append(architecture)
    build_model(candidates[0])  # warm-up: Keras's first model pays for its imports
    times = []
    for architecture in candidates[1:]:
        start = time.perf_counter()
        build_model(architecture)
        times.append(time.perf_counter() - start)
    return {"count": count, "mean_s": statistics.mean(times),
            "median_s": statistics.median(times)}


def worker_data(epochs: int, rounds: int) -> dict:
    """Steps per second of one model's fit: nas's tf.data pipeline vs the numpy arrays."""
    import keras

    from nas.architecture import Architecture
    from nas.data import load_arrays, make_datasets
    from nas.models import build_model
    from nas.specs import load_pipeline, load_space

    pipeline = load_pipeline("digits")
    arrays = load_arrays(pipeline)
    batch = pipeline.batch_size
    datasets = make_datasets(arrays, batch, seed=0)
    keras.utils.set_random_seed(0)
    space = load_space("cnn")
    values = {"depth": 2, "reduce": "flatten", "dense_layers": 1, "dense_1/units": 128,
              "dense_1/dropout": 0.25, "optimizer": "adam", "learning_rate": 0.003}
    for stage, filters in ((1, 32), (2, 64)):
        values.update({f"stage_{stage}/filters": filters, f"stage_{stage}/kernel_size": 3,
                       f"stage_{stage}/stride": 1, f"stage_{stage}/padding": "same",
                       f"stage_{stage}/batch_norm": True, f"stage_{stage}/pointwise": False,
                       f"stage_{stage}/pool": "max", f"stage_{stage}/pool_size": 2})
    architecture = Architecture.from_values(space, values, arrays.input_shape,
                                            arrays.num_classes, arrays.pixel_scale)
    model = build_model(architecture)
    steps = math.ceil(len(arrays.x_train) / batch)

    def fit_tfdata(n):
        model.fit(datasets.train, validation_data=datasets.validation, epochs=n, verbose=0,
                  shuffle=False)

    def fit_numpy(n):
        model.fit(arrays.x_train, arrays.y_train, batch_size=batch,
                  validation_data=(arrays.x_val, arrays.y_val), epochs=n, verbose=0,
                  shuffle=True)

    fit_tfdata(1)
    fit_numpy(1)
    rates = {"tfdata": [], "numpy": []}
    for _ in range(rounds):
        for name, fit in (("tfdata", fit_tfdata), ("numpy", fit_numpy)):
            start = time.perf_counter()
            fit(epochs)
            rates[name].append(steps * epochs / (time.perf_counter() - start))
    return {"tfdata": statistics.median(rates["tfdata"]),
            "numpy": statistics.median(rates["numpy"]), "steps": steps,
            "params": architecture.params, "all": rates}



def worker_images_search(pipeline: str) -> dict:
    """`nas search` (tiny space, 1 trial) in this process: its peak RSS and the time from
    the command to the first batch the trial trains on (its clock starts before anything
    of the search is imported, as a user's command does)."""
    start = time.perf_counter()
    import resource

    import keras

    from nas import tuning
    from nas.cli import main

    marks = {}

    class FirstBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            marks.setdefault("first_batch", time.perf_counter())

        def on_train_end(self, logs=None):
            marks["trial_end"] = time.perf_counter()

    real_fit = tuning.CandidateModel.fit

    def fit(self, hp, model, *args, callbacks=(), **kwargs):
        return real_fit(self, hp, model, *args, callbacks=[*callbacks, FirstBatch()], **kwargs)

    tuning.CandidateModel.fit = fit
    from nas.data import load_arrays
    from nas.specs import load_pipeline

    loaded = time.perf_counter()
    arrays = load_arrays(load_pipeline(pipeline))
    load_s = time.perf_counter() - loaded
    try:
        main(["search", "--space", "tiny", "--pipeline", pipeline, "--max-trials", "1",
              "--tracking-uri", f"sqlite:///{Path.cwd()}/mlflow.db", "--experiment", "images"],
             standalone_mode=False)
    finally:
        tuning.CandidateModel.fit = real_fit
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_batch_s": marks["first_batch"] - start - load_s,
            "trial_s": marks["trial_end"] - marks["first_batch"], "load_s": load_s,
            "in_memory": arrays.files.in_memory(len(arrays.x_train))}


def worker_images_steps(pipeline: str, epochs: int, rounds: int) -> dict:
    """Steps per second of one model's fit on a directory's images: nas's tf.data pipeline
    (as a search uses it, and read from disk every epoch) vs the decoded images in memory."""
    import dataclasses

    import keras

    from nas.data import images, load_arrays, make_datasets
    from nas.models import build_model
    from nas.space import sample
    from nas.specs import load_pipeline, load_space

    loaded = load_pipeline(pipeline)
    arrays = load_arrays(loaded)
    disk = load_arrays(dataclasses.replace(loaded, cache="none"))
    batch = loaded.batch_size
    datasets, streamed = make_datasets(arrays, batch, seed=0), make_datasets(disk, batch, seed=0)

    # The same images, decoded once, as arrays.
    (x_train, y_train), (x_val, y_val) = images(disk, "train"), images(disk, "val")
    keras.utils.set_random_seed(0)
    (architecture,), _ = sample(load_space("tiny"), arrays.input_shape, arrays.num_classes, 1,
                                pixel_scale=arrays.pixel_scale)
    model = build_model(architecture)
    steps = math.ceil(len(arrays.x_train) / batch)
    fits = {
        "tfdata": lambda n: model.fit(datasets.train, validation_data=datasets.validation,
                                      epochs=n, verbose=0, shuffle=False),
        "disk": lambda n: model.fit(streamed.train, validation_data=streamed.validation,
                                    epochs=n, verbose=0, shuffle=False),
        "numpy": lambda n: model.fit(x_train, y_train, batch_size=batch,
                                     validation_data=(x_val, y_val), epochs=n, verbose=0,
                                     shuffle=True),
    }
    for fit in fits.values():
        fit(1)
    rates = {name: [] for name in fits}
    for _ in range(rounds):
        for name, fit in fits.items():
            begin = time.perf_counter()
            fit(epochs)
            rates[name].append(steps * epochs / (time.perf_counter() - begin))
    return {**{name: statistics.median(r) for name, r in rates.items()}, "steps": steps,
            "params": architecture.params, "all": rates}

WORKERS = {"baseline": worker_baseline, "svc": worker_svc, "memory": worker_memory, "decide": worker_decide,
           "build": worker_build, "data": worker_data, "images_search": worker_images_search,
           "images_steps": worker_images_steps, **fashion.WORKERS, **spaces.WORKERS}


# --- main ----------------------------------------------------------------------------


def machine() -> str:
    """The machine and versions this run measured, for bench/README.md."""
    from importlib.metadata import version

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as info:
            ram = f"{int(info.readline().split()[1]) / 1024 ** 2:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        ram = "RAM unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = ", ".join(f"{name} {version(name)}" for name in
                         ("tensorflow", "keras", "keras-tuner", "mlflow"))
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} cores ({cpu}), {ram}; "
            f"Python {sys.version.split()[0]}, {versions}; load average at start {load}")



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", action="append", choices=FIGURES, metavar="FIGURE",
                        help=f"measure only this figure (repeatable): {', '.join(FIGURES)}")
    parser.add_argument("--tuners", default="random,bayesian,hyperband", metavar="LIST",
                        help="quality: the tuners compared with the default "
                             "(comma-separated)  [default: random,bayesian,hyperband]")
    parser.add_argument("--split-seeds", default=None, metavar="LIST",
                        help="quality: the digits split seeds  [default: 0,1,2,3,4]")
    parser.add_argument("--time-limit", default="30m", metavar="DURATION",
                        help="fashion: every row's time limit (90s, 30m, 1h); blocks: every "
                             "space's  [default: 30m]")
    parser.add_argument("--rows", default=",".join(fashion.ROWS), metavar="LIST",
                        help=f"fashion: the rows, in this order  [default: "
                             f"{','.join(fashion.ROWS)}]")
    parser.add_argument("--latency-space", default="cnn", metavar="NAME|PATH",
                        help="latency: the space whose candidates the per-layer table "
                             "predicts  [default: cnn]")
    parser.add_argument("--latency-candidates", type=int, default=None, metavar="N",
                        help=f"latency: candidates predicted and measured  [default: "
                             f"{latency.CANDIDATES}; --quick {latency.QUICK_CANDIDATES}]")
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        name, kwargs = args.worker
        print(_RESULT + json.dumps(WORKERS[name](**json.loads(kwargs))), flush=True)
        return 0

    sizes = dict(QUICK if args.quick else FULL)
    if args.split_seeds:
        sizes["q_seeds"] = tuple(int(x) for x in args.split_seeds.split(","))
    # fashion: an hour a row; blocks: three searches of --time-limit
    figures = args.only or [f for f in FIGURES if f not in ("fashion", "blocks")]
    tuners = [t for t in args.tuners.split(",") if t]
    table = Table()
    started = time.perf_counter()
    header = machine()
    with tempfile.TemporaryDirectory(prefix="nas-bench-") as tmp:
        root = Path(tmp)
        searches = NasSearches(root)
        for figure in FIGURES:
            if figure not in figures:
                continue
            if figure == "overhead":
                figure_overhead(table, sizes, searches, root)
            elif figure == "startup":
                figure_startup(table, sizes, searches, root)
            elif figure == "memory":
                figure_memory(table, sizes, root)
            elif figure == "rejection":
                figure_rejection(table, sizes, root)
            elif figure == "space":
                spaces.figure_space(table, root, run_worker, log)
            elif figure == "data":
                figure_data(table, sizes, root)
            elif figure == "quality":
                figure_quality(table, sizes, root, tuners)
            elif figure == "shapes":
                figure_shapes(table, sizes, root, tuners)
            elif figure == "images":
                figure_images(table, sizes, root)
            elif figure == "augment":
                figure_augment(table, sizes, root)
            elif figure == "scale":
                scale.figure_scale(table, root, nas_executable(), _ENV, log, args.quick)
            elif figure == "latency":
                latency.figure_latency(table, log, args.quick)
                latency.figure_prediction(table, log, args.latency_space,
                                          args.latency_candidates, args.quick)
            elif figure == "blocks":
                from nas.cli.common import Duration

                limit = Duration().convert(args.time_limit, None, None)
                blocks.figure_blocks(table, root, limit, _image_folder, nas_executable(),
                                     _ENV, log)
            elif figure == "fashion":
                from nas.cli.common import Duration

                limit = Duration().convert(args.time_limit, None, None)
                rows = [row for row in args.rows.split(",") if row]
                fashion.figure_fashion(table, root, limit, rows, run_worker, nas_executable(),
                                       _ENV, log)
    if args.quick:
        table.notes.append("--quick: smaller sizes than the targets are defined for")
    print(header + "\n")
    print(table.render())
    missed = table.missed()
    print(f"\n{len(table.rows) - len(missed)} of {len(table.rows)} rows ok"
          + (f"; missed: {'; '.join(missed)}" if missed else "")
          + f"  ({time.perf_counter() - started:.0f} s)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
