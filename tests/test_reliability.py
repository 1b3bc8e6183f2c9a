"""Failed trials, interrupted searches and bad input: no trial's failure costs another's work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from shapes import make_shapes

SEARCH = ["search", "--space", "tiny", "--epochs", "2", "--experiment", "rel"]


def runs_of(experiment="rel", kind="trial"):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`nas.kind` = '{kind}'",
                              order_by=["attributes.start_time ASC"])


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def assert_one_trial_failed(result, trial_id: str, error: str | None = None) -> None:
    """A 3-trial search went on: exit 0, `trial_id` FAILED as shown and in MLflow (with
    `error` as its `nas.error`), the two others FINISHED."""
    assert result.exit_code == 0, result.output
    assert f"trial {trial_id} ({int(trial_id) + 1}/3): val_accuracy FAILED" in result.output
    assert "2 trials finished, 1 failed" in result.output
    runs = {r.data.tags["nas.trial_id"]: r for r in runs_of()}
    assert sorted(runs) == ["0", "1", "2"]
    failed = runs.pop(trial_id)
    assert failed.info.status == "FAILED"  # closed, not left RUNNING
    if error is not None:
        assert failed.data.tags["nas.error"] == error
    assert [r.info.status for r in runs.values()] == ["FINISHED", "FINISHED"]


# --- failed trials --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trial_that_raises_is_recorded_and_the_search_goes_on(monkeypatch):
    import nas.tuning

    real_build = nas.tuning.build_model
    calls = []

    def flaky_build(architecture, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated build error")
        return real_build(architecture, **kwargs)

    monkeypatch.setattr(nas.tuning, "build_model", flaky_build)
    result = invoke(SEARCH + ["--max-trials", "3"])
    assert_one_trial_failed(result, "1", "ValueError: simulated build error")


@pytest.mark.slow
def test_a_trial_whose_run_cannot_be_written_fails_and_the_search_goes_on(monkeypatch):
    import nas.tracking

    real_log_dict, calls = nas.tracking.Tracker.log_dict, []

    def log_dict(self, run_id, data, artifact_file):
        if artifact_file == "architecture.json":
            calls.append(run_id)
            if len(calls) == 1:
                raise OSError("the artifact store is full")
        return real_log_dict(self, run_id, data, artifact_file)

    monkeypatch.setattr(nas.tracking.Tracker, "log_dict", log_dict)
    result = invoke(SEARCH + ["--max-trials", "3"])
    assert_one_trial_failed(result, "0")
    assert ("trial 0 (1/3): val_accuracy FAILED  (MLflow: OSError: the artifact store is full)"
            in result.output)


@pytest.mark.slow
def test_metrics_that_cannot_be_written_fail_only_that_trial(monkeypatch):
    import nas.trial_runs
    import nas.tracking

    monkeypatch.setattr(nas.trial_runs, "FLUSH_SECONDS", 0.0)  # every epoch's metrics at once
    real_log_batch, failed = nas.tracking.Tracker.log_batch, []

    def log_batch(self, run_id, metrics=(), params=None, tags=None):
        metrics = list(metrics)
        if not failed and not params and not tags and any(m.key == "val_loss" for m in metrics):
            failed.append(run_id)
            raise OSError("the tracking store went away")
        return real_log_batch(self, run_id, metrics, params, tags)

    monkeypatch.setattr(nas.tracking.Tracker, "log_batch", log_batch)
    result = invoke(SEARCH + ["--max-trials", "3"])
    assert_one_trial_failed(result, "0", "OSError: the tracking store went away")


def test_a_run_an_interruption_left_open_is_closed_killed(tmp_path):
    from types import SimpleNamespace

    from nas.architecture import Architecture
    from nas.events import Callback
    from nas.settings import SearchConfig
    from nas.trial_runs import TrialRuns
    from nas.specs import load_pipeline, load_space
    from nas.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = tracker.experiment_id("interrupted")
    parent = tracker.start_run(experiment_id, "search")
    space = load_space("tiny")
    values = {"depth": 1, "stage_1/filters": 4, "stage_1/kernel_size": 3,
              "stage_1/padding": "same", "stage_1/pool": "max", "reduce": "flatten",
              "dense_layers": 0, "learning_rate": 0.01}
    hooks = TrialRuns(tracker, experiment_id, parent,
                      SearchConfig(space=space, pipeline=load_pipeline("digits")),
                      Callback(), total=1)
    trial = SimpleNamespace(trial_id="0", hyperparameters=SimpleNamespace(values=values))
    hooks.trial_started(trial, Architecture.from_values(space, values, (8, 8, 1), 10, 16.0))
    hooks.batch_ended()  # the run is written in the background ...
    hooks.close()  # ... and an interruption skipped trial_ended
    (run,) = [r for r in tracker.client.search_runs([experiment_id])
              if r.info.run_id != parent]
    assert run.info.status == "KILLED"
    assert run.data.tags["nas.error"] == "interrupted"
    assert run.data.params["depth"] == "1"


@pytest.mark.slow
def test_out_of_memory_fails_only_that_trial(monkeypatch):
    import tensorflow as tf

    import nas.tuning

    real_fit = nas.tuning.CandidateModel.fit
    calls = []

    def fit(self, hp, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(nas.tuning.CandidateModel, "fit", fit)
    result = invoke(SEARCH + ["--max-trials", "2"])
    assert result.exit_code == 0, result.output
    runs = {r.data.tags["nas.trial_id"]: r for r in runs_of()}
    assert runs["0"].info.status == "FAILED"
    assert "ResourceExhaustedError: OOM when allocating tensor" in runs["0"].data.tags["nas.error"]
    assert runs["1"].info.status == "FINISHED"


def nan_pipeline(tmp_path):
    """Pixels near float32's limit: activations overflow, and the loss is NaN at once."""
    rng = np.random.default_rng(0)
    x = rng.choice([-3e38, 3e38], (64, 8, 8)).astype("float32")
    np.savez(tmp_path / "huge.npz", x_train=x, y_train=rng.integers(0, 2, 64))
    path = tmp_path / "huge.yaml"
    path.write_text("data: {source: npz, path: huge.npz, pixel_scale: 1}\n")
    return str(path)


@pytest.mark.slow
def test_nan_loss_stops_the_trial_at_once_and_max_failures_ends_the_search(tmp_path):
    # (random: its first candidates overflow at once; evolution's batch-normed seeds later)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--tuner", "random",
                                       "--pipeline", nan_pipeline(tmp_path), "--epochs", "5",
                                       "--max-trials", "5", "--max-failures", "2",
                                       "--experiment", "rel"])
    assert result.exit_code == 1, result.output
    assert "Error: the search failed: 2 trials in a row failed (--max-failures)" in result.output
    assert "  trial 0: " in result.output and "the loss became" in result.output
    trials = runs_of()
    assert [r.info.status for r in trials] == ["FAILED", "FAILED"]
    client = MlflowClient()
    for run in trials:
        assert run.data.tags["nas.error"].startswith("FailedTrialError: the loss became")
        assert "at epoch 1, batch" in run.data.tags["nas.error"]
        # stopped inside the first epoch: no epoch ever ended
        assert client.get_metric_history(run.info.run_id, "val_loss") == []
    (parent,) = runs_of(kind="search")
    assert parent.info.status == "FAILED"


# --- interrupted searches ---------------------------------------------------------------------


# Trials long enough that, once a trial is seen training (`wait_until_training`: its first
# epoch saved), most of its epochs are still ahead: the test cannot miss it.
LONG = ["--pipeline", "long.yaml", "--epochs", "20"]
LONGER = ["--pipeline", "long.yaml", "--epochs", "15"]
SHORTER = ["--epochs", "10"]  # still seconds of training to interrupt, half the resume
# The tests that start a search have a time limit (600 s) above the sum of their own
# waits, so that those fail first, with what the search printed.


def start_search(tmp_path, *extra):
    """`nas search` in a subprocess, on digits with trials long enough to interrupt."""
    (tmp_path / "long.yaml").write_text(
        "data: {source: digits}\ntrain: {batch_size: 16, early_stopping_patience: null}\n")
    # Create the store first: two processes creating one SQLite store's tables race.
    MlflowClient().search_experiments()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "nas.cli", *SEARCH, "--max-trials", "3", "--seed", "2", *LONG,
            *extra]
    # SIGINT as a terminal delivers it, even when this process was started ignoring it (a
    # background job of a shell): Python turns it into KeyboardInterrupt only if it is not
    # ignored when Python starts.
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Its output is read as it comes, so that a full pipe never blocks it.
    process.lines = []
    process.reader = threading.Thread(target=lambda: process.lines.extend(process.stdout),
                                      daemon=True)
    process.reader.start()
    return process


def output_of(process, timeout=60) -> str:
    """Everything the search printed, once it has ended."""
    process.wait(timeout=timeout)
    process.reader.join(timeout=timeout)
    return "".join(process.lines)


def wait_until_training(trial_id: str, process, project: Path, timeout=180) -> None:
    """Block until trial `trial_id` of the search `process` runs is training, mid-trial.

    That is two events: the trial saved its first finished epoch (`nas.tuning` always
    saves a trial's first epoch, for a resume: `<project>/trial_<id>/resume.json`), and
    its MLflow run is written (RUNNING, with its params). The trials here have many epochs
    after the first, so the trial is still training when the test acts on it.
    """
    resume = project / f"trial_{trial_id}" / "resume.json"
    deadline = time.monotonic() + timeout
    while not (resume.exists() and any(
            run.data.tags.get("nas.trial_id") == trial_id and run.info.status == "RUNNING"
            and run.data.params for run in runs_of())):
        assert process.poll() is None, output_of(process)
        assert time.monotonic() < deadline, f"trial {trial_id} not training after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_owner_then_sigkill_mid_trial_and_a_damaged_state_resume(tmp_path):
    project = tmp_path / ".nas" / "rel"
    resume = project / "trial_1" / "resume.json"
    process = start_search(tmp_path, "--epochs", "15")
    try:
        wait_until_training("1", process, project)
        # Stopped where it is (SIGSTOP), mid-trial 1: it keeps its lock and its RUNNING run
        # while the test looks, and nothing the test does can race its training.
        os.killpg(process.pid, signal.SIGSTOP)
        # A second search of the same experiment is refused while the first runs ...
        second = CliRunner().invoke(main, SEARCH + ["--max-trials", "3", "--seed", "2",
                                                    *LONGER])
        assert second.exit_code == 2, second.output
        (line,) = second.output.strip().splitlines()
        assert line.startswith(f"Error: --experiment: the search 'rel' is running in "
                               f"process {process.pid} on {socket.gethostname()} since ")
        assert len(runs_of(kind="search")) == 1  # it wrote nothing
        # ... while reading it works.
        shown = CliRunner().invoke(main, ["trials", "--experiment", "rel"])
        assert shown.exit_code == 0 and "RUNNING" in shown.output, shown.output
        os.killpg(process.pid, signal.SIGKILL)  # kill -9, mid-trial 1
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    before = {r.info.run_id: r.info.status for r in runs_of()}
    assert sorted(before.values()) == ["FINISHED", "RUNNING"]  # trial 0 done, trial 1 dead
    (dead,) = [r for r in runs_of() if r.info.status == "RUNNING"]
    done = json.loads(resume.read_text())["epoch"] + 1  # epochs trial 1 finished
    # What a kill -9 during a plain write would have left: half an oracle.json, an empty
    # trial.json.
    oracle = (project / "oracle.json").read_text()
    (project / "oracle.json").write_text(oracle[:len(oracle) // 2])
    (project / "trial_0" / "trial.json").write_text("")

    # The dead process's lock is taken over; the lost state is rebuilt from MLflow.
    result = invoke(SEARCH + ["--max-trials", "3", "--seed", "2", *LONGER])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "resuming the search" in result.output
    assert "closed 1 trial run(s) left running by an earlier process" in result.output
    assert f"the search's state in {project} is damaged (" in result.output
    assert ("rebuilt 1 ended trial from the tracking store; 1 interrupted one(s) will run "
            "again") in result.output

    trials = runs_of()
    finished = [r.data.tags["nas.trial_id"] for r in trials if r.info.status == "FINISHED"]
    assert sorted(finished) == ["0", "1", "2"]  # each trial id exactly once
    assert len(trials) == 3 and not [r for r in trials if r.info.status != "FINISHED"]
    # The interrupted trial went on after its last finished epoch, in its own run.
    trained = "epoch 1 was" if done == 1 else f"epochs 1-{done} were"
    assert (f"trial 1 resumes at epoch {done + 1} ({trained} trained by an earlier "
            f"process)") in result.output
    (again_1,) = [r for r in trials if r.data.tags["nas.trial_id"] == "1"]
    assert again_1.info.run_id == dead.info.run_id and "nas.error" not in again_1.data.tags
    steps = [m.step for m in MlflowClient().get_metric_history(again_1.info.run_id,
                                                               "val_accuracy")]
    assert sorted(steps) == list(range(len(steps))) and len(steps) > done  # each epoch once
    assert again_1.data.metrics["epochs_trained"] == len(steps)
    first_trial_runs = [r for r in trials if r.data.tags["nas.trial_id"] == "0"]
    assert len(first_trial_runs) == 1  # the finished trial was not trained again
    assert "trial 1 (2/3)" in result.output and "trial 2 (3/3)" in result.output
    (parent,) = runs_of(kind="search")
    assert parent.info.status == "FINISHED"

    again = invoke(SEARCH + ["--max-trials", "3", "--seed", "2", *LONGER])
    assert again.exit_code == 0, again.output
    assert "the search had already finished" in again.output
    assert len(runs_of()) == len(trials)  # nothing trained again


@pytest.mark.slow
@pytest.mark.timeout(600)  # three searches side by side
def test_searches_started_at_once_on_a_new_store(tmp_path):
    """Three searches started at once on an SQLite store none has created yet: two of one
    experiment (one runs; the other is refused in one line, exit code 2, having written
    nothing) and one of another (it runs too). Neither crashes creating MLflow's tables."""
    store = tmp_path / "new.db"
    uri = f"sqlite:///{store}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MLFLOW_TRACKING_URI=uri)

    def start(experiment, workdir):
        return subprocess.Popen(
            [sys.executable, "-m", "nas.cli", "search", "--space", "tiny", "--pipeline",
             "digits", "--max-trials", "1", "--epochs", "1", "--ensemble", "1",
             "--experiment", experiment, "--workdir", str(tmp_path / workdir)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    processes = [start("same", "work"), start("same", "work"), start("other", "other_work")]
    deadline = time.monotonic() + 300
    try:
        ended = [(process.communicate(timeout=max(1, deadline - time.monotonic())),
                  process.returncode) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    shown = "\n\n".join(out + err for (out, err), _ in ended)
    assert "Traceback" not in shown, shown
    assert sorted(code for _, code in ended[:2]) == [0, 2], shown
    assert ended[2][1] == 0, shown
    winner, refused = sorted(range(2), key=lambda i: ended[i][1])
    (out, err), _ = ended[refused]
    assert out == "", shown  # refused before it printed its first line
    (line,) = err.splitlines()
    assert line.startswith(f"Error: --experiment: the search 'same' is running in process "
                           f"{processes[winner].pid} on {socket.gethostname()} since "), line
    client = MlflowClient(uri)
    for experiment in ("same", "other"):
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        runs = client.search_runs([experiment_id])
        assert sorted(r.data.tags["nas.kind"] for r in runs) == ["search", "trial"], runs
        assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(os.listdir(tmp_path / "work")) == ["same", "same.lock"]
    assert not (tmp_path / "new.db.lock").exists()  # the store's creation lock, gone after


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum, shown", [(signal.SIGTERM, "signal SIGTERM"),
                                           (signal.SIGINT, "Ctrl-C")])
def test_a_signal_closes_runs_as_killed_and_says_how_to_resume(tmp_path, signum, shown):
    process = start_search(tmp_path, "--max-trials", "2", *SHORTER)
    try:
        wait_until_training("0", process, tmp_path / ".nas" / "rel")
        process.send_signal(signum)
        output = output_of(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output
    assert (f"Interrupted ({shown}): the trial and the search were closed as KILLED and the "
            f"state saved; run the same command to resume.") in output
    assert "Traceback" not in output
    assert [r.info.status for r in runs_of()] == ["KILLED"]
    assert [r.info.status for r in runs_of(kind="search")] == ["KILLED"]
    if signum == signal.SIGINT:
        return

    result = invoke(SEARCH + ["--max-trials", "2", "--seed", "2", *LONG[:2], "--epochs", "1"])
    assert result.exit_code == 2  # other settings than the interrupted search
    assert "already holds a search with other settings" in result.output

    result = invoke(SEARCH + ["--max-trials", "2", "--seed", "2", *LONG, *SHORTER])
    assert result.exit_code == 0, result.output
    statuses = sorted((r.data.tags["nas.trial_id"], r.info.status) for r in runs_of())
    # Trial 0 went on from its last finished epoch, in the run the signal closed.
    assert statuses == [("0", "FINISHED"), ("1", "FINISHED")]
    assert "trial 0 resumes at epoch " in result.output
    assert [r.info.status for r in runs_of(kind="search")] == ["FINISHED"]


@pytest.mark.slow
def test_overwrite_never_leaves_the_working_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")
    for name in ("../victim", str(victim), ".."):
        result = invoke(["search", "--space", "tiny", "--epochs", "1", "--max-trials", "1",
                         "--experiment", name, "--overwrite"])
        assert result.exit_code == 0, result.output
    assert (victim / "important.txt").read_text() == "keep me"
    folders = ["_victim", str(victim).replace("/", "_"), "search"]
    # Each search's folder, and its lock beside it (nas.state.SearchLock).
    assert sorted(os.listdir(tmp_path / ".nas")) == sorted(
        folders + [f"{name}.lock" for name in folders])


@pytest.mark.slow
def test_a_damaged_state_file_is_found_again_in_the_tracking_store(tmp_path):
    assert invoke(SEARCH + ["--max-trials", "1"]).exit_code == 0
    (parent,) = runs_of(kind="search")
    (tmp_path / ".nas" / "rel" / "nas_search.json").write_text("{not json")
    again = invoke(SEARCH + ["--max-trials", "1"])
    assert again.exit_code == 0, again.output
    assert (f"found this search in the tracking store (run {parent.info.run_id}); going on "
            f"from there") in again.output
    assert "the search had already finished" in again.output
    assert len(runs_of(kind="search")) == 1 and len(runs_of()) == 1
    assert invoke(SEARCH + ["--max-trials", "1", "--overwrite"]).exit_code == 0
    assert len(runs_of(kind="search")) == 2


@pytest.mark.slow
def test_overwrite_starts_afresh(tmp_path):
    assert invoke(SEARCH + ["--max-trials", "1"]).exit_code == 0
    result = invoke(SEARCH + ["--max-trials", "1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output
    assert len(runs_of(kind="search")) == 2 and len(runs_of()) == 2


# --- bad input --------------------------------------------------------------------------------


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def bad_inputs(tmp):
    """(arguments, the one line expected on stderr) for each kind of bad input."""
    yield ["--space", "missing.yaml"], "Error: missing.yaml: no such file"
    yield (["--space", write(tmp / "s.yaml", "stages: [1,\n")],
           f"Error: {tmp / 's.yaml'}: line 2: not valid YAML")
    yield (["--space", write(tmp / "k.yaml", "name: x\nstages: {}\nhead: {}\noptimizer: {}\n"
                                              "extra: 1\n")],
           f"Error: {tmp / 'k.yaml'}: extra: unknown key; allowed keys are "
           f"['augment', 'constraints', 'head', 'name', 'optimizer', 'resolution', 'stages']")
    yield (["--tuner", "annealing"],
           "Error: Invalid value for '--tuner': 'annealing' is not one of 'evolution', 'random', "
           "'bayesian', 'hyperband', 'grid'. (see 'nas search --help')")
    yield (["--max-trials", "0"],
           "Error: Invalid value for '--max-trials': 0 is not in the range x>=1.")
    yield ["--batch-size", "0"], "Error: Invalid value for '--batch-size': 0 is not in the range"
    yield ["--epochs", "-1"], "Error: Invalid value for '--epochs': -1 is not in the range"
    base = (Path(__file__).parent.parent / "search_spaces" / "tiny.yaml").read_text()
    for name, old, new, message in [
        ("type", "filters: [4, 8]", "filters: four", "stages.conv.filters: 'four' is not a number"),
        ("minmax", "depth: {min: 1, max: 2}", "depth: {min: 3, max: 2}",
         "stages.depth: min 3 is greater than max 2"),
        ("empty", "filters: [4, 8]", "filters: []", "stages.conv.filters: the list of choices "
                                                    "is empty"),
        ("kernel", "kernel_size: [3, 5]", "kernel_size: [0, 3]",
         "stages.conv.kernel_size: 0 is below the minimum 1"),
        ("stride", "stride: 1", "stride: 0", "stages.conv.stride: 0 is below the minimum 1"),
        ("pool", "size: 2", "size: 0", "stages.pool.size: 0 is below the minimum 1"),
        ("dropout", "dropout: 0.0", "dropout: 1.0", "head.dense.dropout: 1.0 is not in [0.0, 1.0)"),
        ("padding", "padding: [same, valid]", "padding: [same, full]",
         "stages.conv.padding: 'full' is not one of ['same', 'valid']"),
        ("pooling", "type: [max, none]", "type: [max, median]",
         "stages.pool.type: 'median' is not one of ['max', 'avg', 'none']"),
        ("optimizer", "name: adam", "name: adagrad",
         "optimizer.name: 'adagrad' is not one of ['adam', 'adamw', 'sgd', 'rmsprop', 'nadam']"),
    ]:
        assert old in base, old
        path = write(tmp / f"space_{name}.yaml", base.replace(old, new))
        yield ["--space", path], f"Error: {path}: {message}"
    d = tmp / "nothing"
    d.mkdir()
    yield (["--pipeline", write(tmp / "p1.yaml", f"data: {{source: directory, path: {tmp}/no}}")],
           f"Error: {tmp / 'p1.yaml'}: data.path: {tmp}/no is not a folder")
    yield (["--pipeline", write(tmp / "p2.yaml", f"data: {{source: directory, path: {d}}}")],
           f"Error: {tmp / 'p2.yaml'}: data.path: {d} holds no class folders")
    write(tmp / "one" / "cats" / "a.png", "x")
    yield (["--pipeline", write(tmp / "p3.yaml", f"data: {{source: directory, path: {tmp}/one}}")],
           f"Error: {tmp / 'p3.yaml'}: data.path: {tmp}/one holds only one class folder (cats)")
    make_shapes(tmp / "two", per_class=2, size=8)
    write(tmp / "two" / "square" / "broken.png", "not an image")
    yield (["--pipeline", write(tmp / "p4.yaml", f"data: {{source: directory, path: {tmp}/two}}")],
           f"Error: {tmp / 'p4.yaml'}: data.path: 1 of 7 files are not readable images: "
           f"square/broken.png (not an image); fix or remove them, or pass --skip-bad-images "
           f"to leave them out")
    np.savez(tmp / "nox.npz", y_train=np.zeros(3))
    yield (["--pipeline", write(tmp / "p5.yaml", f"data: {{source: npz, path: {tmp}/nox.npz}}")],
           f"Error: {tmp / 'p5.yaml'}: data.path: {tmp}/nox.npz has no x_train array")
    np.savez(tmp / "mismatch.npz", x_train=np.zeros((4, 8, 8)), y_train=np.zeros(3))
    yield (["--pipeline", write(tmp / "p6.yaml",
                                f"data: {{source: npz, path: {tmp}/mismatch.npz}}")],
           f"Error: {tmp / 'p6.yaml'}: data.path: {tmp}/mismatch.npz: x_train has 4 samples "
           f"but y_train has 3")
    for split, message in (("1.0", "data.test_split: 1.0 is not in [0.0, 1.0)"),
                           ("-0.1", "data.test_split: -0.1 is below the minimum 0.0"),
                           ("0.8", "data.test_split: 0.8 with validation_split 0.2 leaves no "
                                   "training data")):
        path = write(tmp / f"split{split}.yaml", f"data: {{source: digits, test_split: {split}}}")
        yield ["--pipeline", path], f"Error: {path}: {message}"
    path = write(tmp / "val0.9.yaml", "data: {source: digits, validation_split: 0.9}")
    yield (["--pipeline", path], f"Error: {path}: data.validation_split: 0.9 with test_split "
                                 f"0.2 leaves no training data")
    rare = np.array([0] * 20 + [1] * 20 + [2] * 2)  # class 2: too few for three splits
    np.savez(tmp / "rare.npz", x_train=np.random.default_rng(0).random((42, 8, 8)), y_train=rare)
    path = write(tmp / "rare.yaml", f"data: {{source: npz, path: {tmp}/rare.npz}}")
    yield (["--pipeline", path], f"Error: {path}: data.validation_split: class '2' has 1 "
                                 f"sample(s) left, too few to appear in the training data and "
                                 f"in this split")
    np.savez(tmp / "half.npz", x_train=np.zeros((4, 8, 8)), y_train=np.arange(4) % 2,
             x_test=np.zeros((2, 8, 8)))
    path = write(tmp / "half.yaml", f"data: {{source: npz, path: {tmp}/half.npz}}")
    yield (["--pipeline", path], f"Error: {path}: data.path: {tmp}/half.npz must hold both "
                                 f"x_test and y_test, or neither")
    yield (["--pipeline", "mnist"],
           "Error: pipelines/mnist.yaml: data.source: 'mnist' not found offline; looked in ")
    yield (["--tracking-uri", "http://127.0.0.1:9"],
           "Error: --tracking-uri: http://127.0.0.1:9 cannot be reached")
    yield (["--workdir", write(tmp / "a_file", "") + "/state"],
           f"Error: --workdir: {tmp / 'a_file'} is a file, not a folder")


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # no cached mnist
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    monkeypatch.setenv("NAS_WORKDIR", str(work / ".nas"))
    for args, expected in bad_inputs(inputs):
        result = CliRunner().invoke(main, ["search", *args], prog_name="nas")
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, result.output)
        assert "Traceback" not in result.output
        assert sorted(os.listdir(work)) == [], (args, os.listdir(work))  # nothing written
