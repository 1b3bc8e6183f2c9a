"""`nas search` end to end on the bundled digits, and what MLflow holds afterwards."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from all_commands(command, prefix + (name,))


@pytest.mark.parametrize("command", [()] + list(all_commands(main)), ids=" ".join)
def test_help_of_every_command(command):
    result = CliRunner().invoke(main, list(command) + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


@pytest.mark.slow
def test_search_on_digits_lands_in_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--pipeline", "digits", "--max-trials", "3",
        "--epochs", "3", "--seed", "4", "--experiment", "e2e", "--tracking-uri", uri,
    ])
    assert result.exit_code == 0, result.output
    assert "searching tiny on digits with evolution: 3 trials, experiment 'e2e'" in result.output
    assert "3 trials finished, 0 failed" in result.output
    assert "trial  val_accuracy  params" in result.output

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("nas.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("nas.kind") == "trial"]
    assert f"search run: {parent.info.run_id}" in result.output

    assert parent.info.status == "FINISHED"
    assert parent.data.params["tuner"] == "evolution"
    assert parent.data.params["max_trials"] == "3"
    assert parent.data.params["space"] == "tiny"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "specs")}
    assert artifacts == {"specs/tiny.yaml", "specs/digits.yaml"}
    assert parent.data.metrics["finished_trials"] == 3
    assert "rejected_candidates" in parent.data.metrics

    assert sorted(r.data.tags["nas.trial_id"] for r in trials) == ["0", "1", "2"]
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        params = run.data.params
        depth = int(params["depth"])
        assert {f"stage_{s}/kernel_size" for s in range(1, depth + 1)} <= set(params)
        assert f"stage_{depth + 1}/kernel_size" not in params  # inactive knobs are not logged
        metrics = run.data.metrics
        assert metrics["params"] > 0 and metrics["flops"] > 0 and metrics["fit_time_s"] > 0
        # The run spans its trial, from before the model is built to after it trained.
        assert (run.info.end_time - run.info.start_time) / 1000 >= metrics["fit_time_s"]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(len(history)))
        assert 1 <= len(history) <= 3
        assert metrics["objective"] == max(m.value for m in history)
        for name in ("loss", "accuracy", "val_loss"):
            assert len(client.get_metric_history(run.info.run_id, name)) == len(history)
    best = max(trials, key=lambda r: r.data.metrics["objective"])
    assert parent.data.tags["nas.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_objective"] == best.data.metrics["objective"]


@pytest.mark.slow
@pytest.mark.new_store
def test_default_store_is_mlflows_own(tmp_path, monkeypatch):
    """No --tracking-uri and no MLFLOW_TRACKING_URI: mlflow.db and ./mlruns, as `mlflow ui` reads."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--max-trials", "1",
                                       "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "mlruns").is_dir()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("tiny-digits") is not None


@pytest.mark.slow
def test_same_seed_same_candidates(tmp_path):
    def candidates(experiment):
        result = CliRunner().invoke(main, ["search", "--space", "tiny", "--max-trials", "3",
                                           "--epochs", "1", "--seed", "11",
                                           "--experiment", experiment])
        assert result.exit_code == 0, result.output
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], "tags.`nas.kind` = 'trial'")
        return sorted((r.data.tags["nas.trial_id"], sorted(r.data.params.items())) for r in runs)

    assert candidates("first") == candidates("second")


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband", "grid"])
def test_every_tuner_runs_a_search_to_its_end(tuner):
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--tuner", tuner,
                                       "--max-trials", "3", "--epochs", "3",
                                       "--experiment", tuner])
    assert result.exit_code == 0, result.output
    assert "3 trials finished, 0 failed" in result.output
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tuner)
    parent = client.search_runs([experiment.experiment_id], "tags.`nas.kind` = 'search'")[0]
    assert parent.data.params["tuner"] == tuner
    assert parent.data.metrics["finished_trials"] == 3


@pytest.mark.slow
def test_mirrored_distribution_trains_on_the_cpu(tmp_path, monkeypatch):
    from nas import assembly

    made = []
    original = assembly.strategy
    monkeypatch.setattr(assembly, "strategy",
                        lambda name: made.append(original(name)) or made[-1])
    uri = f"sqlite:///{tmp_path}/mirrored.db"
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--max-trials", "1", "--epochs", "1",
        "--experiment", "mirrored", "--tracking-uri", uri, "--distribution", "mirrored"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 trial finished, 0 failed" in result.output
    (strategy,) = made
    assert type(strategy).__name__ == "MirroredStrategy"
    assert strategy.num_replicas_in_sync >= 1


# --- what a person sees while a search runs (issue 13) ----------------------------------

EPOCH_LINE = re.compile(r"trial (\S+) epoch (\d+)/(\d+)  val_accuracy (\d\.\d{4}) \(trial best "
                        r"(\d\.\d{4})\)  left: trial <=(\S+s), search ~(\S+s)$")
TRIAL_LINE = re.compile(r"trial \S+ \((\d+)/")  # how bench/run.py finds a trial's end


@pytest.mark.slow
def test_progress_lines_in_non_terminal_output(tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--max-trials", "2", "--epochs", "3", "--seed", "4",
        "--experiment", "progress", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "\x1b" not in result.output

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("progress")
    # MLflow 3 shows it as a machine-learning experiment (see also nas.results.UI_WORKFLOW).
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["nas.trial_id"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`nas.kind` = 'trial'")}
    lines = result.output.splitlines()
    for trial_id, run in runs.items():
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        shown = [EPOCH_LINE.match(line) for line in lines
                 if line.startswith(f"trial {trial_id} epoch ")]
        assert all(shown), lines
        assert [int(m[2]) for m in shown] == list(range(1, len(history) + 1))
        assert {m[3] for m in shown} == {"3"}
        assert [m[4] for m in shown] == [f"{h.value:.4f}" for h in history]
        assert shown[-1][5] == f"{run.data.metrics['objective']:.4f}"
        # The trial's end follows its last epoch, in the format it always had.
        end = lines[lines.index(shown[-1][0]) + 1]
        assert end.startswith(f"trial {trial_id} (") and TRIAL_LINE.match(end)
    assert not [line for line in lines if EPOCH_LINE.match(line) and TRIAL_LINE.match(line)]


@pytest.mark.slow
@pytest.mark.parametrize("switch", [["--no-progress"], "NAS_PROGRESS=0"], ids=["flag", "env"])
def test_progress_off(switch, monkeypatch):
    if isinstance(switch, str):
        monkeypatch.setenv(*switch.split("="))
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--max-trials", "1",
                                       "--epochs", "1", "--experiment", "quiet",
                                       *(switch if isinstance(switch, list) else [])])
    assert result.exit_code == 0, result.output
    assert " epoch " not in result.output
    assert TRIAL_LINE.search(result.output)


def test_progress_on_a_terminal_is_one_line_rewritten(capsys, monkeypatch):
    from nas.cli.search import Progress
    from nas.events import EpochEnded, TrialEnded

    def event(epoch, value):
        return EpochEnded("7", 1, 5, epoch, 10, "val_accuracy", value, value, 300.0 - epoch,
                          1500.0, time_limited=epoch > 1)

    monkeypatch.setenv("COLUMNS", "120")  # the terminal's width
    shown = Progress(terminal=True)
    shown.on_epoch_end(event(1, 0.5))
    shown.on_epoch_end(event(2, 0.75))
    shown.on_trial_end(TrialEnded("7", 1, 5, "val_accuracy", 0.75, 0.75, 1000, 9.0, "FINISHED"))
    out = capsys.readouterr().out
    first = ("trial 7 epoch 1/10  val_accuracy 0.5000 (trial best 0.5000)  left: trial "
             "<=4m59s, search ~25m00s")
    second = ("trial 7 epoch 2/10  val_accuracy 0.7500 (trial best 0.7500)  left: trial "
              "<=4m58s, search <=25m00s (time limit)")
    assert out == (f"\r{first}\r{second.ljust(len(first))}\r{' ' * len(second)}\r"
                   f"trial 7 (1/5): val_accuracy 0.7500  best 0.7500  params 1,000  9.0 s\n")

    monkeypatch.setenv("COLUMNS", "50")  # never wider: a wrapped line is not rewritten
    shown.on_epoch_end(event(1, 0.5))
    shown.on_message("end")
    assert capsys.readouterr().out == f"\r{first[:49]}\r{' ' * 49}\rend\n"


def test_tensorflow_start_up_lines_kept_to_the_log_level():
    from nas.cli.common import tensorflow_lines

    caught = ("WARNING: All log messages before absl::InitializeLog() is called are written "
              "to STDERR\n"
              "I0000 00:00:1.1 12 port.cc:153] oneDNN custom operations are on.\n"
              "I0000 00:00:1.2 12 cpu_feature_guard.cc:227] This TensorFlow binary is ...\n"
              "To enable the following instructions: AVX2 FMA, in other operations, ...\n"
              "E0000 00:00:1.3 12 cuda_platform.cc:52] failed call to cuInit: ...\n")
    lines = caught.splitlines(keepends=True)
    assert tensorflow_lines(caught, "3") == ""
    assert tensorflow_lines(caught, "2") == lines[4]
    assert tensorflow_lines(caught, "1") == lines[0] + lines[4]
    assert tensorflow_lines(caught, "0") == caught


# What TensorFlow 2.21 writes to stderr as it starts, before its logging reads
# TF_CPP_MIN_LOG_LEVEL: absl's first line, then glog-style lines (I0000 00:00:... file.cc:12]).
START_UP_LINE = re.compile(r"absl::InitializeLog|oneDNN|cuda drivers|cuInit|"
                           r"cpu_feature_guard|^[IWEF]\d{4} ")


def write_fashion_mnist(keras_home, samples=240):
    """A small Fashion-MNIST (random pixels) where keras.datasets finds it offline."""
    import gzip

    folder = keras_home / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", samples), ("t10k", samples // 4)):
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as file:
            file.write(struct.pack(">II", 0x801, count)
                       + (np.arange(count) % 10).astype("uint8").tobytes())
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as file:
            file.write(struct.pack(">IIII", 0x803, count, 28, 28)
                       + rng.integers(0, 256, (count, 28, 28), "uint8").tobytes())


@pytest.mark.slow
@pytest.mark.timeout(600)  # two processes side by side, a search among them
def test_no_tensorflow_start_up_line_at_log_level_3_on_any_path(tmp_path):
    """None of TensorFlow's start-up lines at TF_CPP_MIN_LOG_LEVEL=3, the user's or nas's
    own, wherever a command first imports TensorFlow: a search whose data is a Keras
    dataset, a Keras dataset that is not on the machine (refused in one line)."""
    keras_home, empty_home = tmp_path / "keras_home", tmp_path / "empty_home"
    write_fashion_mnist(keras_home)
    empty_home.mkdir()
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TF_CPP_MIN_LOG_LEVEL", "no_proxy", "NO_PROXY")}
    # Offline even where there is a network: every download goes to a closed port.
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "KERAS_HOME": str(empty_home)}

    def start(name, args, **env):
        folder = tmp_path / name
        folder.mkdir()
        return subprocess.Popen(
            [sys.executable, "-m", "nas.cli", *args, "--tracking-uri",
             f"sqlite:///{folder}/mlflow.db", "--workdir", str(folder / ".nas")],
            cwd=folder, env={**environment, "KERAS_HOME": str(keras_home), **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    search = ["search", "--space", "tiny", "--max-trials", "1", "--epochs", "1",
              "--ensemble", "1"]
    processes = {  # side by side: each is mostly TensorFlow's import
        "search": start("search", search + ["--pipeline", "fashion_mnist"],
                        TF_CPP_MIN_LOG_LEVEL="3"),
        # mnist: no system folder holds it (Debian packages only Fashion-MNIST)
        # The level unset: nas's own (3).
        "search offline": start("offline", search + ["--pipeline", "mnist"], **offline),
    }
    deadline = time.monotonic() + 300
    try:
        ended = {name: (process.communicate(timeout=max(1, deadline - time.monotonic())),
                        process.returncode) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    for name, ((out, err), code) in ended.items():
        shown = [line for line in err.splitlines() if START_UP_LINE.search(line)]
        assert not shown, (name, err)
        assert "Traceback" not in err, (name, err)
    (out, err), code = ended["search"]
    assert code == 0 and "1 trial finished" in out, out + err
    (out, err), code = ended["search offline"]
    assert code == 2 and out == "", out + err
    (line,) = err.splitlines()
    assert line.startswith("Error: pipelines/mnist.yaml: data.source: 'mnist' not found "
                           "offline; looked in "), line
