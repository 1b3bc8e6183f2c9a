"""MLflow: one parent run per search, one nested run per trial.

Everything goes through an explicit `MlflowClient`, not MLflow's global active run,
so the driver of a search on Ray and its tasks log into the same parent run.
Runs are context managers: a run ends FINISHED, FAILED when an exception escapes,
or KILLED when the process is interrupted; a run is always closed. A new local SQLite
store is created by one process at a time (`Tracker`), however many start at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    from mlflow.entities import Metric

from nas.errors import InputError, Interrupted

__all__ = ["Tracker", "TrackingError", "Interrupted", "TAG_KIND", "TAG_TRIAL", "TAG_SEARCH",
           "TAG_ERROR", "TAG_WORKER", "TAG_DEVICE", "TAG_NODE", "TAG_GPUS", "TAG_MAX_TRIALS",
           "TAG_FINGERPRINT", "TAG_DATA_DIGEST", "TAG_FINAL", "TAG_FLIPS", "TAG_REFIT",
           "TAG_MODEL_ERROR", "TAG_BEST_TRIAL", "TAG_BEST_RUN", "TAG_TRIAL_RUN", "score_tag"]

# The tags nas writes and reads back, named here alone. MLflow is imported only where it
# is used, so that reading these (`nas.results`, `nas trials`) costs no MLflow import.
TAG_KIND = "nas.kind"  # "search" or "trial"
# On a trial's run:
TAG_TRIAL = "nas.trial_id"  # (on a logged model: the ids of its trials)
TAG_SEARCH = "nas.search_run_id"  # the run of its search
TAG_ERROR = "nas.error"  # why it failed
TAG_WORKER = "nas.worker"  # the Ray worker that trained it ("local": the search's process)
TAG_DEVICE = "nas.device"  # the device it trained on
TAG_NODE = "nas.ray_node"  # the Ray node it trained on (a search on Ray)
TAG_GPUS = "nas.gpus"  # the GPUs Ray gave it ("-": none)
# On a search's run:
TAG_FINGERPRINT = "nas.fingerprint"  # found again by its settings (`SearchConfig.fingerprint`)
TAG_DATA_DIGEST = "nas.data_digest"  # a directory's files (`nas.data.Arrays.data_digest`)
TAG_MAX_TRIALS = "nas.max_trials"  # once it grew past its first budget
TAG_FINAL = "nas.final_trials"  # the trial(s) of its final model
TAG_REFIT = "nas.refit"  # "1" when its final model was retrained (--refit)
TAG_FLIPS = "nas.test_time_flips"  # "1" when its final model also sees mirror images
TAG_MODEL_ERROR = "nas.model_error"  # why its final model could not be logged
TAG_LATENCY = "nas.latency"  # what measured the final model's latency ("TFLite, 1 thread")
TAG_LATENCY_ERROR = "nas.latency_error"  # why a model's latency could not be measured
TAG_OVER_BUDGET = "nas.over_budget"  # a trial measured over --max-latency-ms: never chosen
TAG_BEST_TRIAL = "nas.best_trial_id"  # its best trial
TAG_BEST_RUN = "nas.best_run_id"  # the run of its best trial
# On a logged model: the trial run of its one trial ("" for an ensemble).
TAG_TRIAL_RUN = "nas.trial_run_id"


def score_tag(name: str) -> str:
    """The tag of a test score (`test_accuracy`) on a logged model and its registered
    version: `nas.test_accuracy`."""
    return f"nas.{name}"


# A trial's best-epoch weights (KerasTuner's checkpoint file name), logged as an artifact of
# its run when it enters the search's best K so far: the final model never needs a disk.
WEIGHTS = "checkpoint.weights.h5"
# MLflow 3's UI opens an experiment on the view this tag names; without it, a new
# experiment opens on the GenAI overview ("Traces: no data") instead of its runs.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# On an http store MLflow writes "🏃 View run NAME at: URL" and "🧪 View experiment at: URL"
# to stdout whenever a run ends (after asking the server for the run), unless this is
# true; nas prints its own lines. Read by MLflow at each run's end; the processes started
# after it is set inherit it.
NO_RUN_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
_MAX_BATCH_PARAMS = 100  # MLflow's limits per log_batch call
_MAX_BATCH_METRICS = 1000
_MAX_PARAM_LENGTH = 6000


class TrackingError(InputError):
    """The MLflow tracking store cannot be used; the message says which and why."""


# The signal a handler raised for, kept so that training raises it again at its next batch
# should library code have swallowed the first raise (None: none pending).
pending_interruption: BaseException | None = None


class Tracker:
    """Writes searches and trials to one MLflow tracking store.

    Creating one sets `NO_RUN_LINKS` in the process's environment, unless it is set.

    Args:
        tracking_uri: Where to log; None means MLflow's own rule
            (`MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` beside `./mlruns`).
    """

    def __init__(self, tracking_uri: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        os.environ.setdefault(NO_RUN_LINKS, "true")
        with _one_creator(tracking_uri or mlflow.get_tracking_uri()):
            self.client = MlflowClient(tracking_uri)  # opens the store: creates a new one
        self.tracking_uri = self.client.tracking_uri

    def check(self) -> None:
        """Fail fast, with one line, when the store cannot be reached."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            import requests

            try:
                requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
            except requests.RequestException as error:
                raise TrackingError(
                    f"`tracking_uri`: {uri} cannot be reached ({error.__class__.__name__})"
                ) from None
            return
        try:
            self.client.search_experiments(max_results=1)
        except Exception as error:  # any store error means the URI is unusable
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise TrackingError(f"`tracking_uri`: {uri} cannot be used ({first[:200]})") from None

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """The id of the experiment called `name`; created if missing and `create`."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            if create and TAG_EXPERIMENT_KIND not in experiment.tags:
                self.client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND,
                                               EXPERIMENT_KIND)
            return experiment.experiment_id
        if not create:
            return None
        try:
            return self.client.create_experiment(name,
                                                 tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:  # another process created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, experiment_id: str, name: str, tags: Mapping[str, str] | None = None,
                  parent_run_id: str | None = None, start_time: int | None = None) -> str:
        """A new RUNNING run; `start_time` (ms since the epoch) defaults to now."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = dict(tags or {})
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(experiment_id, start_time=start_time, run_name=name,
                                     tags=tags)
        return run.info.run_id

    @contextlib.contextmanager
    def run(self, experiment_id: str, name: str, tags: Mapping[str, str] | None = None,
            parent_run_id: str | None = None, run_id: str | None = None,
            reopen: bool = True) -> Iterator[str]:
        """A run that ends FINISHED, FAILED (an exception), or KILLED (an interrupt).

        With `run_id`, an existing run is used instead of a new one created, and set
        RUNNING again if `reopen` (a run just started with `start_run` already is).
        """
        if run_id is None:
            run_id = self.start_run(experiment_id, name, tags, parent_run_id)
        elif reopen:
            self.reopen_run(run_id)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except (KeyboardInterrupt, Interrupted):
            status = "KILLED"
            raise
        finally:
            self.end(run_id, status)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        self.log_batch(run_id, params=params)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_batch(run_id, self.metrics(metrics, step))

    @staticmethod
    def metrics(values: Mapping[str, float], step: int = 0) -> list[Metric]:
        """`values` as MLflow metrics stamped now, to log later in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(k, float(v), now, step) for k, v in values.items()]

    def log_batch(self, run_id: str, metrics: list[Metric] = (), params: Mapping = None,
                  tags: Mapping = None) -> None:
        """Everything in as few store writes as MLflow's batch limits allow."""
        from mlflow.entities import Param, RunTag

        params = [Param(str(k), _param_value(v)) for k, v in (params or {}).items()]
        tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        metrics = list(metrics)
        while metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics[:_MAX_BATCH_METRICS],
                                  params=params[:_MAX_BATCH_PARAMS], tags=tags[:_MAX_BATCH_PARAMS])
            metrics, params = metrics[_MAX_BATCH_METRICS:], params[_MAX_BATCH_PARAMS:]
            tags = tags[_MAX_BATCH_PARAMS:]

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        self.log_batch(run_id, tags=tags)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, os.fspath(path), artifact_path)

    def get_run(self, run_id: str):
        """The run `run_id` as MLflow holds it (`mlflow.entities.Run`).

        Raises:
            mlflow.exceptions.MlflowException: no such run.
        """
        return self.client.get_run(run_id)

    def reopen_run(self, run_id: str) -> None:
        """Set an ended run RUNNING again (a resumed search's, or a resumed trial's)."""
        self.client.update_run(run_id, status="RUNNING")

    def delete_tag(self, run_id: str, key: str) -> None:
        self.client.delete_tag(run_id, key)

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        """Every value of the metric `key` logged on the run, one per step."""
        return self.client.get_metric_history(run_id, key)

    def list_artifacts(self, run_id: str) -> list[str]:
        """The paths of the run's top-level artifacts."""
        return [artifact.path for artifact in self.client.list_artifacts(run_id)]

    def download_artifact(self, run_id: str, path: str, folder: str) -> str:
        """The run's artifact `path` copied into `folder`; its local path."""
        return self.client.download_artifacts(run_id, path, folder)

    def trial_runs(self, experiment_id: str, search_run_id: str,
                   trial_id: str | None = None) -> list:
        """Every trial run of one search (of its trial `trial_id` only, if given), oldest
        first."""
        where = f"tags.{TAG_SEARCH} = '{search_run_id}'"
        if trial_id is not None:
            where += f" and tags.`{TAG_TRIAL}` = '{trial_id}'"
        return self.client.search_runs([experiment_id], filter_string=where,
                                       order_by=["attributes.start_time ASC"],
                                       max_results=50000)

    def find_search_run(self, experiment: str, fingerprint: str):
        """The latest search run of the experiment called `experiment` whose settings have
        `fingerprint` (`SearchConfig.fingerprint`), or None. Reads only."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            return None
        runs = self.client.search_runs(
            [found.experiment_id], f"tags.`{TAG_KIND}` = 'search' and "
                                   f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def running_searches(self, experiment: str) -> list:
        """The search runs of the experiment called `experiment` that are RUNNING, newest
        first ([] without such an experiment). Reads only."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = self.client.search_runs(
            [found.experiment_id], filter_string="attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"], max_results=1000)
        return [r for r in runs if r.data.tags.get(TAG_KIND) == "search"]

    def logged_models(self, experiment_id: str, name: str) -> list:
        """The MLflow models called `name` logged in the experiment, newest first."""
        return self.client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name}'",
            order_by=[{"field_name": "creation_time", "ascending": False}])

    def model_version_by_alias(self, name: str, alias: str):
        """The registered model `name`'s version under `alias`, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:  # no such model or alias
            return None

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def close_stale_runs(self, experiment_id: str, search_run_id: str) -> int:
        """Close, as KILLED, the trial runs a dead process left RUNNING. Returns how many."""
        from mlflow.entities import RunStatus

        stale = [r for r in self.trial_runs(experiment_id, search_run_id)
                 if r.info.status == RunStatus.to_string(RunStatus.RUNNING)]
        for run in stale:
            self.client.set_tag(run.info.run_id, TAG_ERROR, "the process running it died")
            self.end(run.info.run_id, "KILLED")
        return len(stale)


@contextlib.contextmanager
def _one_creator(uri: str) -> Iterator[None]:
    """While inside, this process alone may create the local SQLite store at `uri`.

    MLflow creates its tables in an SQLite file the first time it opens the store
    (`MlflowClient`), without a lock of its own: two processes opening a new file at once
    both create them, and one fails (a table that already exists, or alembic's "Online
    migration expected to match one row"). Here the store is opened under an OS lock
    (`fcntl.flock`) on `<file>.lock` beside it, removed after: the second waits for the
    first and finds the tables made. Any other store, or a lock that cannot be made (MLflow
    then says why it cannot open the file): no lock.
    """
    path = _sqlite_file(uri)
    held = None
    if path is not None:
        try:
            held = _lock_file(path + ".lock")
        except OSError:
            pass
    try:
        yield
    finally:
        if held is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(held.name)  # while still held: a waiter then finds it gone
            held.close()


def _lock_file(path: str):
    """`path`, created if missing, opened and locked (waiting for its holder)."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as MLflow would
    while True:
        file = open(path, "a")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(file.fileno()), os.stat(path)):
                return file
        except FileNotFoundError:
            pass
        except BaseException:
            file.close()
            raise
        file.close()  # its holder removed it once done: lock the file there now


def _sqlite_file(uri: str) -> str | None:
    """The file of a local SQLite store, as SQLAlchemy (MLflow's) opens it; else None."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    if not url.database or url.database == ":memory:" or url.query.get("uri"):
        return None  # in memory, or an SQLite URI of its own
    return url.database


def _param_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM_LENGTH]

