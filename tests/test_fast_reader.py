"""The fast reader: `nas trials` reads a local SQLite store with sqlite3, without MLflow.

It must answer exactly as the MLflow reader does, and fall back to it, or refuse in one
line, whenever it cannot.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import shutil
import sqlite3
import subprocess
import sys

import mlflow
import pytest
from click.testing import CliRunner

from nas import mlflow_sqlite, results, tracking
from nas.cli import common, export, search, space
from nas.cli import results as cli_results
from nas.cli import main

HEAVY = ("mlflow", "tensorflow", "keras", "keras_tuner", "sqlalchemy", "matplotlib")


def nas(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def both_readers(uri: str):
    fast = results.open_reader(uri)
    assert isinstance(fast, mlflow_sqlite.SqliteReader)
    return fast, results._MlflowReader(tracking.Tracker(uri))


def copy_store(digits_search, tmp_path) -> str:
    shutil.copy(digits_search.root / "mlflow.db", tmp_path / "copy.db")
    return f"sqlite:///{tmp_path}/copy.db"


def test_tag_names_are_those_tracking_writes():
    # The readers spell no tag name of their own: each comes from nas.tracking.
    tags = {value for name, value in vars(tracking).items() if name.startswith("TAG_")}
    for module in (results, mlflow_sqlite, common, cli_results, search, space, export):
        source = inspect.getsource(module)
        assert not {tag for tag in tags if f'"{tag}"' in source}, module.__name__


@pytest.mark.slow
def test_fast_reader_answers_as_mlflow(digits_search):
    fast, slow = both_readers(digits_search.tracking_uri)

    for experiment in (None, "shared"):
        search = results.find_search(fast, experiment)
        assert search == results.find_search(slow, experiment)
        rows = results.list_trials(fast, search)
        assert rows == results.list_trials(slow, search)
        assert len(rows) == 3
        # Same order of hyperparameters (`nas best` prints them so) and metrics.
        assert [list(r.values) for r in rows] == \
            [list(r.values) for r in results.list_trials(slow, search)]
        assert [list(r.metrics) for r in rows] == \
            [list(r.metrics) for r in results.list_trials(slow, search)]
    assert fast.trial_runs(search.experiment_id, search.run_id) == \
        slow.trial_runs(search.experiment_id, search.run_id)
    assert fast.experiments() == slow.experiments()
    for run_id in (search.run_id, rows[0].run_id):
        assert results.find_run(fast, run_id) == results.find_run(slow, run_id)
    assert fast.run("0" * 32) is None and slow.run("0" * 32) is None
    assert fast.experiment_by_name("nope") is None and slow.experiment_by_name("nope") is None
    assert fast._fallback is None  # all of it answered by sqlite3


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    [], ["--sort", "params", "--limit", "2"], ["--sort", "trial"], ["--pareto"],
    ["--status", "failed"], ["--experiment", "shared", "--sort", "val_loss"],
    ["--experiment", "nope"], ["--sort", "speed"],
])
def test_trials_prints_the_same_with_both_readers(digits_search, monkeypatch, options):
    uri = digits_search.tracking_uri
    fast = nas("trials", *options, "--tracking-uri", uri)

    opened = []
    monkeypatch.setattr(results, "open_reader", lambda uri: opened.append(uri) or
                        results._MlflowReader(tracking.Tracker(uri)))
    slow = nas("trials", *options, "--tracking-uri", uri)

    assert opened == [uri]
    assert (fast.exit_code, fast.output) == (slow.exit_code, slow.output)
    assert fast.exit_code in (0, 2)


@pytest.mark.slow
def test_deleted_runs_and_experiments_are_left_out_by_both(digits_search, tmp_path):
    uri = copy_store(digits_search, tmp_path)
    client = tracking.Tracker(uri).client
    search = results.find_search(results._MlflowReader(tracking.Tracker(uri)), "shared")
    client.delete_run(digits_search.result.trials[0].run_id)
    fast, slow = both_readers(uri)
    rows = results.list_trials(fast, search)
    assert rows == results.list_trials(slow, search)
    assert len(rows) == 2

    client.delete_experiment(search.experiment_id)
    fast, slow = both_readers(uri)
    for reader in (fast, slow):
        with pytest.raises(results.ResultsError,
                           match=r"^experiment: no experiment 'shared' in .* \(it holds: "
                                 r"no experiments\)$"):
            results.find_search(reader, "shared")
        with pytest.raises(results.ResultsError, match=r"^no nas search in the tracking store"):
            results.find_search(reader)
    assert fast.experiments() == slow.experiments()


def test_nan_metrics_and_failed_trials_read_the_same(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.Tracker(uri)
    experiment_id = tracker.experiment_id("nan")
    search_run = tracker.start_run(experiment_id, "search", tags={tracking.TAG_KIND: "search"})
    tracker.log_params(search_run, {"objective": "val_loss", "max_trials": 2})
    for trial, status in (("0", "FAILED"), ("1", "FINISHED")):
        run = tracker.start_run(experiment_id, f"trial-{trial}", parent_run_id=search_run,
                                tags={tracking.TAG_KIND: "trial", tracking.TAG_TRIAL: trial,
                                      tracking.TAG_SEARCH: search_run,
                                      "nas.error": "ValueError: the loss became nan"})
        tracker.log_params(run, {"depth": 1, "pool": "max"})
        tracker.log_metrics(run, {"objective": math.nan if trial == "0" else 0.5,
                                  "params": 12})
        tracker.end(run, status)
    tracker.end(search_run, "FINISHED")

    def comparable(rows):  # NaN is not equal to itself: compare metrics as text
        return [dataclasses.replace(r, metrics={k: repr(v) for k, v in r.metrics.items()})
                for r in rows]

    fast, slow = both_readers(uri)
    search = results.find_search(fast)
    assert search == results.find_search(slow)
    rows = results.list_trials(fast, search)
    assert [r.objective for r in rows] == [None, 0.5]
    assert math.isnan(rows[0].metrics["objective"])
    assert comparable(rows) == comparable(results.list_trials(slow, search))


@pytest.mark.slow
def test_an_sqlite_error_falls_back_to_mlflow(digits_search, monkeypatch):
    fast, slow = both_readers(digits_search.tracking_uri)
    search = results.find_search(fast, "shared")

    def broken(path):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(mlflow_sqlite, "_connect", broken)
    assert results.list_trials(fast, search) == results.list_trials(slow, search)
    assert results.find_search(fast) == results.find_search(slow)
    assert isinstance(fast._fallback, results._MlflowReader)


def _run_cli(args, cwd, env=None) -> subprocess.CompletedProcess:
    """`python -X importtime -m nas.cli ARGS`: its output, and the modules it imported."""
    environment = dict(os.environ if env is None else env)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "nas.cli", *args],
                          capture_output=True, text=True, cwd=cwd, env=environment,
                          timeout=120)
    done.imported = {line.split("|")[-1].strip().split(".")[0]
                     for line in done.stderr.splitlines() if line.startswith("import time:")}
    done.errors = [line for line in done.stderr.splitlines()
                   if not line.startswith("import time:")]
    return done


@pytest.mark.slow
def test_trials_imports_neither_mlflow_nor_tensorflow(digits_search, tmp_path):
    expected = nas("trials", "--pareto", "--tracking-uri", digits_search.tracking_uri)

    done = _run_cli(["trials", "--pareto", "--tracking-uri", digits_search.tracking_uri],
                    cwd=tmp_path)
    assert done.returncode == 0, done.errors
    assert done.stdout == expected.output
    assert "click" in done.imported and "sqlite3" in done.imported
    assert done.imported.isdisjoint(HEAVY), sorted(done.imported & set(HEAVY))

    # MLflow's default store, ./mlflow.db, found without asking MLflow.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = _run_cli(["trials"], cwd=digits_search.root, env=env)
    assert done.returncode == 0, done.errors
    assert done.stdout.startswith("experiment 'shared', search run ")
    assert done.imported.isdisjoint(HEAVY), sorted(done.imported & set(HEAVY))


@pytest.mark.new_store
def test_no_store_yet_is_refused_as_mlflow_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = mlflow.get_tracking_uri()  # in tmp_path, the current folder
    assert default == results._default_tracking_uri()

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = _run_cli(["trials"], cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.errors == [f"Error: --tracking-uri: {default} does not exist (no search was "
                           f"logged there); run `nas search` first, or give --tracking-uri / "
                           f"MLFLOW_TRACKING_URI"]
    assert done.imported.isdisjoint(HEAVY)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", ["trials", "best"])
def test_a_file_that_is_no_database_is_one_line(tmp_path, command):
    (tmp_path / "junk.db").write_bytes(b"not a database, " * 200)
    uri = f"sqlite:///{tmp_path}/junk.db"

    result = nas(command, "--tracking-uri", uri)
    assert result.exit_code == 2
    assert result.output == (f"Error: --tracking-uri: {uri} cannot be read (file is not a "
                             f"database)\n")


@pytest.mark.parametrize("command", ["trials", "best"])
def test_an_sqlite_file_of_something_else_is_refused_untouched(tmp_path, command):
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE notes (text)")
    uri = f"sqlite:///{tmp_path}/other.db"

    result = nas(command, "--tracking-uri", uri)
    assert result.exit_code == 2
    assert result.output == (f"Error: --tracking-uri: {uri} is not an MLflow tracking store (an "
                             f"SQLite database without MLflow's tables); give the store "
                             f"`nas search` logged to, with --tracking-uri / "
                             f"MLFLOW_TRACKING_URI\n")
    with sqlite3.connect(tmp_path / "other.db") as db:  # MLflow wrote no tables into it
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


@pytest.mark.slow
def test_another_schema_version_is_left_to_mlflow(digits_search, tmp_path):
    uri = copy_store(digits_search, tmp_path)
    with sqlite3.connect(tmp_path / "copy.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")

    result = nas("trials", "--tracking-uri", uri)
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: --tracking-uri: {uri} cannot be read (Detected "
                                    f"out-of-date database schema (found version 0584bdc529eb")
    assert len(result.output.splitlines()) == 1
