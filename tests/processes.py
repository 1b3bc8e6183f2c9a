"""Processes a test starts (searches, an MLflow server), and what it reads back.

Every process is in its own process group, logs to a file in the test's folder, and is
stopped (SIGTERM, then SIGKILL) by `stop_all`, whatever happens; the fixtures
`processes` and `mlflow_server` (conftest.py) do so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from mlflow import MlflowClient

NAS = [sys.executable, "-m", "nas.cli"]
DEADLINE = 150  # seconds for one search of a few tiny trials in a process of its own


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Processes started by one test, each in its own group, logging to a file."""

    def __init__(self, folder):
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        # As a user's shell has it: not set by the Trackers of this test process.
        self.env.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)

    def start(self, name: str, args: list[str], cwd=None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        self.started[name] = subprocess.Popen(
            args, cwd=cwd or self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        return self.started[name]

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def wait(self, name: str, timeout: float = DEADLINE) -> int:
        try:
            return self.started[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout} s:\n{self.logs()}")

    def kill(self, name: str, signum=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.started[name].pid, signum)
        self.started[name].wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.output(name)[-4000:]}" for name in self.started)

    def stop_all(self, grace: float = 15) -> None:
        for process in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            # The whole group: children of the process (mlflow server's) go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def search_runs(uri: str, experiment: str):
    """(parent runs, trial runs) of an experiment, oldest first."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], []
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    return ([r for r in runs if r.data.tags.get("nas.kind") == "search"],
            [r for r in runs if r.data.tags.get("nas.kind") == "trial"])


@contextlib.contextmanager
def mlflow_server_in(root):
    """An `mlflow server` on 127.0.0.1 (SQLite backend in `root`, artifacts served by it),
    its URL while inside."""
    server = Processes(root)
    server.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # as `nas ui` starts it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        server.start("mlflow", [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1"])
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            if server.started["mlflow"].poll() is not None:
                pytest.fail(f"mlflow server exited:\n{server.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 120 s:\n{server.logs()}")
            time.sleep(0.5)
        yield url
    finally:
        server.stop_all(grace=3)
