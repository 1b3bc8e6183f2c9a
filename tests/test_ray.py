"""A search on a local Ray (`nas search --ray`, `--workers N`): real Ray processes, each
search a `nas search` process (`processes`); what a test asserts is what a user sees: the
exit code, the lines printed, and the runs in MLflow. The cluster's tests:
tests/test_ray_cluster.py."""

from __future__ import annotations

import os
import signal

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from processes import NAS, search_runs
from ray_searches import (DEADLINE, TINY, assert_each_trial_finished_once, curve, finished,
                          search, training, wait_for)

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_search_on_a_local_ray_trains_each_trial_as_a_ray_task(processes, tmp_path):
    """`--workers N` is `--ray --max-concurrent N`: N trials at once on a local Ray."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    search(processes, "driver", uri, "--workers", "2", "--max-trials", "3")
    out = finished(processes, "driver")
    assert "on Ray: 2 trials at once" in out
    assert "3 trials finished, 0 failed" in out
    assert "test_accuracy" in out  # the final model, scored on the held-out data
    parents, trials = search_runs(uri, "ray")
    assert [p.info.status for p in parents] == ["FINISHED"]
    done = assert_each_trial_finished_once(trials, 3)
    for run in done.values():  # trained by Ray workers, each run saying where
        assert run.data.tags["nas.worker"].startswith("ray-")
        assert len(run.data.tags["nas.ray_node"]) > 8
        assert run.data.tags["nas.gpus"] == "-"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert curve(uri, run)  # its epochs logged by the task itself


@pytest.mark.parametrize("args, message", [
    (["--workers", "2", "--max-concurrent", "3"],
     "Error: --workers and --max-concurrent exclude each other: --workers N is --ray "
     "--max-concurrent N"),
    (["--workers", "2", "--ray", "auto"],
     "Error: --workers and --ray auto exclude each other: --workers trains on a local Ray; on "
     "a cluster, give --max-concurrent"),
    (["--workers", "2", "--ray", "10.0.0.5:6379"],
     "Error: --workers and --ray 10.0.0.5:6379 exclude each other: --workers trains on a "
     "local Ray; on a cluster, give --max-concurrent"),
    (["--workers", "0"], "Error: Invalid value for '--workers'"),
    (["--chief", "127.0.0.1:1"], "Error: No such option '--chief'"),
])
@pytest.mark.new_store
def test_workers_beside_another_ray_or_concurrency_is_refused_in_one_line(args, message,
                                                                          tmp_path):
    result = CliRunner().invoke(main, ["search", *TINY, *args])
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(message), line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trial_whose_worker_dies_after_its_last_retry_fails_and_the_search_goes_on(
        processes, tmp_path):
    uri, experiment = f"sqlite:///{tmp_path}/mlflow.db", "retries"
    workdir = tmp_path / ".nas"
    # The store made first: this test reads it while the search runs, and two processes
    # creating one SQLite store's tables race.
    MlflowClient(uri).search_experiments()
    # 12 epochs a trial: it is still training when its worker is killed
    search(processes, "driver", uri, "--ray", "--max-retries", "0", "--max-trials", "3",
           "--max-concurrent", "1", "--epochs", "12", experiment=experiment)
    victim = wait_for(processes, "driver", lambda: training(uri, experiment, workdir),
                      "trial in the middle of its training")
    pid = int(victim.data.tags["nas.worker"].rsplit("-", 1)[1])  # ray-NODE-PID
    os.kill(pid, signal.SIGKILL)
    out = finished(processes, "driver")
    trial_id = victim.data.tags["nas.trial_id"]
    assert f"trial {trial_id} failed: the Ray worker running it was lost" in out
    assert "2 trials finished, 1 failed" in out
    _, trials = search_runs(uri, experiment)
    runs = [r for r in trials if r.data.tags["nas.trial_id"] == trial_id]
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "was lost" in runs[0].data.tags["nas.error"]
    assert sum(r.info.status == "FINISHED" for r in trials) == 2
    assert all(r.info.status != "RUNNING" for r in trials)


def test_a_store_the_cluster_cannot_reach_is_refused():
    from nas.errors import SearchError
    from nas.scaleout import check_store

    nodes = [{"NodeManagerAddress": "10.0.0.5"}, {"NodeManagerAddress": "10.0.0.6"}]
    for uri in ("sqlite:////data/mlflow.db", "file:///data/mlruns", "/data/mlruns"):
        with pytest.raises(SearchError, match=r"tracking_uri`?: .* is a file on this machine, "
                                              r"which the Ray nodes at 10.0.0.6 cannot reach"):
            check_store(uri, nodes, "10.0.0.5")
    check_store("http://10.0.0.5:5000", nodes, "10.0.0.5")  # a server: every node reaches it
    check_store("sqlite:////data/mlflow.db", nodes[:1], "10.0.0.5")  # one machine only


@pytest.mark.parametrize("args, message", [
    (["--cpus-per-trial", "2"], "Error: --cpus-per-trial is for a search on Ray: give --ray "
                                "too"),
    (["--ray", "--cpus-per-trial", "0"], "Error: Invalid value for '--cpus-per-trial': 0.0 "
                                         "is not in the range x>0."),
    (["--ray", "--gpus-per-trial", "-1"], "Error: Invalid value for '--gpus-per-trial'"),
    (["--ray", "--max-concurrent", "0"], "Error: Invalid value for '--max-concurrent'"),
    (["--ray", "--max-retries", "-1"], "Error: Invalid value for '--max-retries'"),
])
@pytest.mark.new_store
def test_bad_ray_flags_are_refused_in_one_line(args, message, tmp_path):
    result = CliRunner().invoke(main, ["search", *TINY, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--ray", "--gpus-per-trial", "1"],
     "Error: --gpus-per-trial: 1 GPUs per trial, but no node of the Ray cluster has that "
     "many (at most 0)"),
    (["--ray", "--cpus-per-trial", "512"],
     "Error: --cpus-per-trial: 512 CPUs per trial, but no node of the Ray cluster has that "
     "many"),
    (["--ray", "127.0.0.1:9"], "Error: --ray: no Ray cluster answers at '127.0.0.1:9'"),
])
@pytest.mark.new_store
def test_what_ray_cannot_give_is_refused_before_anything_is_written(args, message, processes,
                                                                    tmp_path):
    processes.start("driver", NAS + ["search", *TINY, *args])
    assert processes.wait("driver", timeout=DEADLINE) == 2, processes.logs()
    out = processes.output("driver")
    assert message in out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()
