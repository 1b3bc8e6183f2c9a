"""Hermetic tests: every folder and tracking store lives under tmp_path."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import types

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_collection_modifyitems(config, items):
    """The files whose slow tests may take longest first, by the longest time limit of
    their tests (the Ray cluster's, 900 s), then by the sum of them: the suite ends no
    sooner than its longest file's run, so that run starts at once. pytest-xdist's
    worksteal gives the first process all the tests and the others steal from the end of
    its queue, so the first file in this order starts first. A file keeps its order."""
    longest, total = collections.Counter(), collections.Counter()
    for item in items:
        if item.get_closest_marker("slow") is not None:
            limit = item.get_closest_marker("timeout")
            seconds = limit.args[0] if limit is not None and limit.args else 300
            longest[item.path] = max(longest[item.path], seconds)
            total[item.path] += seconds
    items.sort(key=lambda item: (-longest[item.path], -total[item.path]))


def pytest_xdist_auto_num_workers(config):
    """One process more than the machine has cores (`-n auto`): about a third of the
    suite's time is spent waiting on other processes (Ray's, the searches tests start and
    signal), so two processes on two cores leave them idle. Measured on 2 cores: 735 s of
    CPU in 563 s with 2 processes; 517 s with 3."""
    return (os.cpu_count() or 1) + 1


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made and nothing in them, as MLflow makes a
    new one. Making the tables costs MLflow 2-3 s of CPU (its schema migrations, one by
    one), and most tests make a store: each gets a copy of this one instead (`_isolated`).
    Made in its own folder, whose ./mlruns its Default experiment names (nas logs to
    experiments of its own)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("empty_store")
    with contextlib.chdir(folder):
        MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(autouse=True)
def _isolated(request, tmp_path, monkeypatch):
    """Run each test in its own folder with its own MLflow store, seeded. The store,
    ./mlflow.db, is there from the start, empty (`_empty_store`), unless the test is
    marked `new_store`: it sees the store made, or not, by what it runs."""
    if request.node.get_closest_marker("new_store") is None:
        shutil.copy(request.getfixturevalue("_empty_store"), tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("NAS_WORKDIR", str(tmp_path / ".nas"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # latency tables
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def digits_search(tmp_path_factory, _empty_store):
    """One small finished search (tiny space, digits), shared by read-only tests.

    Returns a namespace with `root`, `tracking_uri`, `workdir`, `experiment`, `result`.
    """
    from nas import search
    from nas.events import Callback
    from nas.specs import load_pipeline, load_space

    root = tmp_path_factory.mktemp("digits_search")
    shutil.copy(_empty_store, root / "mlflow.db")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    config = search.SearchConfig(
        space=load_space("tiny"), pipeline=load_pipeline("digits"), max_trials=3, epochs=4,
        experiment="shared", tracking_uri=tracking_uri, workdir=str(root / ".nas"), seed=1,
        ensemble=1,  # a single trial's model as the final model (ensembles: test_ensemble.py)
    )
    with contextlib.chdir(root):  # MLflow puts artifacts under ./mlruns
        result = search.run(search.prepare(config), Callback())
    return types.SimpleNamespace(root=root, tracking_uri=tracking_uri,
                                 workdir=str(root / ".nas"), experiment="shared",
                                 result=result)


@pytest.fixture
def processes(tmp_path):
    """Start processes (`processes.Processes`); all are stopped when the test ends."""
    from processes import Processes

    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, _empty_store):
    """The URL of an `mlflow server` on 127.0.0.1, for the tests of one module (its store
    a copy of `_empty_store`)."""
    from processes import mlflow_server_in

    folder = tmp_path_factory.mktemp("mlflow_server")
    shutil.copy(_empty_store, folder / "mlflow.db")
    with mlflow_server_in(folder) as url:
        yield url
