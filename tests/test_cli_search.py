"""`nas search` end to end on the bundled digits, and what MLflow holds afterwards."""

from __future__ import annotations

import click
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
