"""`--time-limit`: no trial starts that would not end in time; the search ends cleanly."""

from __future__ import annotations

import keras_tuner as kt
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from nas.oracles import declare, make_oracle
from nas.specs import load_space

SEARCH = ["search", "--space", "tiny", "--epochs", "3", "--experiment", "timed"]


def oracle_with_limit(limit, tmp_path):
    oracle = make_oracle("evolution", declare(load_space("tiny")),
                         kt.Objective("val_accuracy", "max"), max_trials=50, seed=0,
                         max_epochs=3, max_failures=3, check=lambda values: None,
                         time_limit=limit)
    oracle._set_project_dir(str(tmp_path), "project")
    return oracle


def test_the_oracle_stops_proposing_when_the_next_trial_would_not_end_in_time(tmp_path):
    oracle = oracle_with_limit(100.0, tmp_path)
    assert oracle.create_trial("t").status == "RUNNING"  # nothing measured yet: go
    oracle.spent, oracle.durations = 80.0, [15.0]  # 80 s spent, trials take 15 s
    assert oracle.create_trial("u").status == "RUNNING"
    oracle.spent = 86.0  # 86 + 15 > 100
    assert oracle.create_trial("v").status == "STOPPED" and oracle.stopped_by_time
    # what was spent survives a save: a resumed search counts it
    fresh = oracle_with_limit(100.0, tmp_path / "fresh")
    fresh.trials = oracle.trials  # KerasTuner reloads them from their own files
    fresh.set_state(oracle.get_state())
    assert fresh.elapsed() >= 86.0 and fresh.durations == [15.0]


def trial_runs():
    client = MlflowClient()
    experiment = client.get_experiment_by_name("timed")
    return client.search_runs([experiment.experiment_id], "tags.`nas.kind` = 'trial'")


@pytest.mark.slow
def test_a_short_time_limit_ends_the_search_cleanly_with_its_final_model_and_resumes():
    result = CliRunner().invoke(main, SEARCH + ["--max-trials", "50", "--time-limit", "6s"])
    assert result.exit_code == 0, result.output
    assert "stopped by --time-limit: the next trial would not have ended in time" in result.output
    first = trial_runs()
    assert 1 <= len(first) < 50 and all(r.info.status == "FINISHED" for r in first)
    assert "final model: " in result.output and "test_accuracy" in result.output
    assert "model of " in result.output and "logged to MLflow" in result.output

    more = CliRunner().invoke(main, SEARCH + ["--max-trials", "50", "--time-limit", "15s"])
    assert more.exit_code == 0, more.output
    assert "resuming the search" in more.output
    second = trial_runs()
    assert len(second) > len(first)
    ids = [r.data.tags["nas.trial_id"] for r in second]
    assert len(ids) == len(set(ids))  # no finished trial trained again


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["random", "evolution"])
def test_a_trial_longer_than_the_time_left_stops_at_the_limit(tmp_path, tuner):
    # No early stopping and more epochs than the limit holds: the first trial (nothing
    # measured yet, so it starts) must stop at the limit, not train all of them.
    pipeline = tmp_path / "long.yaml"
    pipeline.write_text("data: {source: digits}\n"
                        "train: {epochs: 400, early_stopping_patience: null}\n")
    import time

    started = time.monotonic()
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", str(pipeline),
                                       "--tuner", tuner, "--max-trials", "5", "--time-limit",
                                       "5s", "--experiment", "timed"])
    wall = time.monotonic() - started
    assert result.exit_code == 0, result.output
    (trial,) = trial_runs()
    assert trial.info.status == "FINISHED"
    assert 1 <= trial.data.metrics["epochs_trained"] < 400
    assert "final model: " in result.output
    assert wall < 30  # 400 epochs of it take a minute or more


@pytest.mark.slow
def test_max_trials_first_when_it_comes_first_and_a_bad_duration_is_refused(tmp_path):
    result = CliRunner().invoke(main, SEARCH + ["--max-trials", "2", "--time-limit", "1h"])
    assert result.exit_code == 0, result.output
    assert "stopped by --time-limit" not in result.output and len(trial_runs()) == 2

    for bad, message in (("soon", "'soon' is not a duration such as 90s, 30m or 2h"),
                         ("0m", "'0m' must be above 0")):
        refused = CliRunner().invoke(main, ["search", "--time-limit", bad], prog_name="nas")
        assert refused.exit_code == 2
        assert f"Invalid value for '--time-limit': {message}" in refused.output


@pytest.mark.slow
def test_a_time_limit_without_max_trials_trains_as_many_trials_as_fit():
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--epochs", "1",
                                       "--experiment", "timed", "--time-limit", "8s"])
    assert result.exit_code == 0, result.output
    assert "with evolution: as many trials as fit in 8.0s, experiment 'timed'" in result.output
    assert "stopped by --time-limit" in result.output
    assert "trial 0000 (1): val_accuracy" in result.output and "(1/" not in result.output
