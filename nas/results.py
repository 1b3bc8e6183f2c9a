"""Read searches back from MLflow: the trials of a search, the best one, its layer table.

MLflow only, never TensorFlow, so `nas trials` and `nas best` answer without loading it.
Everything comes from what `nas search` logged (see `nas.tracking`): the search's parent
run (tag `nas.kind=search`) and one child run per trial (tag `nas.kind=trial`) with the
trial's hyperparameters as params, `objective`, `params`, `flops`, `fit_time_s` as metrics
and the layer table as the `architecture.txt` artifact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import urllib.parse
from typing import Iterable

from nas import tracking

__all__ = ["ResultsError", "Search", "TrialRow", "SORT_KEYS", "STATUSES", "open_store",
           "find_search", "find_run", "list_trials", "best_trial", "sort_trials",
           "layer_table", "ui_command", "ui_link"]

# MLflow run statuses a trial's run can end with (RUNNING: still training, or its process died).
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING")
# --sort keys besides any metric the trial runs carry; the value is the metric read.
SORT_KEYS = {"objective": "objective", "trial": None, "params": "params", "flops": "flops",
             "fit_time": "fit_time_s", "epochs": "epochs_trained"}
_SMALLEST_FIRST = ("params", "flops", "fit_time_s", "epochs_trained")


class ResultsError(LookupError):
    """What was asked for is not in the tracking store; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Search:
    """One `nas search` as MLflow holds it: its parent run and its settings."""

    experiment_id: str
    experiment_name: str
    run_id: str
    status: str
    params: dict
    metrics: dict
    tags: dict
    tracking_uri: str

    @property
    def objective(self) -> str:
        return self.params.get("objective", "val_accuracy")

    @property
    def direction(self) -> str:
        # The rule of `nas.specs.Pipeline.direction`.
        return "min" if self.objective.endswith("loss") else "max"

    @property
    def max_trials(self) -> int | None:
        value = self.params.get("max_trials")
        return int(value) if value is not None else None


@dataclasses.dataclass(frozen=True)
class TrialRow:
    """One trial of a search, read from its MLflow run.

    Attributes:
        status: The run's MLflow status: FINISHED, FAILED, KILLED or RUNNING.
        objective: The best epoch's value of the search's objective (None unless trained).
        values: Every active hyperparameter value, decoded from the run's params.
        error: Why the trial failed (the run's `nas.error` tag), if it did.
    """

    trial_id: str
    run_id: str
    status: str
    objective: float | None
    params: int | None
    flops: int | None
    fit_seconds: float | None
    epochs: int | None
    values: dict
    metrics: dict
    error: str | None = None
    artifact_uri: str = ""

    @property
    def architecture(self) -> dict:
        """The choices a person compares trials by (the keys of `Architecture.summary`)."""
        depth = self.values.get("depth")
        stages = range(1, depth + 1) if isinstance(depth, int) else ()

        def per_stage(name):
            return [self.values.get(f"stage_{s}/{name}") for s in stages]

        return {"depth": depth, "filters": per_stage("filters"),
                "kernels": per_stage("kernel_size"), "strides": per_stage("stride"),
                "pooling": per_stage("pool"), "pointwise": per_stage("pointwise")}


def open_store(tracking_uri: str | None) -> tracking.Tracker:
    """A `Tracker` on an existing store; None means MLflow's default rule, as `nas search`.

    Reading must not create a store (MLflow creates an SQLite database on first touch),
    so a local store that does not exist yet is refused.

    Raises:
        ResultsError: the local store does not exist.
    """
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    path = None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?")[0]
    elif uri.startswith("file:"):
        path = urllib.parse.urlparse(uri).path
    elif "://" not in uri and uri not in ("databricks",):
        path = uri
    if path and path != ":memory:" and not os.path.exists(path):
        raise ResultsError(f"--tracking-uri: {uri} does not exist (no search was logged there); "
                           f"run `nas search` first, or give --tracking-uri / "
                           f"MLFLOW_TRACKING_URI")
    return tracking.Tracker(uri)


def find_search(tracker: tracking.Tracker, experiment: str | None = None) -> Search:
    """The latest search of `experiment`, or of the experiment searched most recently.

    Raises:
        ResultsError: no such experiment, or no search in it (or in the store).
    """
    client = tracker.client
    if experiment is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        where = f"the tracking store {tracker.tracking_uri}"
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            names = sorted(e.name for e in client.search_experiments()
                           if e.name != "Default")
            raise ResultsError(f"--experiment: no experiment {experiment!r} in "
                               f"{tracker.tracking_uri} (it holds: {_listing(names)})")
        experiment_ids = [found.experiment_id]
        where = f"experiment {experiment!r}"
    runs = []
    if experiment_ids:
        runs = client.search_runs(experiment_ids,
                                  filter_string=f"tags.`{tracking.TAG_KIND}` = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ResultsError(f"no nas search in {where}; run `nas search` first")
    return _search(tracker, runs[0])


def find_run(tracker: tracking.Tracker, run_id: str) -> tuple[Search, TrialRow | None]:
    """The search a run belongs to, and the trial when `run_id` is a trial's run.

    Raises:
        ResultsError: no such run, or a run `nas search` did not write.
    """
    run = _get_run(tracker, run_id)
    kind = run.data.tags.get(tracking.TAG_KIND)
    if kind == "search":
        return _search(tracker, run), None
    if kind == "trial":
        search = _search(tracker, _get_run(tracker, run.data.tags[tracking.TAG_SEARCH]))
        return search, _trial_row(run, search.objective)
    raise ResultsError(f"--run: {run_id} is not the run of a nas search or trial "
                       f"(its tag {tracking.TAG_KIND} is {kind!r})")


def list_trials(tracker: tracking.Tracker, search: Search) -> list[TrialRow]:
    """One row per trial of `search`, in trial order.

    A trial run more than once (a search resumed after a crash) shows its finished run,
    else its latest one.
    """
    latest: dict[str, object] = {}
    for run in tracker.trial_runs(search.experiment_id, search.run_id):
        trial_id = run.data.tags.get(tracking.TAG_TRIAL, "?")
        if trial_id not in latest or run.info.status == "FINISHED" or \
                latest[trial_id].info.status != "FINISHED":
            latest[trial_id] = run
    return [_trial_row(run, search.objective) for _, run in sorted(latest.items())]


def best_trial(rows: Iterable[TrialRow], search: Search) -> TrialRow:
    """The finished trial with the best objective (the lowest trial id on a tie).

    Raises:
        ResultsError: no trial of the search finished.
    """
    finished = [r for r in rows if r.status == "FINISHED" and _number(r.objective)]
    if not finished:
        raise ResultsError(f"experiment {search.experiment_name!r}: the search "
                           f"{search.run_id} has no finished trial yet")
    return sort_trials(finished, "objective", search)[0]


def sort_trials(rows: Iterable[TrialRow], key: str, search: Search) -> list[TrialRow]:
    """`rows` best first by `key`: `objective` (the default), `trial`, `params`, `flops`,
    `fit_time`, `epochs`, or any metric of the trial runs (e.g. `val_loss`).

    The objective and metrics sort best first (losses smallest, others largest); params,
    FLOPs, fit time and epochs smallest first. Rows without the value come last.

    Raises:
        ResultsError: `key` is none of these.
    """
    rows = sorted(rows, key=lambda r: r.trial_id)
    if key == "trial":
        return rows
    metric = SORT_KEYS.get(key, key)
    known = set(SORT_KEYS) | {name for r in rows for name in r.metrics}
    if key not in known:
        raise ResultsError(f"--sort: {key!r} is not one of {sorted(known)}")
    if metric == "objective":
        descending = search.direction == "max"
    else:
        descending = metric not in _SMALLEST_FIRST and not metric.endswith("loss")
    present = [r for r in rows if _number(r.metrics.get(metric))]
    missing = [r for r in rows if not _number(r.metrics.get(metric))]
    # sorted() is stable, also with reverse=True: ties keep trial order.
    return sorted(present, key=lambda r: r.metrics[metric], reverse=descending) + missing


def layer_table(tracker: tracking.Tracker, row: TrialRow) -> str:
    """The trial's layer table: each layer's type, output shape, parameters and FLOPs."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.client.download_artifacts(row.run_id, "architecture.txt", tmp)
        except Exception:  # an artifact store that is gone or was never written
            return f"(no architecture.txt artifact on run {row.run_id})"
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")


def ui_link(tracking_uri: str, search: Search, run_id: str) -> str:
    """Where a person sees `run_id` in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
    else:
        base = "http://127.0.0.1:5000"  # what `nas ui` serves by default
    return f"{base}/#/experiments/{search.experiment_id}/runs/{run_id}"


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command that shows the store at `tracking_uri`.

    Raises:
        ResultsError: the store is an MLflow server already (open it instead).
    """
    if tracking_uri.startswith(("http://", "https://")):
        raise ResultsError(f"--tracking-uri: {tracking_uri} is an MLflow server already; "
                           f"open it in a browser")
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


# --- reading runs --------------------------------------------------------------


def _get_run(tracker: tracking.Tracker, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_run(run_id)
    except MlflowException:
        raise ResultsError(f"--run: no run {run_id!r} in {tracker.tracking_uri}") from None


def _search(tracker: tracking.Tracker, run) -> Search:
    experiment = tracker.client.get_experiment(run.info.experiment_id)
    return Search(experiment_id=run.info.experiment_id, experiment_name=experiment.name,
                  run_id=run.info.run_id, status=run.info.status, params=dict(run.data.params),
                  metrics=dict(run.data.metrics), tags=dict(run.data.tags),
                  tracking_uri=tracker.tracking_uri)


def _trial_row(run, objective: str) -> TrialRow:
    metrics = dict(run.data.metrics)

    def number(name, kind=float):
        value = metrics.get(name)
        return kind(value) if _number(value) else None

    return TrialRow(
        trial_id=run.data.tags.get(tracking.TAG_TRIAL, "?"), run_id=run.info.run_id,
        status=run.info.status, objective=number("objective"), params=number("params", int),
        flops=number("flops", int), fit_seconds=number("fit_time_s"),
        epochs=number("epochs_trained", int),
        values={name: _decode(value) for name, value in run.data.params.items()},
        metrics=metrics, error=run.data.tags.get("nas.error"),
        artifact_uri=run.info.artifact_uri,
    )


def _decode(text: str):
    # `Tracker.log_params` writes strings as they are and everything else as JSON.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _listing(names: list[str]) -> str:
    if not names:
        return "no experiments"
    shown = ", ".join(repr(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")
