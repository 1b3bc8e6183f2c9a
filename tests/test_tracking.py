"""The tracking store as the MLflow UI shows it."""

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from nas.tracking import Tracker


def test_new_and_existing_experiments_open_on_training_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    older = client.create_experiment("older", artifact_location=str(tmp_path / "a"))
    tracker = Tracker(uri)

    new = tracker.experiment_id("new")
    assert tracker.experiment_id("older") == older

    for experiment_id in (new, older):
        tags = client.get_experiment(experiment_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_read_only_lookup_writes_no_tag(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("seen", artifact_location=str(tmp_path / "a"))

    assert Tracker(uri).experiment_id("seen", create=False) == experiment_id
    assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags


def test_a_tracker_keeps_mlflow_run_links_out_of_the_output(tmp_path, monkeypatch):
    """MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, for this process and those it starts; a
    value the user set stays (an http store: the test below)."""
    import os
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = subprocess.run(
        [sys.executable, "-c",
         "import os; print(os.environ['MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT'])"],
        capture_output=True, text=True, check=True)
    assert child.stdout == "true\n"

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "false"


@pytest.mark.slow
def test_no_mlflow_run_links_in_the_output_on_an_http_store(mlflow_server, monkeypatch,
                                                           capsys):
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--pipeline", "digits", "--max-trials", "1",
        "--epochs", "1", "--ensemble", "1", "--experiment", "http-output",
        "--tracking-uri", mlflow_server])
    assert result.exit_code == 0, result.output
    assert "1 trial finished" in result.output
    assert "View run" not in result.output and "View experiment" not in result.output
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("http-output")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # What the search kept out: MLflow's lines, when the user asks for them.
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    tracker = Tracker(mlflow_server)
    run_id = tracker.start_run(experiment.experiment_id, "shown")
    capsys.readouterr()
    tracker.end(run_id, "FINISHED")
    assert "View run shown at: " in capsys.readouterr().out
