"""The `blocks` figure (issue 23): the spaces of modern blocks against the classic one.

    python bench/run.py --only blocks --time-limit 10m

A generated folder of 64x64 RGB images (`bench/run.py`'s `_image_folder`: tests/shapes.py's
circles, squares and triangles, randomly placed and sized, each in its own colour, with
noise), read as a user's `directory` pipeline: 20% held out as the test set, 20% of the
rest for validation. Each of `cnn`, `resnet` and `mobile` gets one default search
(`nas search --space S --time-limit L`, as a user runs it) under the same limit, in
turn, alone on the machine; each is scored once on the held-out test images.
"""

from __future__ import annotations

from pathlib import Path

SPACES = ("cnn", "resnet", "mobile")
IMAGES = 1800  # 600 a class
SIZE = 64


def figure_blocks(table, root: Path, limit: float, image_folder, nas: str, env: dict,
                  log) -> None:
    """Each space of `SPACES` searched for `limit` seconds on the same images."""
    folder = image_folder(root / "blocks-images", IMAGES, SIZE)
    pipeline = root / "blocks.yaml"
    pipeline.write_text(f"data: {{source: directory, path: {folder}, image_size: [{SIZE}, "
                        f"{SIZE}], color_mode: rgb, validation_split: 0.2, test_split: 0.2, "
                        f"seed: 0}}\ntrain: {{epochs: 20, batch_size: 32, "
                        f"early_stopping_patience: 3}}\n")
    found = {}
    for space in SPACES:
        found[space] = _search(root / f"blocks-{space}", space, pipeline, limit, nas, env, log)
        log(f"  {space}: test accuracy {found[space]['test']:.4f}, wall "
            f"{found[space]['wall']:.0f} s; {found[space]['detail']}")
    for space, result in found.items():
        table.add(f"blocks {limit / 60:.0f}m on {SIZE}x{SIZE} RGB: test accuracy ({space})",
                  f"{result['test']:.4f}", "-", "-", "(informational)", None)
        table.notes.append(f"blocks {limit / 60:.0f}m ({space}): test accuracy "
                           f"{result['test']:.4f}; wall {result['wall']:.0f} s; "
                           f"{result['detail']}")
    best = max(("resnet", "mobile"), key=lambda s: found[s]["test"])
    table.add(f"blocks {limit / 60:.0f}m: the best of resnet/mobile ({best}) vs cnn",
              f"{found[best]['test']:.4f}", f"{found['cnn']['test']:.4f}",
              f"{found[best]['test'] - found['cnn']['test']:+.4f}", "above cnn",
              found[best]["test"] > found["cnn"]["test"])
    table.notes.append(f"blocks: {IMAGES} generated {SIZE}x{SIZE} RGB images, one search per "
                       f"space: the draw of candidates is not separated from the space")


def _search(folder: Path, space: str, pipeline: Path, limit: float, nas: str, env: dict,
            log) -> dict:
    from runs import run_search

    from nas import tracking

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    command = [nas, "search", "--space", space, "--pipeline", str(pipeline), "--time-limit",
               f"{limit:.0f}s", "--tracking-uri", uri, "--workdir", str(folder / "work"),
               "--experiment", "bench", "--no-progress"]
    log(f"blocks: nas search --space {space} --time-limit {limit:.0f}s")
    parent, runs, wall = run_search(folder, command, env, uri)
    final = parent.data.tags.get("nas.final_trials", "")
    params = [r.data.metrics.get("params", 0) for r in runs
              if r.data.tags.get(tracking.TAG_TRIAL) in final.split(",")]
    return {"test": parent.data.metrics["test_accuracy"], "wall": wall,
            "detail": f"{len(runs)} trials; final model: trials {final}, "
                      f"{sum(params):,.0f} parameters"}
