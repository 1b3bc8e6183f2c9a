"""Read searches back from a tracking store: the trials of a search, the best one, its layer table.

Never TensorFlow, so `nas trials` and `nas best` answer without loading it. Everything
comes from what `nas search` logged (see `nas.tracking`): the search's parent run (tag
`nas.kind=search`) and one child run per trial (tag `nas.kind=trial`) with the trial's
hyperparameters as params, `objective`, `params`, `flops`, `fit_time_s` as metrics and the
layer table as the `architecture.txt` artifact.

The functions read through a `Reader` (`nas.reader`). `open_reader` gives the fast one on
a local SQLite store, `nas.mlflow_sqlite`'s: it reads MLflow's tables with the standard
library's `sqlite3`, read-only, without importing MLflow (which costs seconds); any other
store, or any SQLite error, is read with `MlflowClient`. Both give the same answers;
artifacts always come through MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import urllib.parse
from typing import Iterable

from nas.errors import InputError
from nas import funnel, mlflow_sqlite, tracking  # none imports MLflow
from nas.pareto import front_marks
from nas.reader import Experiment, Reader, Run
from nas.tracking import TAG_ERROR, TAG_FINAL, TAG_FLIPS, TAG_KIND, TAG_MAX_TRIALS, TAG_REFIT, \
    TAG_SEARCH, TAG_TRIAL

__all__ = ["ResultsError", "Search", "TrialRow", "Reader", "SORT_KEYS", "STATUSES",
           "open_store", "open_reader", "find_search", "find_run", "list_trials", "best_trial",
           "finished_trials", "select_trials", "sort_trials", "layer_table", "ui_command",
           "ui_link"]

# MLflow run statuses a trial's run can end with (RUNNING: still training, or its process died).
STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING")
# --sort keys besides any metric the trial runs carry; the value is the metric read.
SORT_KEYS = {"objective": "objective", "trial": None, "params": "params", "flops": "flops",
             "fit_time": "fit_time_s", "epochs": "epochs_trained", "latency": "latency_ms"}
_SMALLEST_FIRST = ("params", "flops", "fit_time_s", "epochs_trained", "latency_ms")


class ResultsError(InputError, LookupError):
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
        from nas.specs import direction_of

        return direction_of(self.objective)

    @property
    def max_trials(self) -> int | None:
        # A search grown past its first budget says so in a tag (params cannot change).
        value = self.tags.get(TAG_MAX_TRIALS) or self.params.get("max_trials")
        return int(value) if value is not None else None

    @property
    def final_trials(self) -> list[str]:
        """The trial ids of the search's final model (one, or its ensemble's); [] if none yet."""
        return [t for t in self.tags.get(TAG_FINAL, "").split(",") if t]

    @property
    def refit(self) -> bool:
        """Whether the final model was retrained on training + validation data (--refit)."""
        return self.tags.get(TAG_REFIT) == "1"

    @property
    def flips(self) -> bool:
        """Whether the final model averages each image and its mirror image
        (`train.test_time_flips`)."""
        return self.tags.get(TAG_FLIPS) == "1"

    @property
    def test(self) -> dict:
        """The final model's held-out test scores (test_accuracy, test_loss, test_samples)."""
        return {k: v for k, v in self.metrics.items() if k.startswith("test_")}


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
        """The choices a person compares trials by: depth, and per stage its filters, kernels,
        strides, pooling and 1x1 convolutions."""
        depth = self.values.get("depth")
        stages = range(1, depth + 1) if isinstance(depth, int) else ()

        def per_stage(name):
            return [self.values.get(f"stage_{s}/{name}") for s in stages]

        return {"depth": depth, "filters": per_stage("filters"),
                "kernels": per_stage("kernel_size"), "strides": per_stage("stride"),
                "pooling": per_stage("pool"), "pointwise": per_stage("pointwise")}

    @property
    def latency(self) -> float | None:
        """Its measured latency in ms at batch size 1 (`--latency`), or None."""
        return self.metrics.get("latency_ms")

    @property
    def fidelity(self) -> str:
        """What a funnel's trial trained on (`nas.funnel`): "20%" of the training data for
        a look, "100%" for a full training; "" outside a funnel."""
        share = self.values.get(funnel.SHARE)
        return "" if share is None else f"{float(share):.0%}"


def open_store(tracking_uri: str | None) -> tracking.Tracker:
    """A `Tracker` on an existing store; None means MLflow's default rule, as `nas search`.

    For the commands that need MLflow itself (artifacts, models, the UI); `open_reader`
    is the faster way to only read runs. Reading must not create a store (MLflow creates
    an SQLite database on first touch, and its tables in any SQLite file it opens), so a
    local store that does not exist yet, or an SQLite file without MLflow's tables, is
    refused.

    Raises:
        ResultsError: the local store does not exist, or is no MLflow store.
    """
    uri, path = _existing_store(tracking_uri)
    if path is not None:
        _sqlite_is_current(uri, path)  # for its refusals
    return _tracker(uri)


def open_reader(tracking_uri: str | None) -> Reader:
    """A `Reader` on an existing store, as `open_store` finds and checks it.

    A local SQLite store at MLflow's current schema is read with `sqlite3`, without
    importing MLflow; any other store with `MlflowClient`.

    Raises:
        ResultsError: the local store does not exist, or is no MLflow store.
    """
    uri, path = _existing_store(tracking_uri)
    if path is not None and _sqlite_is_current(uri, path):
        return mlflow_sqlite.SqliteReader(uri, path, lambda: _MlflowReader(_tracker(uri)))
    return _MlflowReader(_tracker(uri))


def find_search(store: Reader | tracking.Tracker, experiment: str | None = None) -> Search:
    """The latest search of `experiment`, or of the experiment searched most recently.

    Raises:
        ResultsError: no such experiment, or no search in it (or in the store).
    """
    reader = _reader(store)
    if experiment is None:
        experiment_ids = [e.experiment_id for e in reader.experiments()]
        where = f"the tracking store {reader.tracking_uri}"
    else:
        found = reader.experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            names = sorted(e.name for e in reader.experiments() if e.name != "Default")
            raise ResultsError(f"`experiment`: no experiment {experiment!r} in "
                               f"{reader.tracking_uri} (it holds: {_listing(names)})")
        experiment_ids = [found.experiment_id]
        where = f"experiment {experiment!r}"
    run = reader.latest_search(experiment_ids) if experiment_ids else None
    if run is None:
        raise ResultsError(f"no nas search in {where}; run `nas search` first")
    return _search(reader, run)


def find_run(store: Reader | tracking.Tracker,
             run_id: str) -> tuple[Search, TrialRow | None]:
    """The search a run belongs to, and the trial when `run_id` is a trial's run.

    Raises:
        ResultsError: no such run, or a run `nas search` did not write.
    """
    reader = _reader(store)
    run = _get_run(reader, run_id)
    kind = run.tags.get(TAG_KIND)
    if kind == "search":
        return _search(reader, run), None
    if kind == "trial":
        search = _search(reader, _get_run(reader, run.tags[TAG_SEARCH]))
        return search, _trial_row(run, search.objective)
    raise ResultsError(f"`run`: {run_id} is not the run of a nas search or trial "
                       f"(its tag {TAG_KIND} is {kind!r})")


def list_trials(store: Reader | tracking.Tracker, search: Search) -> list[TrialRow]:
    """One row per trial of `search`, in trial order.

    A trial run more than once (a search resumed after a crash) shows its finished run,
    else its latest one.
    """
    latest: dict[str, Run] = {}
    for run in _reader(store).trial_runs(search.experiment_id, search.run_id):
        trial_id = run.tags.get(TAG_TRIAL, "?")
        if trial_id not in latest or run.status == "FINISHED" or \
                latest[trial_id].status != "FINISHED":
            latest[trial_id] = run
    return [_trial_row(run, search.objective) for _, run in sorted(latest.items())]


def best_trial(rows: Iterable[TrialRow], search: Search) -> TrialRow:
    """The finished trial with the best objective (the lowest trial id on a tie).

    Raises:
        ResultsError: no trial of the search finished.
    """
    finished = finished_trials(rows)
    if not finished:
        raise ResultsError(f"experiment {search.experiment_name!r}: the search "
                           f"{search.run_id} has no finished trial yet")
    return sort_trials(finished, "objective", search)[0]


def finished_trials(rows: Iterable[TrialRow]) -> list[TrialRow]:
    """The trials that finished with a score of the objective, in the order given."""
    return [r for r in rows if r.status == "FINISHED" and _number(r.objective)]


def select_trials(rows: Iterable[TrialRow], search: Search, status: str | None = None,
                  pareto: bool = False, sort: str = "objective",
                  limit: int | None = None) -> tuple[list[TrialRow], dict[str, str]]:
    """The trials `nas trials` shows, and the Pareto fronts each is on.

    Args:
        rows: The search's trials (`list_trials`).
        status: Only the trials whose run ended so (one of `STATUSES`, any case).
        pareto: Only the finished trials on a Pareto front of the objective against
            parameters or FLOPs.
        sort: The order, as `sort_trials` takes it.
        limit: At most this many, the first in that order.

    Returns:
        The rows, and with `pareto` for each row's run id its fronts, e.g. "params",
        "flops", "params,flops" or "params,flops,latency" (an empty mapping without
        `pareto`).

    Raises:
        ResultsError: `status` or `sort` is none of those allowed.
    """
    rows = list(rows)
    if status is not None:
        if status.upper() not in STATUSES:
            raise ResultsError(f"`status`: {status!r} is not one of {list(STATUSES)}")
        rows = [r for r in rows if r.status == status.upper()]
    marks = {}
    if pareto:
        finished = [r for r in rows if r.status == "FINISHED"]
        marks = {r.run_id: ",".join(fronts) for r, fronts in
                 zip(finished, front_marks(finished, search.direction))}
        rows = [r for r in rows if marks.get(r.run_id)]
    rows = sort_trials(rows, sort, search)[:limit]
    return rows, {r.run_id: marks[r.run_id] for r in rows} if pareto else {}


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
        raise ResultsError(f"`sort`: {key!r} is not one of {sorted(known)}")
    if metric == "objective":
        descending = search.direction == "max"
    else:
        descending = metric not in _SMALLEST_FIRST and not metric.endswith("loss")
    present = [r for r in rows if _number(r.metrics.get(metric))]
    missing = [r for r in rows if not _number(r.metrics.get(metric))]
    # sorted() is stable, also with reverse=True: ties keep trial order.
    return sorted(present, key=lambda r: r.metrics[metric], reverse=descending) + missing


def layer_table(store: Reader | tracking.Tracker, row: TrialRow) -> str:
    """The trial's layer table: each layer's type, output shape, parameters and FLOPs."""
    tracker = store.tracker if isinstance(store, Reader) else store
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download_artifact(row.run_id, "architecture.txt", tmp)
        except Exception:  # an artifact store that is gone or was never written
            return f"(no architecture.txt artifact on run {row.run_id})"
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")


# MLflow 3.17's UI opens an experiment on the view of its "workflow type", GenAI apps
# (its default, kept in the browser) or machine learning, whatever the experiment's tag
# `mlflow.experimentKind` says (nas.tracking sets it, for the UIs that read it); this
# parameter of a link chooses machine learning: the experiment opens on its runs.
UI_WORKFLOW = "workflowType=machine_learning"


def ui_link(tracking_uri: str, search: Search, run_id: str | None = None,
            server: str | None = None) -> str:
    """Where a person sees the search's experiment, or its run `run_id`, in the MLflow UI.

    `server` is the UI's address; by default the tracking server, or for a local store
    what `nas ui` serves by default.
    """
    if server is None and tracking_uri.startswith(("http://", "https://")):
        server = tracking_uri
    base = (server or "http://127.0.0.1:5000").rstrip("/")  # `nas ui`'s default
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base}/#/experiments/{search.experiment_id}/{page}?{UI_WORKFLOW}"


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command that shows the store at `tracking_uri`.

    Raises:
        ResultsError: the store is an MLflow server already (open it instead).
    """
    if tracking_uri.startswith(("http://", "https://")):
        raise ResultsError(f"`tracking_uri`: {tracking_uri} is an MLflow server already; "
                           f"open it in a browser")
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


# --- reading runs --------------------------------------------------------------


class _MlflowReader(Reader):
    """Any store, through `MlflowClient`; its errors become one `ResultsError` line."""

    def __init__(self, tracker: tracking.Tracker):
        self._tracker = tracker
        self.tracking_uri = tracker.tracking_uri

    @property
    def tracker(self) -> tracking.Tracker:
        return self._tracker

    def experiments(self) -> list[Experiment]:
        with _mlflow_errors(self.tracking_uri):
            return [_experiment(e) for e in self._tracker.client.search_experiments()]

    def experiment(self, experiment_id: str) -> Experiment:
        with _mlflow_errors(self.tracking_uri):
            return _experiment(self._tracker.client.get_experiment(experiment_id))

    def experiment_by_name(self, name: str) -> Experiment | None:
        with _mlflow_errors(self.tracking_uri):
            found = self._tracker.client.get_experiment_by_name(name)
        return None if found is None else _experiment(found)

    def latest_search(self, experiment_ids: list[str]) -> Run | None:
        with _mlflow_errors(self.tracking_uri):
            runs = self._tracker.client.search_runs(
                experiment_ids, filter_string=f"tags.`{TAG_KIND}` = 'search'",
                order_by=["attributes.start_time DESC"], max_results=1)
        return _run(runs[0]) if runs else None

    def run(self, run_id: str) -> Run | None:
        from mlflow.exceptions import MlflowException

        with _mlflow_errors(self.tracking_uri):
            try:
                return _run(self._tracker.client.get_run(run_id))
            except MlflowException as error:
                if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    return None
                raise

    def trial_runs(self, experiment_id: str, search_run_id: str) -> list[Run]:
        with _mlflow_errors(self.tracking_uri):
            return [_run(r) for r in self._tracker.trial_runs(experiment_id, search_run_id)]


def _reader(store: Reader | tracking.Tracker) -> Reader:
    return store if isinstance(store, Reader) else _MlflowReader(store)


def _experiment(experiment) -> Experiment:
    return Experiment(experiment.experiment_id, experiment.name, experiment.lifecycle_stage)


def _run(run) -> Run:
    return Run(run_id=run.info.run_id, experiment_id=run.info.experiment_id,
               status=run.info.status, artifact_uri=run.info.artifact_uri,
               tags=dict(run.data.tags), params=dict(run.data.params),
               metrics=dict(run.data.metrics))


def _get_run(reader: Reader, run_id: str) -> Run:
    run = reader.run(run_id)
    if run is None:
        raise ResultsError(f"`run`: no run {run_id!r} in {reader.tracking_uri}")
    return run


def _search(reader: Reader, run: Run) -> Search:
    experiment = reader.experiment(run.experiment_id)
    return Search(experiment_id=run.experiment_id, experiment_name=experiment.name,
                  run_id=run.run_id, status=run.status, params=dict(run.params),
                  metrics=dict(run.metrics), tags=dict(run.tags),
                  tracking_uri=reader.tracking_uri)


def _trial_row(run: Run, objective: str) -> TrialRow:
    metrics = dict(run.metrics)

    def number(name, kind=float):
        value = metrics.get(name)
        return kind(value) if _number(value) else None

    return TrialRow(
        trial_id=run.tags.get(TAG_TRIAL, "?"), run_id=run.run_id,
        status=run.status, objective=number("objective"), params=number("params", int),
        flops=number("flops", int), fit_seconds=number("fit_time_s"),
        epochs=number("epochs_trained", int),
        values={name: _decode(value) for name, value in run.params.items()},
        metrics=metrics, error=run.tags.get(TAG_ERROR),
        artifact_uri=run.artifact_uri,
    )


# --- finding and checking the store ------------------------------------------------


def _existing_store(tracking_uri: str | None) -> tuple[str, str | None]:
    """The store's URI and, for a local SQLite store, its file; a missing local store refused."""
    uri = tracking_uri or _default_tracking_uri()
    path = None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?")[0]
    elif uri.startswith("file:"):
        path = urllib.parse.urlparse(uri).path
    elif "://" not in uri and uri not in ("databricks",):
        path = uri
    if path and path != ":memory:" and not os.path.exists(path):
        raise ResultsError(f"`tracking_uri`: {uri} does not exist (no search was logged "
                           f"there); run `nas search` first, or give `tracking_uri` / "
                           f"MLFLOW_TRACKING_URI")
    sqlite_file = uri.startswith("sqlite:///") and path not in ("", ":memory:")
    return uri, path if sqlite_file else None


def _default_tracking_uri() -> str:
    """`mlflow.get_tracking_uri()`, without importing MLflow when the answer is plain."""
    if "mlflow" in sys.modules:  # it may have been set in this process
        return sys.modules["mlflow"].get_tracking_uri()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.name != "posix" or _has_mlruns_data():
        import mlflow  # its older default, ./mlruns, or Windows paths: MLflow's own rule

        return mlflow.get_tracking_uri()
    return "sqlite:///" + urllib.parse.quote(os.path.abspath("mlflow.db"))


def _has_mlruns_data() -> bool:
    # MLflow keeps ./mlruns as the default store when it holds experiments (meta.yaml).
    try:
        with os.scandir("mlruns") as entries:
            return any(e.is_dir() and e.name.isdigit() and
                       os.path.lexists(os.path.join(e.path, "meta.yaml")) for e in entries)
    except OSError:
        return False


def _sqlite_is_current(uri: str, path: str) -> bool:
    """Whether the fast reader reads the SQLite store at `path` (see `nas.mlflow_sqlite`).

    Raises:
        ResultsError: the file is no SQLite database, or holds none of MLflow's tables
            (MLflow would write its own into it).
    """
    try:
        return mlflow_sqlite.is_current(path)
    except mlflow_sqlite.NotADatabase as error:
        raise ResultsError(f"`tracking_uri`: {uri} cannot be read ({error})") from None
    except mlflow_sqlite.NotMlflow:
        raise ResultsError(
            f"`tracking_uri`: {uri} is not an MLflow tracking store (an SQLite database "
            f"without MLflow's tables); give the store `nas search` logged to, with "
            f"`tracking_uri` / MLFLOW_TRACKING_URI") from None


def _tracker(uri: str) -> tracking.Tracker:
    with _mlflow_errors(uri):
        tracker = tracking.Tracker(uri)
    if uri.startswith(("http://", "https://")):
        try:
            tracker.check()  # MLflow would retry an unreachable server for minutes
        except tracking.TrackingError as error:
            raise ResultsError(error.message) from None
    return tracker


@contextlib.contextmanager
def _mlflow_errors(uri: str):
    """MLflow's errors on a store it cannot read, as one `ResultsError` line."""
    try:
        yield
    except ResultsError:
        raise
    except Exception as error:  # MLflow, SQLAlchemy or HTTP: the store is unusable
        text = str(error).strip()
        first = text.splitlines()[0] if text else error.__class__.__name__
        if len(first) > 200:
            first = first[:197] + "..."
        raise ResultsError(f"`tracking_uri`: {uri} cannot be read ({first})") from None


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
