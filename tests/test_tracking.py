"""The tracking store as the MLflow UI shows it."""

from mlflow import MlflowClient

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
