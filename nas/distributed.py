"""Scale out: one search over many processes and machines (KerasTuner's chief and workers).

The chief runs the guarded oracle behind KerasTuner's gRPC service and owns the search's
parent MLflow run; workers ask the chief for trials, train them, and log each one as a
child of that parent run, which they find in MLflow (a worker shares no file with the
chief). To KerasTuner's service the chief adds what a long search on many machines needs:

- heartbeats: every worker calls the chief every few seconds and names itself on each
  call. A worker silent for longer than `worker_timeout` seconds is lost: its trial goes back
  to KerasTuner's retry queue for another worker, and its MLflow run is closed KILLED.
  A worker that asks for a new trial while it still holds one has restarted: the same.
- a hold at the end: once every trial is handed out, idle workers wait instead of
  exiting until the trials still running have ended, so a lost trial still finds a
  worker and the search ends with `max_trials` trials.
- one source of truth: workers take the training settings (epochs, batch size, seed,
  precision) from the chief's parent run, and refuse another space or pipeline.

The oracle keeps the books of heartbeats, lost workers and the hold, under its own lock
(`nas.ktcompat.LostWorkers`); the chief's service here only calls it and reports.

`run_local` is `nas search --workers N`: this process the chief, N workers on 127.0.0.1.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from keras_tuner.engine import trial as trial_module

from nas import assembly, ktcompat, tracking
from nas.errors import SearchError, SearchFailed
from nas.search import Prepared
from nas.settings import SearchConfig

__all__ = ["parse_address", "check_address", "free_port", "new_token", "TOKEN_ENV",
           "run_chief", "serve", "prepare_worker", "find_search", "run_worker", "worker_command",
           "run_local"]

HEARTBEAT_SECONDS = 2.0
# An idle worker asks the chief again after this long (KerasTuner's own client would
# ask again at once, in a busy loop).
IDLE_SECONDS = 1.0
# A trial whose worker is lost this many times fails instead of going back to the queue:
# it is probably what kills its workers (out of memory, say).
MAX_LOSSES = 3
TAG_CHIEF = tracking.TAG_CHIEF  # on the search's run
TAG_SETTINGS = tracking.TAG_WORKER_SETTINGS  # on the search's run
_WORKER_KEY = "nas-worker"  # gRPC metadata: the worker making a call
_TOKEN_KEY = "nas-token"  # gRPC metadata: the search's worker token
TOKEN_ENV = "NAS_WORKER_TOKEN"  # where the chief and its workers may take the token from
_STATUS = trial_module.TrialStatus


def parse_address(address: str, flag: str = "`chief`") -> tuple[str, int]:
    """`HOST:PORT` as (host, port); SearchError when it is not one."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SearchError(f"{flag}: {address!r} is not HOST:PORT (for example 127.0.0.1:8000)")
    return host.strip("[]"), int(port)


def check_address(address: str) -> None:
    """Fail before anything is written when the chief cannot listen on `address`."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SearchError(f"`chief`: cannot listen on {address} ({error.strerror})") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def new_token() -> str:
    """The token of a search's workers: NAS_WORKER_TOKEN if set, else a fresh secret."""
    import secrets

    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses, before the oracle sees it, every call that does not carry the token."""

    def __init__(self, token: str):
        import hmac

        self._matches = lambda given: hmac.compare_digest(given.encode(), token.encode())

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "wrong or missing worker token for this search")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata).get(_TOKEN_KEY, "")
        return continuation(handler_call_details) if self._matches(given) else self._refusal


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata",
                                                           "credentials", "wait_for_ready",
                                                           "compression")),
                   grpc.ClientCallDetails):
    """A call's details as an interceptor passes them on (gRPC's own examples make one)."""


class _Metadata(grpc.UnaryUnaryClientInterceptor):
    """Adds the search's token to every call a worker makes, KerasTuner's own included."""

    def __init__(self, metadata: tuple):
        self.metadata = metadata

    def intercept_unary_unary(self, continuation, details, request):
        extra = tuple(details.metadata or ()) + self.metadata
        return continuation(_CallDetails(details.method, details.timeout, extra,
                                         details.credentials, details.wait_for_ready,
                                         details.compression), request)


# --- the chief ----------------------------------------------------------------------


class _Servicer(ktcompat.OracleServicer):
    """KerasTuner's oracle service over an oracle that knows its workers
    (`nas.ktcompat.LostWorkers`): each call heard from its worker, each worker lost reported.

    It only calls the oracle, whose own lock keeps the gRPC threads and the chief's watch
    loop consistent.
    """

    def __init__(self, oracle, on_lost, echo):
        super().__init__(oracle)
        self.on_lost = on_lost  # (trial_id, worker, reason) -> None, outside the lock
        self.echo = echo

    def _hear(self, context) -> str | None:
        return self.oracle.hear(dict(context.invocation_metadata()).get(_WORKER_KEY))

    def GetBestTrials(self, request, context):  # with num_trials=0: a worker's heartbeat
        self._hear(context)
        return super().GetBestTrials(request, context)

    def GetTrial(self, request, context):
        self._hear(context)
        return super().GetTrial(request, context)

    def CreateTrial(self, request, context):
        trial, lost = self.oracle.hand_out(request.tuner_id)
        if trial.status == _STATUS.RUNNING:
            self.echo(f"trial {trial.trial_id} -> {request.tuner_id}")
        self.report(lost)
        return ktcompat.messages().CreateTrialResponse(trial=trial.to_proto())

    def UpdateTrial(self, request, context):
        self._hear(context)
        return super().UpdateTrial(request, context)

    def EndTrial(self, request, context):
        trial = trial_module.Trial.from_proto(request.trial)
        worker = self._hear(context)
        ended = self.oracle.take_result(trial, worker)
        if ended is None:
            self.echo(f"trial {trial.trial_id}: ignored a late result from {worker} "
                      f"(the trial was given to another worker)")
        else:
            trial, by, count = ended
            score = ("" if trial.score is None
                     else f" {self.oracle.objective.name} {trial.score:.4f}")
            self.echo(f"trial {trial.trial_id} {trial.status} on {by}{score} "
                      f"({count}/{self.oracle.max_trials} ended)")
        return ktcompat.messages().EndTrialResponse()

    def report(self, lost) -> None:
        """Say, and tell `on_lost`, which workers were lost (as the oracle returns them)."""
        for trial_id, worker, reason in lost:
            self.echo(f"worker {worker} lost ({reason}): trial {trial_id} goes back to the "
                      f"queue")
            self.on_lost(trial_id, worker, reason)


def run_chief(prepared: Prepared, callback=None, give_up=None):
    """Run the search as its chief: its oracle served to the workers, which train the
    trials (`nas.search.run`, with `serve` in place of training here). Returns the
    search's `SearchResult`."""
    from nas import search
    from nas.events import Callback

    callback = callback if callback is not None else Callback()
    return search.run(prepared, callback, serve=lambda tuner, experiment_id, search_run_id:
                      serve(tuner, prepared, experiment_id, search_run_id,
                            callback.on_message, give_up))


def serve(tuner, prepared: Prepared, experiment_id: str, search_run_id: str, echo,
          give_up=None) -> None:
    """Run the oracle of `tuner` for remote workers until the search has ended.

    Called by `nas.search.run` in place of `tuner.search` (`run_chief`); the parent run
    stays open around it. `give_up()`, if given, is asked every half second whether no
    worker is left to train the trials.

    Raises:
        RuntimeError: the chief cannot listen, or too many consecutive trials failed.
        nas.errors.SearchFailed: `give_up()` said so.
    """
    ktcompat.quiet_conditions()  # else every trial sent over gRPC prints stray numbers
    config, scale, tracker = prepared.config, prepared.config.scale, prepared.tracker
    host, port = parse_address(scale.chief)
    oracle = tuner.oracle
    oracle.verbose = 0
    tuner.save()  # so a restarted chief reloads the oracle and resumes

    def close_lost_run(trial_id: str, worker: str, reason: str) -> None:
        # FINISHED too: a worker that died after closing its run but before telling the
        # chief; the trial runs again, so this run must not count as its result.
        try:
            for run in tracker.trial_runs(experiment_id, search_run_id):
                tags = run.data.tags
                if (run.info.status in ("RUNNING", "FINISHED")
                        and tags.get(tracking.TAG_TRIAL) == trial_id
                        and tags.get(tracking.TAG_WORKER) == worker):
                    tracker.set_tags(run.info.run_id, {
                        tracking.TAG_ERROR: f"worker {worker} was lost ({reason})"})
                    tracker.end(run.info.run_id, "KILLED")
        except Exception as error:  # MLflow down: the run is closed at the end instead
            echo(f"could not close the run of trial {trial_id} ({error.__class__.__name__})")

    oracle.set_workers(scale.worker_timeout, linger=3 * HEARTBEAT_SECONDS,
                       max_losses=MAX_LOSSES)
    servicer = _Servicer(oracle, close_lost_run, echo)
    token = scale.worker_token
    if token is None:  # a chief started from the library: the token is made here
        token = new_token()
        echo(f"worker token: {token} (give it to each worker: `nas worker --token`, or "
             f"{TOKEN_ENV})")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8),
                         interceptors=[_TokenCheck(token)])
    ktcompat.add_servicer(servicer, server)
    if scale.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(scale.tls_key).read_bytes(), Path(scale.tls_cert).read_bytes())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"the chief cannot listen on {scale.chief}")
    tracker.set_tags(search_run_id, {TAG_CHIEF: scale.chief,
                                     TAG_SETTINGS: json.dumps(
                                         config.worker_settings(prepared.arrays))})
    server.start()
    echo(f"chief listening on {scale.chief}: waiting for workers")
    try:
        while not oracle.all_ended():
            time.sleep(0.5)
            servicer.report(oracle.take_back_silent())
            if give_up is not None and give_up():
                raise SearchFailed("every worker failed before the search ended; finished "
                                   "trials are kept", [])
    finally:
        server.stop(grace=2).wait()
    closed = tracker.close_stale_runs(experiment_id, search_run_id)
    if closed:
        echo(f"closed {closed} trial run(s) left running by lost workers")
    if oracle.fatal:
        raise RuntimeError(oracle.fatal)


# --- the workers --------------------------------------------------------------------


class _WorkerClient(ktcompat.OracleClient):
    """KerasTuner's client of the chief, naming its worker on every call, with a
    heartbeat thread, and patient when the chief has no trial to hand out yet."""

    def __init__(self, oracle, multi_worker: bool = False, should_report: bool = True,
                 token: str = "", tls_ca: str | None = None):
        super().__init__(oracle)
        self.multi_worker = multi_worker
        self.should_report = should_report
        self._metadata = ((_WORKER_KEY, self.tuner_id),)
        # Every call, KerasTuner's own included, carries the token (over TLS if asked).
        address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
        channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(
                       Path(tls_ca).read_bytes())) if tls_ca
                   else grpc.insecure_channel(address))
        channel = grpc.intercept_channel(channel, _Metadata(((_TOKEN_KEY, token),)))
        self.stub = ktcompat.stub(channel)
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="nas-heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            try:
                self.stub.GetBestTrials(ktcompat.messages().GetBestTrialsRequest(num_trials=0),
                                        metadata=self._metadata,
                                        timeout=HEARTBEAT_SECONDS * 2)
            except grpc.RpcError:  # the chief is away; KerasTuner's calls wait for it
                pass

    def close(self) -> None:
        self._stopped.set()

    def check_token(self, chief: str, timeout: float = 60.0) -> None:
        """Ask the chief once; `SearchError` if it refuses this worker's token, or cannot
        be reached (its search's run says it listens)."""
        try:
            self.stub.GetBestTrials(ktcompat.messages().GetBestTrialsRequest(num_trials=0),
                                    metadata=self._metadata, wait_for_ready=True,
                                    timeout=timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise SearchError(
                    f"`token`: the chief at {chief} refused this worker's token; give the "
                    f"token the chief printed (`token` or {TOKEN_ENV})") from None
            raise SearchError(
                f"`chief`: no answer from the chief at {chief} in {timeout:.0f} s "
                f"({error.code().name}); a chief with TLS needs `tls_ca`, one without "
                f"needs none") from None

    def create_trial(self, tuner_id):
        while True:
            response = self.stub.CreateTrial(
                ktcompat.messages().CreateTrialRequest(tuner_id=tuner_id),
                metadata=self._metadata, wait_for_ready=True, timeout=ktcompat.CALL_TIMEOUT)
            trial = trial_module.Trial.from_proto(response.trial)
            if trial.status != _STATUS.IDLE:
                return trial
            time.sleep(IDLE_SECONDS)

    def end_trial(self, trial):
        if self.should_report:
            self.stub.EndTrial(ktcompat.messages().EndTrialRequest(trial=trial.to_proto()),
                               metadata=self._metadata, wait_for_ready=True,
                               timeout=ktcompat.CALL_TIMEOUT)


def prepare_worker(config: SearchConfig) -> Prepared:
    """Check a worker's input; raise before anything is written.

    Raises:
        SearchError, nas.errors.DataError, nas.tracking.TrackingError.
    """
    from nas.data import load_arrays

    scale = config.scale
    parse_address(scale.chief)
    if not scale.worker_id or "chief" in scale.worker_id:
        raise SearchError(f"`worker_id`: {scale.worker_id!r} must be non-empty and must not "
                          f"contain 'chief' (KerasTuner's name for the chief)")
    arrays = load_arrays(config.pipeline, config.skip_bad_images)
    tracker = tracking.Tracker(config.tracking_uri)
    tracker.check()
    return Prepared(config, arrays, tracker, None)


def find_search(tracker: tracking.Tracker, experiment: str, chief: str, wait: float, echo):
    """The running parent run of the search whose chief listens at `chief`.

    Waits up to `wait` seconds for the chief to start it. Among several running searches
    of the experiment, the one whose chief has the same address wins, then the same port.

    Raises:
        SearchError: none appeared in time.
    """
    _, port = parse_address(chief)
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        runs = [r for r in tracker.running_searches(experiment) if TAG_SETTINGS in r.data.tags]
        for matches in (lambda a: a == chief, lambda a: a.rpartition(":")[2] == str(port)):
            chosen = [r for r in runs if matches(r.data.tags.get(TAG_CHIEF, ""))]
            if chosen:
                return chosen[0]
        if time.monotonic() > deadline:
            raise SearchError(
                f"`chief`: no search of experiment {experiment!r} with its chief at {chief} "
                f"is running in {tracker.tracking_uri} (waited {wait:.0f} s); start "
                f"`nas search --chief {chief}` with the same `experiment` and `tracking_uri`")
        if not waiting:
            echo(f"waiting for the chief's search (experiment {experiment!r}) in "
                 f"{tracker.tracking_uri}")
            waiting = True
        time.sleep(1.0)


def run_worker(prepared: Prepared, callback=None, wait: float = 600.0) -> list[str]:
    """Train the trials the chief at `config.scale.chief` hands out, until the search ends.

    Trials are logged as children of the chief's parent run, tagged `nas.worker`;
    `callback` (a `nas.events.Callback`; without one, nobody) receives what happens.
    Returns the ids of the trials this worker trained.

    Raises:
        SearchError: no such search running, or its space or pipeline differ.
        nas.errors.Interrupted / KeyboardInterrupt: stopped by a signal; the chief
            hands the trial to another worker.
    """
    from nas.data import make_datasets
    from nas.events import Callback

    callback = callback if callback is not None else Callback()
    echo = callback.on_message
    config, tracker, arrays = prepared.config, prepared.tracker, prepared.arrays
    scale = config.scale
    host, port = parse_address(scale.chief)
    parent = find_search(tracker, config.experiment_name, scale.chief, wait, echo)
    settings = json.loads(parent.data.tags[TAG_SETTINGS])
    kind = config.differs_from(settings)
    if kind is not None:
        spec = config.space if kind == "space" else config.pipeline
        raise SearchError(f"`{kind}`: {spec.name!r} is not the {kind} of the chief's search "
                          f"({settings[kind]!r}, run {parent.info.run_id}); a worker needs the "
                          f"same space and pipeline files as its chief")
    config = config.for_worker(settings)
    if settings.get("data_digest", "") != arrays.data_digest:  # a directory's: split by file
        raise SearchError(
            f"{config.pipeline.source_file}: data.path: the images in {config.pipeline.path} "
            f"are not the chief's ({settings.get('data_files', '?')} files there, "
            f"{arrays.samples} here), so the split would differ; a worker needs the same "
            f"image files as its chief")
    experiment_id, search_run_id = parent.info.experiment_id, parent.info.run_id
    echo(f"worker {scale.worker_id}: search run {search_run_id}, chief {scale.chief}")

    assembly.configure_tensorflow(config)
    ktcompat.quiet_conditions()  # else every trial sent over gRPC prints stray numbers
    # Read by KerasTuner when the tuner is built: this process is a worker of that chief.
    os.environ.update(KERASTUNER_TUNER_ID=scale.worker_id, KERASTUNER_ORACLE_IP=host,
                      KERASTUNER_ORACLE_PORT=str(port))
    parts = assembly.assemble(config, arrays, tracker, experiment_id, search_run_id, callback)
    client = None
    with assembly.interruptions(sigint=False):
        try:
            # Only its objective is used here: the chief's oracle proposes and guards.
            # The same folder as the chief's: Hyperband continues trials from the
            # checkpoints of earlier ones, so its workers need a shared --workdir.
            tuner = parts.tuner(parts.oracle(guarded=False))
            client = _WorkerClient(tuner.oracle, tuner.oracle.multi_worker,
                                   tuner.oracle.should_report,
                                   token=scale.worker_token or os.environ.get(TOKEN_ENV, ""),
                                   tls_ca=scale.tls_ca)
            client.check_token(scale.chief)
            tuner.oracle = client
            parts.search(tuner, make_datasets(arrays, config.batch_size, config.seed))
        finally:
            parts.hooks.close()
            if client is not None:
                client.close()
    return sorted(parts.hooks.runs)


def worker_args(config: SearchConfig, space: str, pipeline: str, tracking_uri: str,
                token: str | None = None, tls_ca: str | None = None,
                workdir: bool = False) -> list[str]:
    """The options of `nas worker` that join `config`'s search (its chief at
    `config.scale.chief`): `space` and `pipeline` as the user gave them, `workdir` to share
    the chief's working folder."""
    args = ["--chief", config.scale.chief, "--space", space, "--pipeline", pipeline,
            "--experiment", config.experiment_name, "--tracking-uri", tracking_uri]
    args += ["--workdir", config.workdir] if workdir else []
    args += ["--tls-ca", tls_ca] if tls_ca else []
    args += ["--token", token] if token else []
    args += ["--distribution", config.scale.distribution] if config.scale.distribution else []
    args += ["--skip-bad-images"] if config.skip_bad_images else []
    return args


def worker_command(config: SearchConfig, space: str, pipeline: str, tracking_uri: str,
                   token: str | None = None, tls_ca: str | None = None) -> str:
    """The command line that starts one more worker of this search."""
    import shlex

    return shlex.join(["nas", "worker", *worker_args(config, space, pipeline, tracking_uri,
                                                     token, tls_ca)])


# --- one machine, one command -------------------------------------------------------


def prepare_local(config: SearchConfig) -> Prepared:
    """Check the input of `nas search --workers N` (`run_local`): this process will be the
    chief, on a free port of 127.0.0.1, with a token of its own. Writes nothing.

    Raises:
        SearchError, nas.errors.DataError, nas.tracking.TrackingError.
    """
    from nas import search

    if config.scale.chief:
        raise SearchError("`workers` and `chief` exclude each other: `workers` starts its own "
                          "chief on 127.0.0.1")
    return search.prepare(dataclasses.replace(
        config, chief=f"127.0.0.1:{free_port()}", worker_token=new_token()))


def run_local(prepared: Prepared, space: str, pipeline: str, workers: int, callback=None,
              stop_seconds: float = 60.0):
    """`nas search --workers N`: this process the chief (`run_chief`), N `nas worker`
    processes on 127.0.0.1 training its trials; the search's `SearchResult`.

    `space` and `pipeline` are what the workers load (names or paths, as the user gave
    them). Every worker started here has ended, or is stopped, before this returns.

    Raises:
        nas.errors.SearchFailed: every worker failed before the search ended (or too many
            trials did).
    """
    config, uri = prepared.config, prepared.tracker.tracking_uri
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env[TOKEN_ENV] = config.scale.worker_token  # not on their command lines
    command = [sys.executable, "-m", "nas.cli", "worker",
               *worker_args(config, space, pipeline, uri, workdir=True)]
    processes: list[subprocess.Popen] = []

    def all_failed() -> bool:
        # A worker exits 0 once the chief says the search is over; all gone, none of them
        # so, and the chief would wait for workers forever.
        return all(process.poll() not in (None, 0) for process in processes)

    ended = False
    # From before the first worker starts: a SIGTERM stops the workers too.
    with assembly.interruptions(sigint=False):
        try:
            for number in range(1, workers + 1):
                processes.append(subprocess.Popen(
                    command + ["--worker-id", f"local-{number}"], env=env))
            result = run_chief(prepared, callback, give_up=all_failed)
            ended = True
            return result
        finally:
            try:  # once the search has ended, they end on their own
                deadline = time.monotonic() + (stop_seconds if ended else 0.0)
                for process in processes:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=max(0.0, deadline - time.monotonic()))
            finally:
                _stop(processes)


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminate what still runs of `processes`, then kill what does not stop in 30 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
