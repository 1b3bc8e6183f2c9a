"""One search end to end: check the input, then data -> tuner -> MLflow -> best trials.

`prepare` does everything that can refuse bad input (specs are already loaded; data,
tracking store, resume state) and writes nothing; `run` trains and logs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import io
import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

from nas import pareto, results, tracking
from nas.data import Arrays, load_arrays
from nas.space import search_problem
from nas.specs import Constraints, Pipeline, SearchSpace
from nas.state import SearchLock, StateError, read_json, write_atomic

__all__ = ["EpochEnded", "SearchConfig", "SearchError", "SearchFailed", "SearchResult",
           "prepare", "run"]

STATE_FILE = "nas_search.json"  # in a search's project folder: its run id and settings
TAG_FINGERPRINT = "nas.fingerprint"  # on the search's run: found again by its settings
TAG_DATA_DIGEST = "nas.data_digest"  # on the search's run: a directory's files (Arrays)
TAG_MAX_TRIALS = "nas.max_trials"  # on the search's run, once it grew past its first budget
FLUSH_SECONDS = 10.0  # longest a trial's epoch metrics wait before they reach MLflow


class SearchError(ValueError):
    """The search cannot start as asked (the user's input); nothing was written."""


class SearchFailed(RuntimeError):
    """The search stopped because too many trials failed; `errors` says which and why."""

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message)
        self.errors = errors


@dataclasses.dataclass
class SearchConfig:
    """Everything one search needs; CLI flags land here."""

    space: SearchSpace
    pipeline: Pipeline
    tuner: str = "evolution"
    max_trials: int = 10
    time_limit: float | None = None  # seconds; with max_trials, whichever comes first
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    experiment: str | None = None
    tracking_uri: str | None = None
    workdir: str = ".nas"
    overwrite: bool = False
    max_failures: int = 3
    max_params: int | None = None
    max_flops: int | None = None
    mixed_precision: bool = False
    jit_compile: bool = False
    register: str | None = None  # Model Registry name for the final model
    ensemble: int = 3  # the final model averages the best this many trials (bench: quality)
    refit: bool = False  # retrain the final model's trials on training + validation data
    skip_bad_images: bool = False  # leave a directory's unreadable files out (else refused)
    # Scale-out (nas.distributed): "mirrored" trains one trial over all local GPUs;
    # `chief` HOST:PORT makes this process the chief (or, with `worker_id`, a worker).
    distribution: str | None = None
    chief: str | None = None
    worker_id: str | None = None
    worker_timeout: float = 60.0  # seconds of silence after which a worker is lost
    # The secret a worker shows the chief on every call (`nas.distributed`): the chief's
    # own (given, or made for the search), or the one a worker was given.
    worker_token: str | None = None
    # TLS for the chief's gRPC port: its certificate and key (PEM); a worker's CA (PEM).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"{self.space.name}-{self.pipeline.name}"

    @property
    def epochs_per_trial(self) -> int:
        return self.epochs or self.pipeline.epochs

    @property
    def constraints(self) -> Constraints:
        """The tightest of the budgets given by flags, the pipeline and the space."""
        return Constraints.tightest(Constraints(self.max_params, self.max_flops),
                                    self.pipeline.constraints, self.space.constraints)

    @property
    def project_name(self) -> str:
        return project_folder(self.experiment_name)

    @property
    def project_dir(self) -> Path:
        return Path(self.workdir) / self.project_name

    def fingerprint(self) -> str:
        """What must match for a search to resume: the specs and the tuner settings. Not
        its budget (`max_trials`, `time_limit`): a larger one grows the search."""
        parts = [self.space.text, self.pipeline.text, self.tuner, str(self.epochs_per_trial),
                 str(self.batch_size), str(self.seed), str(self.constraints)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def project_folder(experiment_name: str) -> str:
    """The folder, inside the working folder, that holds a search's KerasTuner state.

    Only word characters, dots and dashes, and no leading dot: an experiment name can
    never point outside the working folder (`--overwrite` deletes this folder).
    """
    return re.sub(r"[^\w.-]+", "_", experiment_name).lstrip(".") or "search"


@dataclasses.dataclass
class SearchResult:
    experiment_id: str
    search_run_id: str
    objective: str
    direction: str
    trials: list[results.TrialRow]  # as MLflow holds them (see nas.results)
    rejected: int
    resumed: bool
    # The final model's scores on the held-out test data (test_accuracy, test_loss,
    # test_samples), measured once after the search; empty without test data.
    test: dict = dataclasses.field(default_factory=dict)
    stopped_by_time: bool = False  # --time-limit ended it before --max-trials
    final_trials: list[str] = dataclasses.field(default_factory=list)  # the final model's
    refit: bool = False  # the final model was retrained on training + validation data

    @property
    def finished(self) -> list[results.TrialRow]:
        ranked = [t for t in self.trials if t.status == "FINISHED" and t.objective is not None]
        return sorted(ranked, key=lambda t: t.objective, reverse=self.direction == "max")

    @property
    def best(self) -> results.TrialRow | None:
        return self.finished[0] if self.finished else None


@dataclasses.dataclass(frozen=True)
class EpochEnded:
    """An epoch of a trial has ended: what `run(on_epoch=...)` receives, once an epoch.

    The times left are estimates, in seconds: `trial_left` is the trial's remaining
    epochs at the mean time of its epochs so far (early stopping may end it sooner);
    `search_left` adds the trials left at the mean time of a trial, or is what the time
    limit leaves when that is less (`time_limited`; the search starts no trial after).
    """

    trial_id: str
    trial: int  # its place in the search, 1-based, as in the line that ends it
    trials: int  # the search's budget of trials
    epoch: int  # epochs trained, 1-based
    epochs: int  # the trial's epochs, unless early stopping ends it first
    objective: str
    value: float  # this epoch's objective (nan when the epoch did not report it)
    best: float  # the trial's best so far
    trial_left: float
    search_left: float
    time_limited: bool


@dataclasses.dataclass
class Prepared:
    config: SearchConfig
    arrays: Arrays
    tracker: tracking.Tracker
    state: dict | None  # the saved state of the search being resumed
    previous: dict | None = None  # the state of a search that --overwrite replaces
    lock: SearchLock | None = None  # taken by `run`; `prepare` only checks it is free


def prepare(config: SearchConfig) -> Prepared:
    """Check everything the user gave us; raise before anything is written.

    Raises:
        SearchError, nas.data.DataError, nas.tracking.TrackingError.
    """
    if config.max_trials < 1:
        raise SearchError(f"--max-trials: {config.max_trials} must be at least 1")
    if config.epochs is not None and config.epochs < 1:
        raise SearchError(f"--epochs: {config.epochs} must be at least 1")
    if config.batch_size is not None and config.batch_size < 1:
        raise SearchError(f"--batch-size: {config.batch_size} must be at least 1")
    if config.max_failures < 1:
        raise SearchError(f"--max-failures: {config.max_failures} must be at least 1")
    if config.ensemble < 1:
        raise SearchError(f"--ensemble: {config.ensemble} must be at least 1")
    if config.time_limit is not None and config.time_limit <= 0:
        raise SearchError(f"--time-limit: {config.time_limit:g} s must be above 0")
    for flag, budget in (("--max-params", config.max_params), ("--max-flops", config.max_flops)):
        if budget is not None and budget < 1:
            raise SearchError(f"{flag}: {budget} must be at least 1")
    arrays = load_arrays(config.pipeline, config.skip_bad_images)
    # Before the tracking store is touched: a space nothing in can be trained is refused.
    problem = search_problem(config, arrays.input_shape, arrays.num_classes)
    if problem:
        raise SearchError(problem)
    _check_workdir(config.project_dir)
    lock = SearchLock(config.project_dir, config.experiment_name)
    lock.check()  # another process runs this search: refused before anything is written
    state = None
    state_file = config.project_dir / STATE_FILE
    if state_file.exists():
        try:
            state = read_json(state_file)
        except (OSError, StateError):
            state = {}  # found again in the tracking store (`run`), or refused there
        if (state and not config.overwrite
                and state.get("fingerprint") != config.fingerprint()):
            raise SearchError(_other_settings(config))
    tracker = tracking.Tracker(config.tracking_uri)
    tracker.check()
    if config.overwrite:
        return Prepared(config, arrays, tracker, None, previous=state or None, lock=lock)
    state = state or _found_in_store(tracker, config)
    problem = _unresumable(config, state) or _other_data(config, arrays, state)
    if problem:
        raise SearchError(problem)
    return Prepared(config, arrays, tracker, state, lock=lock)


def _other_settings(config: SearchConfig) -> str:
    return (f"--experiment: {config.experiment_name!r} already holds a search with other "
            f"settings (in {config.project_dir}); pass --overwrite to start afresh, or "
            f"choose another --experiment")


def _other_data(config: SearchConfig, arrays: Arrays, state: dict | None) -> str | None:
    """Why the search being resumed cannot go on with these files, or None: a directory's
    split is by file, so other files would give it another split."""
    if not state or state.get("data_digest", "") == arrays.data_digest:
        return None
    return (f"{config.pipeline.source_file}: data.path: the images in {config.pipeline.path} "
            f"changed since this search started ({state.get('data_files', '?')} files then, "
            f"{arrays.samples} now), so its split would differ; restore them, or pass "
            f"--overwrite to start afresh, or choose another --experiment")


def _check_workdir(folder: Path) -> None:
    """Refuse a working folder that cannot be created or written, without creating it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SearchError(f"--workdir: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SearchError(f"--workdir: {existing} is not writable")


def configure_tensorflow(config: SearchConfig) -> None:
    """GPU memory growth and seeds; before any model is built.

    Mixed precision is not set here: `nas.models.build_model` gives the policy to every
    layer (see there).
    """
    import keras
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # devices already initialized in this process
            pass
    keras.utils.set_random_seed(config.seed)


def device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name


_CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")  # a trial's per-epoch metrics


class TrialRuns:
    """Tuner hooks: one nested MLflow run per trial, per-epoch metrics, a progress line.

    A trial's run is written by one background thread, in order, while the main thread
    trains: it is queued once the first batch has trained (by then the model is built and
    its training step traced, and the main thread waits on TensorFlow's kernels, not on
    Python), or when the trial ends if it never trained. `trial_ended` waits for those
    writes and closes the run before KerasTuner records the trial as ended, so a finished
    trial is never left RUNNING in MLflow. `close()` waits for everything queued and closes,
    as KILLED, a run an interruption left open.
    """

    def __init__(self, tracker: tracking.Tracker, experiment_id: str, search_run_id: str,
                 config: SearchConfig, echo, total: int, on_epoch=None):
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.search_run_id = search_run_id
        self.objective = config.pipeline.objective
        self.direction = config.pipeline.direction
        self.echo = echo
        self.on_epoch = on_epoch  # called with an `EpochEnded` after each epoch
        self.total = total
        self.epochs = config.epochs_per_trial
        self.time_limit = config.time_limit
        self.runs: dict[str, str] = {}
        self.best: float | None = None
        # Every trial that enters the best `keep` so far has its weights logged to MLflow
        # (what the final model needs, whatever happens to this machine's disk).
        self.keep = max(1, config.ensemble)
        self.project_dir = config.project_dir
        self.scores: list[float] = []  # of the finished trials, this process's and earlier
        self.earlier = 0  # trials ended by earlier processes of a resumed search
        self.ended = 0  # trials ended by this process
        self.device = device_name()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "nas-mlflow")
        self._unclosed: set[str] = set()  # runs opened and not yet closed (writer thread)
        self._closed = False
        self._trial = None  # the current trial, its architecture and start (ms since epoch)
        self._opened: concurrent.futures.Future | None = None  # its run id, once queued
        self._flushes: list[concurrent.futures.Future] = []  # its metrics written so far
        self._pending: list = []
        self._started = self._flushed = time.perf_counter()
        self._epoch_ends: list[float] = []  # when the current trial's epochs ended
        self._trial_best: float | None = None
        self._trial_seconds: list[float] = []  # of the trials this process ended
        # The search's time spent (the time limit's clock): the oracle's, which counts
        # earlier processes of a resumed search, once `resume_from` has it.
        search_started = time.perf_counter()
        self._spent = lambda: time.perf_counter() - search_started

    def close(self) -> None:
        """Wait for every write queued; the search's run must not end before them."""
        if not self._closed:
            self._closed = True
            self._writer.submit(self._close_unclosed)
            self._writer.shutdown(wait=True)

    def resume_from(self, oracle) -> None:
        """Count and rank what an earlier process of this search already finished."""
        ended = [t for t in oracle.trials.values() if t.status in ("COMPLETED", "FAILED")]
        self.earlier = len(ended)
        if callable(getattr(oracle, "elapsed", None)):
            self._spent = oracle.elapsed
        scores = [t.score for t in ended if t.status == "COMPLETED" and t.score == t.score
                  and t.score is not None]
        self.scores = list(scores)
        if scores:
            self.best = max(scores) if self.direction == "max" else min(scores)

    def trial_started(self, trial, architecture, resumed: dict | None = None) -> None:
        """`resumed`: the state an earlier process left of this trial (`tuning.Resume`);
        its run is reopened and the trial goes on after its last finished epoch."""
        self._trial = (trial, architecture, int(time.time() * 1000),
                       (resumed or {}).get("run_id"))
        self._opened, self._flushes, self._pending = None, [], []
        self._logged_until = -1  # epochs the reopened run holds already
        self._started = self._flushed = time.perf_counter()
        self._epoch_ends, self._trial_best = [], None
        if resumed is not None and resumed.get("run_id"):
            try:  # read before training goes on, so no epoch is logged twice
                history = self.tracker.client.get_metric_history(resumed["run_id"],
                                                                 self.objective)
                self._logged_until = max((m.step for m in history), default=-1)
            except Exception:  # the run is gone: a new one is opened
                pass
        if resumed is not None:
            # Epochs the dead process trained but had not yet written to MLflow.
            for epoch in range(self._logged_until + 1, resumed["epoch"] + 1):
                self._pending += self.tracker.metrics(
                    {k: v[epoch] for k, v in resumed["history"].items()
                     if k in _CURVES and epoch < len(v)}, step=epoch)
            self._logged_until = max(self._logged_until, resumed["epoch"])
            done = resumed["epoch"] + 1
            self.echo(f"trial {trial.trial_id} resumes at epoch {done + 1} "
                      f"({'epoch 1 was' if done == 1 else f'epochs 1-{done} were'} trained "
                      f"by an earlier process)")

    def current_run_id(self) -> str | None:
        """The current trial's run, once it is written (None before)."""
        opened = self._opened
        if opened is None or not opened.done() or opened.exception() is not None:
            return None
        return opened.result()

    def batch_ended(self) -> None:
        if self._opened is None:
            self._opened = self._writer.submit(self._open_run, *self._trial)

    def _open_run(self, trial, architecture, start_time: int, earlier: str | None) -> str:
        tracker = self.tracker
        if earlier is not None and self._reopen(earlier, trial.trial_id):
            return earlier
        run_id = tracker.start_run(
            self.experiment_id, f"trial-{trial.trial_id}",
            tags={tracking.TAG_KIND: "trial", tracking.TAG_TRIAL: trial.trial_id,
                  tracking.TAG_SEARCH: self.search_run_id, "nas.device": self.device,
                  "nas.worker": os.environ.get("KERASTUNER_TUNER_ID", "local")},
            parent_run_id=self.search_run_id, start_time=start_time,
        )
        try:
            tracker.log_batch(run_id, params=trial.hyperparameters.values,
                              metrics=tracker.metrics({"params": architecture.params,
                                                       "flops": architecture.flops}))
            tracker.log_text(run_id, architecture.table() + "\n", "architecture.txt")
            tracker.log_dict(run_id, architecture.to_dict(), "architecture.json")
        except BaseException:
            tracker.end(run_id, "FAILED")  # a trial's run is always closed
            raise
        self._unclosed.add(run_id)
        return run_id

    def _reopen(self, run_id: str, trial_id: str) -> bool:
        """Reopen the run an earlier process trained this trial in; False if it is gone."""
        try:
            run = self.tracker.client.get_run(run_id)
        except Exception:
            return False
        if (run.data.tags.get(tracking.TAG_TRIAL) != trial_id
                or run.data.tags.get(tracking.TAG_SEARCH) != self.search_run_id):
            return False
        self.tracker.client.update_run(run_id, status="RUNNING")
        if "nas.error" in run.data.tags:  # "the process running it died": it lives again
            self.tracker.client.delete_tag(run_id, "nas.error")
        self._unclosed.add(run_id)
        return True

    def epoch_ended(self, trial, epoch: int, logs: dict) -> None:
        self.batch_ended()
        # A run that could not be written, or metrics that could not, stop the trial now.
        for future in [self._opened, *self._flushes]:
            if future.done() and future.exception() is not None:
                raise future.exception()
        # Batched: one store write per trial, plus one every FLUSH_SECONDS so a long
        # trial still shows its curves while it trains.
        if epoch > self._logged_until:  # each epoch's metrics once, a resumed trial's too
            self._pending += self.tracker.metrics(
                {k: float(v) for k, v in logs.items() if k in _CURVES}, step=epoch)
        if time.perf_counter() - self._flushed > FLUSH_SECONDS:
            self._flushes.append(self._writer.submit(self._flush, self._opened, self._pending))
            self._pending, self._flushed = [], time.perf_counter()
        if self.on_epoch is not None:
            self.on_epoch(self._epoch_event(trial, epoch, logs))

    def _epoch_event(self, trial, epoch: int, logs: dict) -> EpochEnded:
        now = time.perf_counter()
        self._epoch_ends.append(now)
        value = float(logs.get(self.objective, float("nan")))
        if value == value and (self._trial_best is None or (
                value > self._trial_best if self.direction == "max"
                else value < self._trial_best)):
            self._trial_best = value
        ends = [self._started, *self._epoch_ends]
        steps = [later - earlier for earlier, later in zip(ends, ends[1:])]
        # The first epoch also builds the model and traces its training step; once there
        # are later ones, they say better what an epoch takes.
        per_epoch = sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0]
        # Hyperband's trials have their own number of epochs; a resumed trial's epoch
        # numbers count the epochs an earlier process trained.
        epochs = max(int(trial.hyperparameters.values.get("tuner/epochs", self.epochs)),
                     epoch + 1)
        trial_left = per_epoch * (epochs - epoch - 1)
        place = self.earlier + self.ended + 1
        finished = self._trial_seconds
        per_trial = (sum(finished) / len(finished) if finished
                     else now - self._started + trial_left)
        search_left = trial_left + max(0, self.total - place) * per_trial
        time_limited = False
        if self.time_limit is not None:
            limit_left = max(0.0, self.time_limit - self._spent())
            if limit_left < search_left:
                search_left, time_limited = limit_left, True
        best = self._trial_best if self._trial_best is not None else float("nan")
        return EpochEnded(trial.trial_id, place, self.total, epoch + 1, epochs,
                          self.objective, value, best, trial_left, search_left, time_limited)

    def _flush(self, opened: concurrent.futures.Future, metrics: list) -> None:
        if opened.exception() is None:  # else the trial fails on that error already
            self.tracker.log_batch(opened.result(), metrics)

    def trial_ended(self, trial, architecture, history, fit_seconds, error) -> None:
        self.batch_ended()  # a trial that never trained gets its run too
        self.ended += 1
        try:
            run_id = self._opened.result()
        except Exception as failure:  # its run could not be written: the trial fails
            self.echo(f"trial {trial.trial_id} ({self.earlier + self.ended}/{self.total}): "
                      f"{self.objective} FAILED  (MLflow: {failure.__class__.__name__}: "
                      f"{failure})")
            if isinstance(error, (KeyboardInterrupt, tracking.Interrupted)):
                raise error from failure  # an interruption still stops the search
            raise
        self.runs[trial.trial_id] = run_id
        failed_flush = next((f.exception() for f in self._flushes if f.exception()), None)
        if error is None and failed_flush is not None:
            error = failed_flush  # its metrics could not be written: the trial fails
        status = "FINISHED"
        metrics, tags, weights = {"fit_time_s": fit_seconds}, {}, None
        if history is not None:
            values = [v for v in history.get(self.objective, []) if v == v]
            if values:
                best = max(values) if self.direction == "max" else min(values)
                metrics["objective"] = best
                metrics[f"best_{self.objective}"] = best
                metrics["epochs_trained"] = len(history[self.objective])
                better = self.best is None or (best > self.best if self.direction == "max"
                                               else best < self.best)
                self.best = best if better and error is None else self.best
                if error is None:
                    weights = self._weights_to_keep(trial.trial_id, best)
        if error is not None:
            status = ("KILLED" if isinstance(error, (KeyboardInterrupt, tracking.Interrupted))
                      else "FAILED")
            tags["nas.error"] = (f"{error.__class__.__name__}: "
                                 f"{str(error) or 'interrupted'}")[:5000]
        self._writer.submit(self._close_run, run_id, status,
                            self._pending + self.tracker.metrics(metrics), tags,
                            weights).result()
        done = self.earlier + self.ended
        self._trial_seconds.append(time.perf_counter() - self._started)
        shown = f"{metrics.get('objective', float('nan')):.4f}" if error is None else status
        best = f"{self.best:.4f}" if self.best is not None else "-"
        self.echo(f"trial {trial.trial_id} ({done}/{self.total}): {self.objective} {shown}  "
                  f"best {best}  params {architecture.params:,}  "
                  f"{time.perf_counter() - self._started:.1f} s")
        if failed_flush is not None and error is failed_flush:
            raise failed_flush  # KerasTuner records the trial as failed

    def _weights_to_keep(self, trial_id: str, score: float):
        """The trial's checkpoint if it is among the best `keep` finished so far, else None."""
        better = sum(s > score if self.direction == "max" else s < score for s in self.scores)
        self.scores.append(score)
        checkpoint = self.project_dir / f"trial_{trial_id}" / tracking.WEIGHTS
        return checkpoint if better < self.keep and checkpoint.is_file() else None

    def _close_run(self, run_id: str, status: str, metrics: list, tags: dict,
                   weights=None) -> None:
        self._unclosed.discard(run_id)
        try:
            if weights is not None:
                self.tracker.log_artifact(run_id, weights)
            self.tracker.log_batch(run_id, metrics, tags=tags)
        finally:
            self.tracker.end(run_id, status)  # a trial's run is always closed

    def _close_unclosed(self) -> None:
        for run_id in list(self._unclosed):
            self._close_run(run_id, "KILLED", [], {"nas.error": "interrupted"})


# What a search imports lazily once it runs: KerasTuner's TensorBoard support in its first
# trial (which pulls in boto3); MLflow's model flavor, pyfunc, git context and the tracing
# processors that setting its tracking URI resets, when the best model is logged;
# matplotlib's Agg canvas for the plot. Imported before the search's run starts, so that
# start-up is paid at start-up, not by the first and last trials.
IMPORT_AHEAD = ("tensorboard.plugins.hparams.api", "mlflow.tensorflow", "mlflow.pyfunc", "git",
                "mlflow.tracing.processor.base_mlflow", "mlflow.tracing.processor.otel",
                "matplotlib.figure", "matplotlib.backends.backend_agg")


def import_ahead() -> None:
    import importlib

    for name in IMPORT_AHEAD:
        try:
            importlib.import_module(name)
        except ImportError:  # only a head start: whoever needs it imports it (and says so)
            pass
    from PIL import Image

    Image.preinit()  # PIL's image writers (PNG), registered on first save


def raise_interrupted(signum, frame):
    """A signal handler: stop what runs as an `Interrupted` (SIGINT: KeyboardInterrupt), so
    runs close as KILLED. The interruption is also kept (`tracking.pending_interruption`)
    and raised again at the next batch, in case the code it landed in swallowed it."""
    error = (KeyboardInterrupt() if signum == signal.SIGINT
             else tracking.Interrupted(f"signal {signal.Signals(signum).name}"))
    tracking.pending_interruption = error
    raise error


def run(prepared: Prepared, echo=print, on_epoch=None) -> SearchResult:
    """Train the search's trials, logging each to MLflow; return what was found.

    `echo` receives each line the search reports (a trial's end, a resume, ...);
    `on_epoch`, if given, an `EpochEnded` after each epoch of a trial.

    The search holds its lock (`nas.state.SearchLock`) from before it writes anything
    until it returns or raises.

    Raises:
        nas.state.StateError: another process holds the search's lock.
        nas.tracking.Interrupted / KeyboardInterrupt: stopped by a signal; the state is
            saved and running the same command resumes.
        SearchFailed: too many consecutive trials failed; finished trials are kept.
    """
    config = prepared.config
    lock = prepared.lock or SearchLock(config.project_dir, config.experiment_name)
    lock.acquire()
    try:
        return _run(prepared, echo, on_epoch)
    finally:
        lock.release()


def _run(prepared: Prepared, echo, on_epoch) -> SearchResult:
    from nas.data import make_datasets, refit_dataset, test_dataset
    import keras_tuner as kt

    from nas import distributed, export, tuning

    config, tracker, arrays = prepared.config, prepared.tracker, prepared.arrays
    pipeline = config.pipeline
    configure_tensorflow(config)
    export.prepare_model_logging()  # no-op when `nas search` already started it
    import_ahead()
    # The search's inputs are ready before its run starts: the data was read by `prepare`,
    # and here becomes the tf.data pipelines every trial shares.
    datasets = make_datasets(arrays, config.batch_size or pipeline.batch_size, config.seed)
    project_dir = config.project_dir
    if config.overwrite and any((project_dir / f).exists() for f in (STATE_FILE, "oracle.json")):
        shutil.rmtree(project_dir)  # only ever a search's own state folder
    project_dir.mkdir(parents=True, exist_ok=True)

    experiment_id = tracker.experiment_id(config.experiment_name)
    if prepared.previous:
        _close_search(tracker, prepared.previous, echo)
    state = prepared.state
    resumed = state is not None
    if resumed and state.pop("found_in_store", False):
        echo(f"found this search in the tracking store (run {state['search_run_id']}); "
             f"going on from there")
    if resumed:
        search_run_id = state["search_run_id"]
        closed = tracker.close_stale_runs(experiment_id, search_run_id)
        if closed:
            echo(f"closed {closed} trial run(s) left running by an earlier process")
        budget = state.get("max_trials", config.max_trials)
        if config.max_trials > budget:
            echo(f"growing the search from {budget} to {config.max_trials} trials")
            tracker.set_tags(search_run_id, {TAG_MAX_TRIALS: config.max_trials})
        state = {**state, "max_trials": max(budget, config.max_trials)}
    else:
        search_run_id = tracker.start_run(
            experiment_id, f"search-{config.experiment_name}",
            tags={tracking.TAG_KIND: "search", TAG_FINGERPRINT: config.fingerprint(),
                  TAG_DATA_DIGEST: arrays.data_digest})
        _log_search(tracker, search_run_id, config, arrays)
        state = {"search_run_id": search_run_id, "experiment_id": experiment_id,
                 "fingerprint": config.fingerprint(), "max_trials": config.max_trials,
                 "data_digest": arrays.data_digest, "data_files": arrays.samples}
    write_atomic(project_dir / STATE_FILE, json.dumps(state))

    hypermodel = tuning.CandidateModel(config.space, arrays.input_shape, arrays.num_classes,
                                       arrays.pixel_scale, jit_compile=config.jit_compile,
                                       mixed_precision=config.mixed_precision)
    constraints = config.constraints

    def new_oracle():
        return tuning.make_oracle(
            config.tuner, tuning.declare(config.space),
            kt.Objective(pipeline.objective, pipeline.direction),
            max_trials=config.max_trials, seed=config.seed, max_epochs=config.epochs_per_trial,
            max_failures=config.max_failures,
            check=lambda values: hypermodel.check(values, constraints),
            time_limit=config.time_limit,
        )

    hooks = TrialRuns(tracker, experiment_id, search_run_id, config, echo, config.max_trials,
                      on_epoch)

    def new_tuner(oracle):
        with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner's "Reloading ..."
            return tuning.NasTuner(
                oracle, hypermodel, hooks,
                stopping=tuning.stopping_rule(config.tuner, pipeline.objective,
                                              pipeline.direction),
                directory=config.workdir,
                project_name=config.project_name, overwrite=False,
                distribution_strategy=distributed.strategy(config.distribution))

    tracking.pending_interruption = None
    previous = {signum: signal.signal(signum, raise_interrupted)
                for signum in (signal.SIGTERM, signal.SIGINT)
                if signum == signal.SIGTERM
                or signal.getsignal(signum) is signal.default_int_handler}
    with tracker.run(experiment_id, "", run_id=search_run_id, reopen=resumed):
        try:
            tuner = _open_tuner(config, tracker, experiment_id, search_run_id, resumed,
                                new_oracle, new_tuner, echo)
            hooks.resume_from(tuner.oracle)
            if resumed and _finished(tuner.oracle, config.max_trials):
                echo("the search had already finished; its results as logged (--overwrite "
                     "starts afresh)")
                return _result(tuner, tracker, experiment_id, search_run_id, config, resumed)
            if config.chief:  # workers train the trials; this process serves the oracle
                tuner = distributed.Chief(tuner, prepared, experiment_id, search_run_id, echo)
            # Garbage is collected once a trial (see NasTuner._try_build); with TensorFlow
            # and MLflow loaded a full collection takes ~0.5 s. Freezing what exists now
            # (modules, the data) leaves only the trials' own objects to scan.
            gc.freeze()
            try:
                _search(tuner, datasets.train, validation_data=datasets.validation,
                        epochs=config.epochs_per_trial, verbose=0, shuffle=False,
                        callbacks=tuning.early_stopping(pipeline.objective, pipeline.direction,
                                                        pipeline.early_stopping_patience))
            finally:
                hooks.close()
            result = _result(tuner, tracker, experiment_id, search_run_id, config, resumed)
            _log_outcome(tracker, search_run_id, result)
            # One after the other: both are Python-bound, and in two threads they take
            # longer than in turn.
            pareto.log_plot(tracker, search_run_id, result.finished, result.objective,
                            result.direction, title=f"search {config.experiment_name}")
            # The only place the test data is read: the final model, scored once.
            batch_size = config.batch_size or pipeline.batch_size
            test = test_dataset(arrays, batch_size)
            result.test, result.final_trials = export.log_best_model(
                tracker, search_run_id, tuner, result, register=config.register, echo=echo,
                test=None if test is None else (test, len(arrays.y_test)),
                ensemble=config.ensemble, seed=config.seed,
                refit=refit_dataset(arrays, batch_size, config.seed) if config.refit else None)
            result.refit = config.refit and bool(result.final_trials)
        finally:
            hooks.close()
            gc.unfreeze()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            tracking.pending_interruption = None
    return result


def _open_tuner(config: SearchConfig, tracker, experiment_id: str, search_run_id: str,
                resumed: bool, new_oracle, new_tuner, echo):
    """The search's tuner, its KerasTuner state reloaded, or rebuilt from the tracking store
    when it is missing or damaged (a resumed search only)."""
    from nas import ktcompat, tuning

    project_dir, tuner_file = config.project_dir, _tuner_file(config)
    # Damage shows as KerasTuner reloads (nas.ktcompat): the files are not read twice.
    damage = "missing" if resumed and not tuner_file.exists() else None
    if damage is None:
        try:
            return new_tuner(new_oracle())
        except (StateError, FileNotFoundError) as error:
            if not resumed:  # a race: `prepare` refuses such a folder
                raise SearchError(_unknown_state(config)) from None
            damage = f"damaged ({error})"
    echo(f"the search's state in {project_dir} is {damage}; rebuilding it from the tracking "
         f"store")
    if config.tuner == "hyperband":  # a damage `prepare` could not see (it reads JSON only)
        raise SearchError(_no_hyperband_rebuild(config))
    for stale in [project_dir / "oracle.json", tuner_file,
                  *project_dir.glob("trial_*/trial.json")]:
        stale.unlink(missing_ok=True)  # the checkpoints stay: the same trials' weights
    oracle = new_oracle()
    trials = _store_trials(tracker, experiment_id, search_run_id, config,
                           tuning.declare(config.space))
    ktcompat.rebuild(oracle, trials, config.workdir, config.project_name)
    ended = sum(t["status"] != "RUNNING" for t in trials)
    echo(f"rebuilt {_count(ended, 'ended trial')} from the tracking store"
         + (f"; {len(trials) - ended} interrupted one(s) will run again"
            if len(trials) > ended else ""))
    return new_tuner(oracle)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _tuner_file(config: SearchConfig) -> Path:
    return config.project_dir / f"{os.environ.get('KERASTUNER_TUNER_ID', 'tuner0')}.json"


def _damage(project_dir: Path, tuner_file: Path) -> str | None:
    """What is wrong with a search's KerasTuner state files, or None if they read back."""
    if not tuner_file.exists():
        return "missing"
    for path in [project_dir / "oracle.json", tuner_file,
                 *sorted(project_dir.glob("trial_*/trial.json"))]:
        try:
            read_json(path)
        except (OSError, StateError) as error:
            return f"damaged ({error})"
    return None


def _unresumable(config: SearchConfig, state: dict | None) -> str | None:
    """Why the search's working folder cannot be used as it is, or None (read only)."""
    tuner_file = _tuner_file(config)
    if state is None:
        if (config.project_dir / "oracle.json").exists() or tuner_file.exists():
            return _unknown_state(config)
        return None
    if config.tuner == "hyperband" and _damage(config.project_dir, tuner_file) is not None:
        return _no_hyperband_rebuild(config)
    return None


def _unknown_state(config: SearchConfig) -> str:
    return (f"--workdir: {config.project_dir} holds the KerasTuner state of a search that "
            f"neither it nor the tracking store knows; pass --overwrite to start afresh")


def _no_hyperband_rebuild(config: SearchConfig) -> str:
    return (f"--workdir: the hyperband state of {config.experiment_name!r} in "
            f"{config.project_dir} is missing or damaged and cannot be rebuilt (its brackets "
            f"are not in MLflow, its trials are); pass --overwrite to start afresh")


def _found_in_store(tracker, config: SearchConfig) -> dict | None:
    """The state of this search (same experiment and settings) as the tracking store holds
    it, when its working folder lost it; None if the store holds no such search. Reads
    only."""
    experiment = tracker.client.get_experiment_by_name(config.experiment_name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    runs = tracker.client.search_runs(
        [experiment.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'search' and "
                                    f"tags.`{TAG_FINGERPRINT}` = '{config.fingerprint()}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    params = run.data.params
    budget = run.data.tags.get(TAG_MAX_TRIALS) or params.get("max_trials")
    return {"search_run_id": run.info.run_id, "experiment_id": experiment.experiment_id,
            "fingerprint": config.fingerprint(), "found_in_store": True,
            "max_trials": int(budget) if budget else config.max_trials,
            "data_digest": run.data.tags.get(TAG_DATA_DIGEST, ""),
            "data_files": sum(int(params.get(f"{split}_samples", 0))
                              for split in ("train", "val", "test"))}


def _store_trials(tracker, experiment_id: str, search_run_id: str, config: SearchConfig,
                  hyperparameters) -> list[dict]:
    """The search's trials as its trial runs hold them, for `nas.ktcompat.rebuild`."""
    objective, direction = config.pipeline.objective, config.pipeline.direction
    found: dict[str, dict] = {}
    for run in tracker.trial_runs(experiment_id, search_run_id):  # oldest first
        trial_id = run.data.tags.get(tracking.TAG_TRIAL)
        if trial_id is None or found.get(trial_id, {}).get("status") == "COMPLETED":
            continue  # a trial that finished once is that trial
        status = {"FINISHED": "COMPLETED", "FAILED": "FAILED"}.get(run.info.status, "RUNNING")
        score, best_step = run.data.metrics.get("objective"), 0
        if status == "COMPLETED" and score is not None:
            history = tracker.client.get_metric_history(run.info.run_id, objective)
            if history:
                best = (max if direction == "max" else min)(history, key=lambda m: m.value)
                best_step = int(best.step)
        found[trial_id] = {"trial_id": trial_id, "status": status, "score": score,
                           "best_step": best_step,
                           "values": _values(hyperparameters, run.data.params)}
    return list(found.values())


def _values(hyperparameters, params: dict) -> dict:
    """A trial's hyperparameter values from its run's params (MLflow keeps strings)."""
    import keras_tuner as kt

    values = {}
    for hp in hyperparameters.space:
        text = params.get(hp.name)
        if text is None:
            continue
        if isinstance(hp, kt.engine.hyperparameters.Boolean):
            values[hp.name] = text in ("true", "True")
        elif isinstance(hp, kt.engine.hyperparameters.Int):
            values[hp.name] = int(float(text))
        elif isinstance(hp, kt.engine.hyperparameters.Float):
            values[hp.name] = float(text)
        else:
            choices = hp.values if hasattr(hp, "values") else [hp.value]
            values[hp.name] = next((v for v in choices if text in (str(v), json.dumps(v))),
                                   text)
    return values


def _finished(oracle, max_trials: int) -> bool:
    """Whether every trial of the search was trained (no trial is left to run)."""
    trials = oracle.trials.values()
    return len(trials) >= max_trials and all(t.status in ("COMPLETED", "FAILED")
                                             for t in trials)


def _search(tuner, *args, **kwargs) -> None:
    """`tuner.search`, with KerasTuner's too-many-failures error made readable."""
    try:
        tuner.search(*args, **kwargs)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        failed = [t for t in tuner.oracle.trials.values() if t.status in ("FAILED", "INVALID")]
        lines = [f"trial {t.trial_id}: {_last_line(t.message)}" for t in failed]
        raise SearchFailed(
            f"{tuner.oracle.max_consecutive_failed_trials} trials in a row failed "
            f"(--max-failures); finished trials are kept", lines) from None


def _last_line(message: str | None) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _close_search(tracker, state: dict, echo) -> None:
    """Close, as KILLED, what a search replaced by --overwrite left running."""
    run_id, experiment_id = state.get("search_run_id"), state.get("experiment_id")
    try:
        closed = tracker.close_stale_runs(experiment_id, run_id)
        if tracker.client.get_run(run_id).info.status == "RUNNING":
            tracker.end(run_id, "KILLED")
            closed += 1
    except Exception:  # the old run may be gone (deleted, or another store)
        return
    if closed:
        echo(f"closed {closed} run(s) of the replaced search as KILLED")


def _log_search(tracker, run_id: str, config: SearchConfig, arrays: Arrays) -> None:
    constraints = config.constraints
    tracker.log_params(run_id, {
        "space": config.space.name, "pipeline": config.pipeline.name, "tuner": config.tuner,
        "max_trials": config.max_trials, "epochs": config.epochs_per_trial,
        "batch_size": config.batch_size or config.pipeline.batch_size, "seed": config.seed,
        "objective": config.pipeline.objective, "max_failures": config.max_failures,
        "max_params": constraints.max_params, "max_flops": constraints.max_flops,
        "mixed_precision": config.mixed_precision, "jit_compile": config.jit_compile,
        "ensemble": config.ensemble, "refit": config.refit,
        "input_shape": list(arrays.input_shape), "num_classes": arrays.num_classes,
        "train_samples": len(arrays.x_train), "val_samples": len(arrays.x_val),
        "test_samples": len(arrays.x_test), "test_data": arrays.test_source,
    })
    tracker.log_text(run_id, config.space.text, f"specs/{config.space.name}.yaml")
    tracker.log_text(run_id, config.pipeline.text, f"specs/{config.pipeline.name}.yaml")
    tracker.log_dict(run_id, {"class_names": list(arrays.class_names),
                              "pixel_scale": arrays.pixel_scale}, "classes.json")
    skipped = arrays.files.skipped if arrays.files else ()
    if skipped:  # --skip-bad-images: which files the search left out
        tracker.log_params(run_id, {"skipped_images": len(skipped)})
        tracker.log_text(run_id, "\n".join(skipped) + "\n", "skipped_images.txt")


def _result(tuner, tracker, experiment_id, search_run_id, config, resumed) -> SearchResult:
    """The search's trials read back from MLflow, exactly as `nas trials` shows them."""
    search, _ = results.find_run(tracker, search_run_id)
    pipeline = config.pipeline
    return SearchResult(experiment_id, search_run_id, pipeline.objective, pipeline.direction,
                        results.list_trials(tracker, search), tuner.oracle.rejected, resumed,
                        test=search.test,
                        final_trials=[t for t in search.tags.get("nas.final_trials", "").split(",")
                                      if t],
                        stopped_by_time=getattr(tuner.oracle, "stopped_by_time", False),
                        refit=search.tags.get("nas.refit") == "1")


def _log_outcome(tracker, run_id: str, result: SearchResult) -> None:
    metrics = {
        "rejected_candidates": result.rejected,
        "finished_trials": len(result.finished),
        "failed_trials": sum(t.status == "FAILED" for t in result.trials),
    }
    tags = {}
    best = result.best
    if best is not None:
        metrics.update({"best_objective": best.objective, f"best_{result.objective}":
                        best.objective, "best_params": best.params, "best_flops": best.flops})
        tags = {"nas.best_trial_id": best.trial_id, "nas.best_run_id": best.run_id or ""}
    tracker.log_batch(run_id, tracker.metrics(metrics), tags=tags)
