"""A search on Ray (`nas search --ray`): real Ray processes, on a local Ray or on a cluster
of several nodes simulated on this machine (`ray.cluster_utils.Cluster`).

The searches run as `nas search` processes (`processes`); what a test asserts is what a
user sees: the exit code, the lines printed, and the runs in MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from processes import NAS, search_runs

TINY = ["--space", "tiny", "--pipeline", "digits"]
DEADLINE = 240  # seconds for one search of a few tiny trials on Ray, on 2 busy cores


@pytest.fixture
def cluster():
    """A Ray cluster on this machine: a head that runs no trial, and two nodes of one CPU,
    the second with a GPU declared (no real one: Ray only counts it)."""
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True,
                   head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        made.add_node(num_cpus=1)
        made.add_node(num_cpus=1, num_gpus=1)
        made.wait_for_nodes()
        yield made
    finally:
        made.shutdown()


def search(processes, name: str, uri: str, *options, experiment: str = "ray"):
    return processes.start(name, NAS + [
        "search", *TINY, "--epochs", "3", "--experiment", experiment, "--tracking-uri", uri,
        "--workdir", str(processes.folder / ".nas"), *options])


def finished(processes, name: str) -> str:
    """The output of the search `name`, which must end with exit code 0."""
    code = processes.wait(name, timeout=DEADLINE)
    assert code == 0, processes.logs()
    return processes.output(name)


def wait_for(processes, name: str, condition, what: str):
    """Call `condition` until it returns something true, and return that; the search
    `name` must run meanwhile."""
    deadline = time.monotonic() + DEADLINE
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} in {DEADLINE} s\n{processes.logs()}"
        assert processes.started[name].poll() is None, processes.logs()
        time.sleep(0.1)
    return found


def training(uri: str, experiment: str, workdir):
    """The run of a trial in the middle of its training: its first epoch is saved in the
    working folder (`nas.tuning` saves every epoch of a trial for a resume) and its run is
    RUNNING with its params written; else None."""
    saved = {p.parent.name.removeprefix("trial_")
             for p in (workdir / experiment).glob("trial_*/resume.json")}
    _, trials = search_runs(uri, experiment)
    return next((r for r in trials if r.info.status == "RUNNING" and r.data.params
                 and r.data.tags["nas.trial_id"] in saved), None)


def assert_each_trial_finished_once(trials: list, count: int) -> dict:
    """Every trial 0..count-1 has exactly one FINISHED run; none is left RUNNING. The
    FINISHED run of each trial, by trial id."""
    done = {}
    for run in trials:
        assert run.info.status != "RUNNING", run.data.tags
        if run.info.status == "FINISHED":
            trial_id = run.data.tags["nas.trial_id"]
            assert trial_id not in done, f"trial {trial_id} FINISHED twice"
            done[trial_id] = run
    assert sorted(done) == [str(n) for n in range(count)]
    return done


def curve(uri: str, run) -> list[tuple[int, float]]:
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_accuracy")
    return sorted((m.step, m.value) for m in history)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_search_on_a_local_ray_trains_each_trial_as_a_ray_task(processes, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    search(processes, "driver", uri, "--ray", "--max-trials", "3", "--max-concurrent", "2")
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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_workers_option_runs_its_trials_at_once_on_a_local_ray(processes, tmp_path):
    """`--workers N` is `--ray --max-concurrent N`: N trials at once on a local Ray."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    search(processes, "driver", uri, "--workers", "2", "--max-trials", "2", "--epochs", "2",
           experiment="workers")
    out = finished(processes, "driver")
    assert "on Ray: 2 trials at once" in out
    assert "2 trials finished, 0 failed" in out
    parents, trials = search_runs(uri, "workers")
    assert [p.info.status for p in parents] == ["FINISHED"]
    done = assert_each_trial_finished_once(trials, 2)
    assert all(r.data.tags["nas.worker"].startswith("ray-") for r in done.values())


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
def test_workers_beside_another_ray_or_concurrency_is_refused_in_one_line(args, message,
                                                                          tmp_path):
    result = CliRunner().invoke(main, ["search", *TINY, *args])
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(message), line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trials_asking_for_a_gpu_run_on_the_node_that_has_one(processes, tmp_path, cluster):
    import ray

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    search(processes, "driver", uri, "--ray", cluster.address, "--gpus-per-trial", "1",
           "--max-trials", "2", "--epochs", "1")
    out = finished(processes, "driver")
    assert "on Ray: 1 trial at once" in out  # one GPU in the cluster
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        gpu_nodes = {n["NodeID"] for n in ray.nodes()
                     if n["Alive"] and n["Resources"].get("GPU")}
    finally:
        ray.shutdown()
    _, trials = search_runs(uri, "ray")
    done = assert_each_trial_finished_once(trials, 2)
    assert {r.data.tags["nas.ray_node"] for r in done.values()} == gpu_nodes
    assert {r.data.tags["nas.gpus"] for r in done.values()} == {"0"}  # what Ray gave it


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_node_s_trial_is_run_again_and_goes_on_from_its_epoch(processes, tmp_path,
                                                                       cluster, mlflow_server):
    uri, experiment = mlflow_server, "node-killed"
    workdir = tmp_path / ".nas"
    search(processes, "driver", uri, "--ray", cluster.address, "--max-trials", "6",
           "--epochs", "4", experiment=experiment)
    victim = wait_for(processes, "driver", lambda: training(uri, experiment, workdir),
                      "trial in the middle of its training")
    trial_id, node_id = victim.data.tags["nas.trial_id"], victim.data.tags["nas.ray_node"]
    # What the lost attempt saved of its epochs (its run may not hold them yet: a trial's
    # metrics reach MLflow in batches).
    saved = json.loads((workdir / experiment / f"trial_{trial_id}" / "resume.json").read_text())
    node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=1)  # the cluster keeps two nodes, as an autoscaler would
    out = finished(processes, "driver")
    assert "6 trials finished, 0 failed" in out
    _, trials = search_runs(uri, experiment)
    done = assert_each_trial_finished_once(trials, 6)
    lost = MlflowClient(uri).get_run(victim.info.run_id)
    assert lost.info.status == "KILLED"
    assert "was lost" in lost.data.tags["nas.error"]
    again = done[trial_id]
    assert again.info.run_id != lost.info.run_id
    assert again.data.tags["nas.ray_node"] != node_id
    # It went on from its last saved epoch: the new run holds the whole curve, and its
    # first epoch is the lost attempt's, not trained again.
    assert [step for step, _ in curve(uri, again)] == list(range(4))
    assert curve(uri, again)[0][1] == pytest.approx(saved["history"]["val_accuracy"][0])
    assert f"trial {trial_id} resumes at epoch" in out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trial_whose_worker_dies_after_its_last_retry_fails_and_the_search_goes_on(
        processes, tmp_path):
    uri, experiment = f"sqlite:///{tmp_path}/mlflow.db", "retries"
    workdir = tmp_path / ".nas"
    search(processes, "driver", uri, "--ray", "--max-retries", "0", "--max-trials", "3",
           "--max-concurrent", "1", "--epochs", "4", experiment=experiment)
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_restarted_driver_resumes_the_search_on_the_cluster(processes, tmp_path, cluster):
    uri, experiment = f"sqlite:///{tmp_path}/mlflow.db", "driver-restart"
    workdir = tmp_path / ".nas"
    options = ("--ray", cluster.address, "--max-trials", "4", "--epochs", "4")
    search(processes, "first", uri, *options, experiment=experiment)
    victim = wait_for(processes, "first", lambda: training(uri, experiment, workdir),
                      "trial in the middle of its training")
    processes.kill("first")  # SIGKILL: no handler runs
    search(processes, "again", uri, *options, experiment=experiment)
    out = finished(processes, "again")
    assert "resuming the search" in out
    parents, trials = search_runs(uri, experiment)
    assert [p.info.status for p in parents] == ["FINISHED"]
    done = assert_each_trial_finished_once(trials, 4)
    trial_id = victim.data.tags["nas.trial_id"]
    assert MlflowClient(uri).get_run(victim.info.run_id).info.status == "KILLED"
    assert [step for step, _ in curve(uri, done[trial_id])] == list(range(4))


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
def test_what_ray_cannot_give_is_refused_before_anything_is_written(args, message, processes,
                                                                    tmp_path):
    processes.start("driver", NAS + ["search", *TINY, *args])
    assert processes.wait("driver", timeout=DEADLINE) == 2, processes.logs()
    out = processes.output("driver")
    assert message in out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()
