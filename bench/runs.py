"""A benchmark search's runs, read back from its MLflow store (bench/run.py, bench/fashion.py,
bench/blocks.py), and a search run as a user runs it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

__all__ = ["run_search", "search_runs"]


def run_search(folder: Path, command: list[str], env: dict, uri: str):
    """`command` (a `nas search` into the store `uri`, experiment "bench") run in `folder`,
    its output kept there: (the search's parent run, its trial runs, the wall time).

    Raises:
        RuntimeError: the search failed; with the end of what it printed.
    """
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (folder / "stdout.txt").write_text(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"nas search failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return (*search_runs(uri), wall)


def search_runs(uri: str, experiment: str = "bench"):
    """The parent run of the one search in `experiment` at `uri`, and its trial runs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    parent = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'search'")[0]
    runs = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'trial'",
                              max_results=10000)
    return parent, runs
