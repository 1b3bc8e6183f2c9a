"""A benchmark search's runs, read back from its MLflow store (bench/run.py, bench/fashion.py)."""

from __future__ import annotations

__all__ = ["search_runs"]


def search_runs(uri: str, experiment: str = "bench"):
    """The parent run of the one search in `experiment` at `uri`, and its trial runs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    parent = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'search'")[0]
    runs = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'trial'",
                              max_results=10000)
    return parent, runs
