"""A search on a Ray cluster of several nodes simulated on this machine
(`ray.cluster_utils.Cluster`): a node killed in the middle of a trial; a driver killed and
started again, its trials placed on the node with the GPU they ask for."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from processes import search_runs
from ray_searches import (assert_each_trial_finished_once, curve, finished, search, training,
                          wait_for)


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster on this machine, shared by this file's tests (it takes 15-40 s to
    start): a head that runs no trial, and two nodes of one CPU, the second with a GPU
    declared (no real one: Ray only counts it). A test that removes a node adds one of the
    same kind (`replace`), as an autoscaler would."""
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True,
                   head_node_args={"num_cpus": 0, "include_dashboard": False})
    gpus = {}  # node id -> the GPUs it declares

    def add(num_gpus=0):
        gpus[made.add_node(num_cpus=1, num_gpus=num_gpus).node_id] = num_gpus

    def replace(node):
        made.remove_node(node, allow_graceful=False)
        add(gpus.pop(node.node_id))

    try:
        add()
        add(num_gpus=1)
        made.wait_for_nodes()
        made.replace = replace
        yield made
    finally:
        made.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.new_store
def test_a_store_on_this_machine_is_refused_when_a_node_is_on_another(processes, tmp_path):
    """A node at another address (127.0.0.2: another machine, as far as Ray can tell) could
    not log to a SQLite file here: refused in one line, before anything is written."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
        cluster.wait_for_nodes()
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        search(processes, "driver", uri, "--ray", cluster.address, experiment="elsewhere")
        code = processes.wait("driver", timeout=120)
        out = processes.output("driver")
    finally:
        cluster.shutdown()
    assert code == 2, processes.logs()
    assert (f"Error: --tracking-uri: {uri} is a file on this machine, which the Ray nodes at "
            f"127.0.0.2 cannot reach; give a tracking server every node reaches") in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_node_s_trial_is_run_again_and_goes_on_from_its_epoch(processes, tmp_path,
                                                                       cluster, mlflow_server):
    uri, experiment = mlflow_server, "node-killed"
    workdir = tmp_path / ".nas"
    # 8 epochs a trial: the node is removed while the trial is still training (with 4, a
    # trial could end its last epoch between the check and the removal, and its retry
    # rightly start over)
    search(processes, "driver", uri, "--ray", cluster.address, "--max-trials", "6",
           "--epochs", "8", experiment=experiment)
    victim = wait_for(processes, "driver", lambda: training(uri, experiment, workdir),
                      "trial in the middle of its training")
    trial_id, node_id = victim.data.tags["nas.trial_id"], victim.data.tags["nas.ray_node"]
    # What the lost attempt saved of its epochs (its run may not hold them yet: a trial's
    # metrics reach MLflow in batches).
    saved = json.loads((workdir / experiment / f"trial_{trial_id}" / "resume.json").read_text())
    cluster.replace(next(n for n in cluster.list_all_nodes() if n.node_id == node_id))
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
    steps = [step for step, _ in curve(uri, again)]  # (early stopping may end it before 8)
    assert steps == list(range(len(steps))) and len(steps) > saved["epoch"] + 1
    assert curve(uri, again)[0][1] == pytest.approx(saved["history"]["val_accuracy"][0])
    assert f"trial {trial_id} resumes at epoch" in out, out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_restarted_driver_resumes_the_search_on_the_cluster_its_trials_on_the_gpu_node(
        processes, tmp_path, cluster):
    import ray

    uri, experiment = f"sqlite:///{tmp_path}/mlflow.db", "driver-restart"
    workdir = tmp_path / ".nas"
    # 3 trials of 3 epochs, each asking for the cluster's one GPU
    options = ("--ray", cluster.address, "--max-trials", "3", "--gpus-per-trial", "1")
    # The store made first: this test reads it while the search runs, and two processes
    # creating one SQLite store's tables race.
    MlflowClient(uri).search_experiments()
    search(processes, "first", uri, *options, experiment=experiment)
    victim = wait_for(processes, "first", lambda: training(uri, experiment, workdir),
                      "trial in the middle of its training")
    processes.kill("first")  # SIGKILL: no handler runs
    search(processes, "again", uri, *options, experiment=experiment)
    out = finished(processes, "again")
    assert "resuming the search" in out
    assert "on Ray: 1 trial at once" in out  # one GPU in the cluster
    parents, trials = search_runs(uri, experiment)
    assert [p.info.status for p in parents] == ["FINISHED"]
    done = assert_each_trial_finished_once(trials, 3)
    trial_id = victim.data.tags["nas.trial_id"]
    assert MlflowClient(uri).get_run(victim.info.run_id).info.status == "KILLED"
    assert [step for step, _ in curve(uri, done[trial_id])] == list(range(3))
    # Every trial ran where the GPU is, and saw the GPU Ray gave it.
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        gpu_nodes = {n["NodeID"] for n in ray.nodes()
                     if n["Alive"] and n["Resources"].get("GPU")}
    finally:
        ray.shutdown()
    assert {r.data.tags["nas.ray_node"] for r in trials} == gpu_nodes
    assert {r.data.tags["nas.gpus"] for r in trials} == {"0"}
