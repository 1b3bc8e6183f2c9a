"""Scale out on Ray: one search's trials as Ray tasks, on a local Ray or on a cluster.

The driver (the `nas search --ray` process) is a search as `nas.search.run` runs it: it
owns the oracle (the guard, the time limit, the funnel), the parent MLflow run and the
state files, and resumes as a local search does. Only the training moves: `drive`, called
by `nas.search.run` in place of the tuner's own loop, hands each trial the oracle proposes
to a Ray task, at most `max_concurrent` at once, each asking Ray for `cpus_per_trial` CPUs
and `gpus_per_trial` GPUs (fractions allowed; Ray sets CUDA_VISIBLE_DEVICES, so a trial
sees only the GPUs it was given), and ends the trial in the oracle with what it returns.

A task (`_train`) trains its trial with the code of a local search: in each Ray worker
process the search's tuner (`nas.tuning.NasTuner`) and trial runs
(`nas.trial_runs.TrialRuns`) are made once, over a stand-in for the oracle that holds the
one trial the driver sent (`_Relay`). The trial logs its nested MLflow run itself, tagged
with its Ray worker, node and GPUs, and saves each epoch in the working folder. A task
whose process or node dies is run again by Ray (up to `max_retries` times): where the
working folder is shared it goes on from the last saved epoch, in a new run that holds the
whole curve, and the run of the lost attempt is closed KILLED; after the last retry the
trial is FAILED and the search goes on. What the tasks report (trial and epoch events)
reaches the driver's callback through a Ray queue.

Ray is imported only here, and only when a search runs on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

from nas import funnel, tracking
from nas.errors import SearchError
from nas.search import Prepared
from nas.settings import LOCAL_RAY, SearchConfig

__all__ = ["LOCAL", "check_store", "concurrency", "connect", "drive", "prepare", "run",
           "TAG_NODE", "TAG_GPUS"]

LOCAL = LOCAL_RAY  # `--ray` without an address: a Ray started for the search, stopped after it
POLL_SECONDS = 0.5  # how often the driver passes on the tasks' events while it waits
TAG_NODE = tracking.TAG_NODE
TAG_GPUS = tracking.TAG_GPUS
_LOCAL_SCHEMES = ("", "file", "sqlite")  # stores that are files on the driver's machine


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every task of one search needs, sent with each (Ray keeps one copy)."""

    config: SearchConfig  # its working folder and tracking store as absolute paths
    experiment_id: str
    search_run_id: str


# --- the driver ---------------------------------------------------------------------


def prepare(config: SearchConfig) -> Prepared:
    """Connect to Ray (starting a local one for `config.scale.ray == LOCAL`), check the
    cluster can run the search (its resources, a tracking store every node reaches), then
    the search itself (`nas.search.prepare`). Writes nothing; a local Ray started here is
    stopped again when it refuses.

    Ray starts (or is connected to) in a thread while this one checks the search and
    loads its data, and the trials' Ray workers start importing TensorFlow as soon as it
    is up: a local Ray's start-up is mostly waiting for its processes.

    Raises:
        SearchError, nas.errors.DataError, nas.tracking.TrackingError.
    """
    import mlflow

    from nas import search

    scale = config.scale
    starting = _Starting(scale, config.budget.max_trials)
    starting.start()

    def checks() -> None:  # before the search opens its tracking store
        started = starting.result()  # its refusal (SearchError) raised here
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        _check_resources(scale, nodes, started)
        # The store as MLflow will open it; not opened yet: a refusal writes nothing.
        check_store(config.tracking_uri or mlflow.get_tracking_uri(), nodes,
                    ray.util.get_node_ip_address())

    try:
        return search.prepare(config, checks)
    except BaseException:
        starting.stop()
        raise


class _Starting(threading.Thread):
    """Starts a local Ray (or connects to a cluster) while the driver checks the search,
    then the Ray workers that will train the first trials importing what they need
    (`_warm_up`); and lives until Ray is stopped (`stop`): a local Ray's processes are
    children of the thread that started them and die with it (Linux's PR_SET_PDEATHSIG)."""

    current: _Starting | None = None  # the one of this process's search

    def __init__(self, scale, max_trials: int):
        super().__init__(name="nas-ray", daemon=True)
        self.scale, self.max_trials = scale, max_trials
        self.started: bool | None = None  # a local Ray started here (None: not yet, failed)
        self.warming: list = []  # the `_warm_up` tasks
        self.error: BaseException | None = None
        self._ready, self._stopped = threading.Event(), threading.Event()
        _Starting.current = self

    def run(self) -> None:
        try:
            self.started = connect(self.scale.ray)
            import ray

            warm = ray.remote(_warm_up).options(num_cpus=self.scale.cpus_per_trial,
                                                num_gpus=self.scale.gpus_per_trial)
            # as many as run at once, and no more than the cluster holds now (the driver
            # waits for them: on a cluster that an autoscaler grows, the rest come later)
            holds = concurrency(dataclasses.replace(self.scale, max_concurrent=None),
                                ray.cluster_resources())
            self.warming = [warm.remote() for _ in range(min(
                holds, self.scale.max_concurrent or holds, self.max_trials))]
        except BaseException as error:
            self.error = error
        finally:
            self._ready.set()
        self._stopped.wait()

    def result(self) -> bool:
        """True when a local Ray was started; its refusal raised once it is known."""
        self._ready.wait()
        if self.error is not None:
            raise self.error
        return bool(self.started)

    def warmed(self) -> None:
        """Wait for the warm-up tasks: a trial sent to Ray while they run would start a
        new Ray worker, which imports everything again, instead of taking a warmed one."""
        import ray

        with contextlib.suppress(Exception):  # a lost warm-up: the trial's worker imports
            ray.wait(self.warming, num_returns=len(self.warming), timeout=60)

    def stop(self) -> None:
        """Stop the local Ray started here (once it is up), and end the thread."""
        self._ready.wait()
        if self.started:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if _Starting.current is self:
            _Starting.current = None
        self._stopped.set()


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at `address` ("auto": the one `RAY_ADDRESS`
    or a running local head names), or start a local Ray for `LOCAL`. True when a local
    Ray was started here (stop it with `ray.shutdown()`).

    Raises:
        SearchError: no cluster answers there.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no notice, nothing sent
    if address == LOCAL and "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        # Token authentication, as Ray 2.60 turns it on for a new local Ray, only without
        # its notice. Before Ray is imported: it reads the mode then. A cluster's mode is
        # its own: the driver must use the same (RAY_AUTH_MODE as the cluster's nodes have
        # it), else Ray refuses its calls, or its actors (InvalidAuthToken).
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():
        return False
    options = {"logging_level": logging.WARNING, "log_to_driver": False,
               "runtime_env": {"env_vars": {
                   "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}}}
    # Started from `_Starting`'s thread, Ray notes that it set no SIGTERM handler: nas
    # handles SIGTERM itself while it searches (`nas.assembly`).
    logging.getLogger("ray._private.worker").addFilter(_no_sigterm_note)
    if address == LOCAL:
        # "local": a new Ray of its own, even where another runs on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 **options)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise SearchError(f"`ray`: no Ray cluster answers at {address!r}, or it refused this "
                          f"driver ({first}); its RAY_AUTH_MODE and token must be the "
                          f"cluster's") from None
    return False


def _no_sigterm_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse at once a HOST:PORT where nothing listens: Ray itself would try for minutes.
    ("auto", a `ray://` client address and the like are left to Ray.)"""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise SearchError(f"`ray`: no Ray cluster answers at {address!r} "
                          f"({error.strerror or error.__class__.__name__})") from None


def check_store(tracking_uri: str, nodes: list[dict], here: str) -> None:
    """Refuse a tracking store that is a file on this machine when the Ray cluster has
    nodes on other machines: their trials could not log to it.

    Raises:
        SearchError
    """
    from urllib.parse import urlparse

    elsewhere = sorted({n.get("NodeManagerAddress") for n in nodes} - {here, None})
    if elsewhere and urlparse(tracking_uri).scheme in _LOCAL_SCHEMES:
        raise SearchError(
            f"`tracking_uri`: {tracking_uri} is a file on this machine, which the Ray nodes "
            f"at {', '.join(elsewhere)} cannot reach; give a tracking server every node "
            f"reaches (`mlflow server`, e.g. http://HOST:5000)")


def _check_resources(scale, nodes: list[dict], local: bool) -> None:
    """Refuse what no node can give a trial. On a cluster, only a note: an autoscaler may
    yet add such nodes (Ray then waits for them)."""
    asked = {"CPU": scale.cpus_per_trial, "GPU": scale.gpus_per_trial}
    for name, amount in asked.items():
        most = max((n.get("Resources", {}).get(name, 0.0) for n in nodes), default=0.0)
        if amount > most:
            flag = "`cpus_per_trial`" if name == "CPU" else "`gpus_per_trial`"
            line = (f"{flag}: {amount:g} {name}s per trial, but no node of the Ray cluster "
                    f"has that many (at most {most:g})")
            if local:
                raise SearchError(line)
            logging.getLogger("nas").warning(line + "; trials wait for a node that has")


def concurrency(scale, resources: dict) -> int:
    """Trials at once: `max_concurrent`, else as many as the cluster's CPUs and GPUs hold
    (at least one)."""
    if scale.max_concurrent:
        return scale.max_concurrent
    fits = [resources.get("CPU", 0.0) / scale.cpus_per_trial]
    if scale.gpus_per_trial:
        fits.append(resources.get("GPU", 0.0) / scale.gpus_per_trial)
    return max(1, math.floor(min(fits) + 1e-9))


def run(prepared: Prepared, callback=None):
    """Run the search with its trials on Ray (`prepare` connected this process); the
    search's `SearchResult`. A local Ray started by `prepare` is stopped after it."""
    import ray

    from nas import search
    from nas.events import Callback

    callback = callback if callback is not None else Callback()
    local = prepared.config.scale.ray == LOCAL
    starting = _Starting.current
    stopping: list[threading.Thread] = []

    def serve(tuner, experiment_id: str, search_run_id: str) -> None:
        drive(tuner, prepared, experiment_id, search_run_id, callback)
        if local and starting is not None:  # no task runs now: the local Ray stops
            stopping.append(threading.Thread(target=starting.stop, name="nas-ray-stop"))
            stopping[0].start()  # while the final model is made

    try:
        return search.run(prepared, callback, serve=serve)
    finally:
        for thread in stopping:
            thread.join()
        if starting is not None:
            starting.stop()
        elif local and ray.is_initialized():
            ray.shutdown()


def drive(tuner, prepared: Prepared, experiment_id: str, search_run_id: str,
          callback) -> None:
    """Train the trials `tuner`'s oracle proposes as Ray tasks, until it stops and every
    task has ended (`nas.search.run`'s `serve`).

    Raises:
        RuntimeError: too many consecutive trials failed (KerasTuner's, from `end_trial`).
        nas.errors.Interrupted / KeyboardInterrupt: the tasks are cancelled, their runs
            closed KILLED; the state is saved and the same command resumes.
    """
    import ray
    from keras_tuner.engine import trial as trial_module

    status = trial_module.TrialStatus
    config, scale, tracker = prepared.config, prepared.config.scale, prepared.tracker
    oracle = tuner.oracle
    oracle.verbose = 0
    tuner.save()  # so a restarted driver reloads the oracle and resumes
    job = _Job(_portable(config, tracker.tracking_uri), experiment_id, search_run_id)
    arrays = ray.put(dataclasses.replace(prepared.arrays, x_test=prepared.arrays.x_test[:0],
                                         y_test=prepared.arrays.y_test[:0]))
    train = ray.remote(_train).options(num_cpus=scale.cpus_per_trial,
                                       num_gpus=scale.gpus_per_trial,
                                       max_retries=scale.max_retries)
    resources = ray.cluster_resources()
    slots = concurrency(scale, resources)
    gpus = f" and {scale.gpus_per_trial:g} GPU" if scale.gpus_per_trial else ""
    callback.on_message(
        f"on Ray: {slots} trial{'' if slots == 1 else 's'} at once, each with "
        f"{scale.cpus_per_trial:g} CPU{gpus} (the cluster has {resources.get('CPU', 0):g} "
        f"CPUs, {resources.get('GPU', 0):g} GPUs)")
    free = [f"ray-{n}" for n in range(slots, 0, -1)]  # KerasTuner's tuner ids: one a slot
    running: dict = {}  # task -> (slot, trial)
    events = _Events(callback, oracle, config)
    if _Starting.current is not None:
        _Starting.current.warmed()
    stopped = False
    ended = 0
    waited, began = 0.0, time.perf_counter()  # the driver's own time: the rest
    try:
        while True:
            while free and not stopped:
                slot = free.pop()
                trial = oracle.create_trial(slot)
                if trial.status != status.RUNNING:  # STOPPED: the search is over; IDLE: later
                    free.append(slot)
                    stopped = trial.status == status.STOPPED
                    break
                values = trial.hyperparameters.values
                parent = values.get(funnel.PARENT)
                parents = {parent: oracle.get_trial(parent)} if parent else {}
                left = oracle.seconds_left(values) if hasattr(oracle, "seconds_left") else None
                running[train.remote(job, arrays, trial, left, parents, events.inbox)] = (
                    slot, trial)
            if not running:
                if stopped:
                    break
                time.sleep(POLL_SECONDS)  # nothing runs and the oracle said IDLE: ask again
                waited += POLL_SECONDS
                continue
            wait = time.perf_counter()
            done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            waited += time.perf_counter() - wait
            events.pass_on()
            for task in done:
                slot, trial = running.pop(task)
                free.append(slot)
                _end(oracle, trial, task, tracker, experiment_id, search_run_id, callback)
                ended += 1
        # What the driver itself spends on a trial (proposing, dispatching, passing on its
        # events, ending it, saving the state): the scale benchmark's figure.
        busy = time.perf_counter() - began - waited
        tracker.log_batch(search_run_id, tracker.metrics({
            "driver_seconds": busy, "driver_seconds_per_trial": busy / max(1, ended)}))
    finally:
        for task in running:
            ray.cancel(task, force=True)
        with contextlib.suppress(Exception):  # the last lines are a report, not the search
            events.pass_on()
            events.close()
        closed = tracker.close_stale_runs(experiment_id, search_run_id)
        if closed and not running:
            callback.on_message(f"closed {closed} trial run(s) left running by lost Ray "
                                f"workers")


def _end(oracle, trial, task, tracker, experiment_id: str, search_run_id: str,
         callback) -> None:
    """End `trial` in the oracle as its task reports it; FAILED when Ray gave up on the
    task (its process or node died more than `max_retries` times)."""
    import ray
    from keras_tuner.engine import trial as trial_module

    try:
        outcome = ray.get(task)
    except ray.exceptions.RayError as error:
        reason = _reason(error)
        trial.status, trial.message = trial_module.TrialStatus.FAILED, reason
        for run in tracker.trial_runs(experiment_id, search_run_id, trial.trial_id):
            if run.info.status == "RUNNING":
                tracker.set_tags(run.info.run_id, {tracking.TAG_ERROR: reason})
                tracker.end(run.info.run_id, "FAILED")  # as the trial: no retry is left
        callback.on_message(f"trial {trial.trial_id} failed: {reason}")
    else:
        if outcome["metrics"]:
            oracle.update_trial(trial.trial_id, outcome["metrics"], step=outcome["step"])
        trial.status, trial.message = outcome["status"], outcome["message"]
    oracle.end_trial(trial)


def _reason(error) -> str:
    """One line for a task Ray gave up on."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):  # our code raised, outside a trial
        cause = error.cause if getattr(error, "cause", None) is not None else error
        lines = str(cause).strip().splitlines()
        return f"its Ray task raised {type(cause).__name__}: {lines[-1] if lines else ''}"
    first = (str(error).strip().splitlines() or [""])[0]
    return (f"the Ray worker running it was lost ({type(error).__name__}: {first[:160]}), "
            f"after its retries")


def _portable(config: SearchConfig, tracking_uri: str) -> SearchConfig:
    """`config` as a task on any node reads it: its working folder and a local tracking
    store as absolute paths (a Ray worker's current folder is not the driver's)."""
    from urllib.parse import urlparse

    uri = tracking_uri
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        database = uri.split("sqlite:///", 1)[1] if uri.startswith("sqlite:///") else ""
        if database and not database.startswith("/") and not database.startswith(":"):
            uri = f"sqlite:///{Path(database).resolve()}"
    elif parsed.scheme == "":
        uri = str(Path(uri).resolve())
    return dataclasses.replace(config, tracking_uri=uri,
                               workdir=str(Path(config.workdir).resolve()))


def _queue():
    """A Ray queue for the tasks' events: on the head node (a cluster lives as long as its
    head), taking no CPU a trial could use."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 1e-4}})


class _Events:
    """The tasks' events, passed on to the driver's callback: each trial's place in the
    search and the search's best as the driver knows them (a task knows only its own)."""

    def __init__(self, callback, oracle, config: SearchConfig):
        self.callback, self.oracle = callback, oracle
        self.inbox = _queue()
        self.direction = config.pipeline.direction
        self.time_limit = config.budget.time_limit
        best = oracle.get_best_trials(1)  # of a search resumed: its earlier trials' too
        self.best: float | None = best[0].score if best else None

    def pass_on(self) -> None:
        """Pass on what the tasks have queued. Events are a report, not the search's
        state: a queue lost with its node is replaced, and the search goes on."""
        import ray
        from ray.util.queue import Empty

        try:
            waiting = self.inbox.qsize()
            items = self.inbox.get_nowait_batch(waiting) if waiting else []
        except Empty:
            return
        except ray.exceptions.RayActorError:
            self.callback.on_message("the queue of the trials' events was lost with its "
                                     "node; the running trials' lines are lost")
            self.inbox = _queue()
            return
        for method, event in items:
            getattr(self.callback, method)(self._placed(event))

    def close(self) -> None:
        import ray

        ray.kill(self.inbox.actor)

    def _placed(self, event):
        from nas.events import EpochEnded, TrialEnded

        if not hasattr(event, "trial_id"):
            return event
        order = self.oracle.start_order
        place = order.index(event.trial_id) + 1 if event.trial_id in order else event.trial
        changes = {"trial": place}
        if isinstance(event, TrialEnded) and event.value is not None and event.error is None:
            if self.best is None or (event.value > self.best if self.direction == "max"
                                     else event.value < self.best):
                self.best = event.value
            changes["best"] = self.best
        if (isinstance(event, EpochEnded) and self.time_limit is not None
                and callable(getattr(self.oracle, "elapsed", None))):
            left = max(0.0, self.time_limit - self.oracle.elapsed())
            if left < event.search_left:
                changes.update(search_left=left, time_limited=True)
        return dataclasses.replace(event, **changes)


# --- a task, in a Ray worker process -----------------------------------------------------

_WORKERS: dict[str, "_Worker"] = {}  # this process's tuner of each search, made once


def _train(job: _Job, arrays, trial, seconds_left: float | None, parents: dict,
           inbox) -> dict:
    """Train one trial in this Ray worker process; what the driver ends it with."""
    received = time.monotonic()
    worker = _WORKERS.get(job.search_run_id)
    if worker is None:
        _WORKERS.clear()  # another search's tuner: this process trains this one now
        worker = _WORKERS[job.search_run_id] = _Worker(job, arrays, inbox)
    worker.events.inbox = inbox
    return worker.train(trial, seconds_left, parents, received)


class _Worker:
    """A Ray worker process's part of a search: its tuner over a `_Relay`, its trial runs
    and its data, made at its first trial."""

    def __init__(self, job: _Job, arrays, inbox):
        import ray

        from nas import assembly
        from nas.data import make_datasets

        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        # The trial runs' `nas.worker` tag: one name a process, so a task Ray runs again
        # (in a new process) is told apart from the attempt that was lost.
        self.name = f"ray-{self.node[:8]}-{os.getpid()}"
        os.environ["KERASTUNER_TUNER_ID"] = self.name  # read by TrialRuns and the tuner
        config = job.config
        _threads(int(max(1, math.floor(float(
            context.get_assigned_resources().get("CPU", 1.0))))))
        assembly.configure_tensorflow(config)
        self.job, self.events = job, _Inbox(inbox)
        self.tracker = tracking.Tracker(config.tracking_uri)
        self.parts = assembly.assemble(config, arrays, self.tracker, job.experiment_id,
                                       job.search_run_id, self.events)
        self.tuner = self.parts.tuner(self.parts.oracle(guarded=False))
        self.relay = _Relay(self.tuner.oracle)
        self.tuner.oracle = self.relay
        self.datasets = make_datasets(arrays, config.batch_size or config.pipeline.batch_size,
                                      config.seed)
        self.parts.hooks.tags = {TAG_NODE: self.node, TAG_GPUS: ",".join(
            str(g) for g in ray.get_gpu_ids()) or "-"}

    def train(self, trial, seconds_left, parents: dict, received: float) -> dict:
        self._close_lost_attempts(trial.trial_id)
        self.relay.take(trial, seconds_left, parents, received)
        self.parts.search(self.tuner, self.datasets)
        return self.relay.outcome()

    def _close_lost_attempts(self, trial_id: str) -> None:
        """Close, as KILLED, the runs of this trial that another Ray worker left RUNNING:
        the driver hands a trial to one task at a time, so that worker was lost."""
        job = self.job
        for run in self.tracker.trial_runs(job.experiment_id, job.search_run_id, trial_id):
            worker = run.data.tags.get(tracking.TAG_WORKER)
            if run.info.status == "RUNNING" and worker != self.name:
                self.tracker.set_tags(run.info.run_id, {tracking.TAG_ERROR: (
                    f"Ray worker {worker} was lost (its process or node died); Ray ran the "
                    f"trial again")})
                self.tracker.end(run.info.run_id, "KILLED")


def _warm_up() -> None:
    """A Ray worker's start: what its first trial would import (TensorFlow, Keras,
    KerasTuner, MLflow) imported ahead, its threads set first. Ray gives the worker
    process the search's trials after."""
    import ray

    _threads(int(max(1, math.floor(float(
        ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))))))
    import importlib

    for module in ("nas.tuning", "nas.data", "nas.trial_runs", "nas.assembly"):
        importlib.import_module(module)
    importlib.import_module("nas.assembly").import_ahead()


def _threads(cpus: int) -> None:
    """TensorFlow's threads to the CPUs Ray gave the task; before TensorFlow starts."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(min(cpus, 2))
    except RuntimeError:  # TensorFlow already started in this process
        pass


class _Inbox:
    """A task's callback: its events go to the driver through a Ray queue."""

    def __init__(self, inbox):
        self.inbox = inbox

    def __getattr__(self, method: str):
        if not method.startswith("on_"):
            raise AttributeError(method)
        def put(event) -> None:
            try:
                self.inbox.put((method, event))
            except Exception:  # the driver's queue is gone (its node died): only a report
                pass

        return put


class _Relay:
    """The oracle as a task's tuner sees it: the one trial the driver sent (and the trial
    a funnel's child starts from); its results kept for the driver. Never saved: the
    driver's oracle is the search's state."""

    def __init__(self, oracle):
        self._oracle = oracle  # the search's objective and space, for KerasTuner
        self.trial = None
        self.verbose = 0

    @property
    def objective(self):
        return self._oracle.objective

    @property
    def max_trials(self):
        return self._oracle.max_trials

    def get_space(self):
        return self._oracle.get_space()

    def take(self, trial, seconds_left: float | None, parents: dict, received: float) -> None:
        self.trial, self.parents, self.ended = trial, parents, None
        self.metrics, self.step = {}, 0
        self.handed = False
        self.deadline = None if seconds_left is None else received + seconds_left

    def create_trial(self, tuner_id):
        from keras_tuner.engine import trial as trial_module

        if not self.handed:
            self.handed = True
            return self.trial
        return trial_module.Trial(self.get_space(), status=trial_module.TrialStatus.STOPPED)

    def update_trial(self, trial_id, metrics, step=0):
        self.metrics, self.step = dict(metrics), step
        for name, value in metrics.items():
            if not self.trial.metrics.exists(name):
                self.trial.metrics.register(name)
            self.trial.metrics.update(name, value, step=step)
        return self.trial

    def end_trial(self, trial):
        self.ended = trial

    def get_trial(self, trial_id):
        if self.trial is not None and trial_id == self.trial.trial_id:
            return self.trial
        return self.parents[trial_id]

    def seconds_left(self, values: dict) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def save(self) -> None:
        pass

    def reload(self) -> None:
        pass

    def outcome(self) -> dict:
        trial = self.ended or self.trial
        return {"status": trial.status, "message": trial.message, "metrics": self.metrics,
                "step": self.step}
