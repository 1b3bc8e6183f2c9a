"""Scale-out on loopback: a chief and workers of `nas` over gRPC, one MLflow server.

Every process a test starts is in its own process group and is stopped (SIGTERM, then
SIGKILL) in a `finally`, whatever happens (`processes`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from processes import DEADLINE, NAS, free_port, search_runs

TINY = ["--space", "tiny", "--pipeline", "digits"]
# A test that starts processes has a time limit (600 s) above the sum of its own waits,
# so that those fail first, with the processes' logs.


def start_search(processes, uri, experiment, chief, *options):
    return processes.start("chief", NAS + [
        "search", *TINY, "--max-trials", "4", "--epochs", "2", "--experiment", experiment,
        "--tracking-uri", uri, "--workdir", str(processes.folder / "chief"),
        "--chief", chief, *options])


def token_of(processes, timeout: float = DEADLINE) -> str:
    """The worker token the chief printed in its worker command."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"nas worker .* --token (\S+)", processes.output("chief"))
        if found:
            return found.group(1)
        assert processes.started["chief"].poll() is None, processes.logs()
        time.sleep(0.2)
    pytest.fail(f"the chief printed no worker command:\n{processes.logs()}")


def start_worker(processes, uri, experiment, chief, worker_id, token=None, extra=()):
    # Each worker in its own folder: it shares no file with the chief, only MLflow.
    folder = processes.folder / worker_id
    folder.mkdir()
    return processes.start(worker_id, NAS + [
        "worker", *TINY, "--experiment", experiment, "--tracking-uri", uri,
        "--workdir", str(folder / ".nas"), "--chief", chief, "--worker-id", worker_id,
        "--token", token or token_of(processes), *extra], cwd=folder)


def training_trial(uri: str, experiment: str, folders: dict):
    """The run of a trial one of the workers is training, mid-trial, or None.

    `folders` maps each worker watched to its working folder. Mid-trial is two events: the
    trial saved its first finished epoch in that folder (`nas.tuning` always saves a
    trial's first epoch, for a resume), and its MLflow run is written (RUNNING, with its
    params, tagged with the worker).
    """
    saved = {(worker, path.parent.name.removeprefix("trial_"))
             for worker, folder in folders.items()
             for path in (folder / experiment).glob("trial_*/resume.json")}
    if not saved:
        return None
    _, trials = search_runs(uri, experiment)
    return next((r for r in trials if r.info.status == "RUNNING" and r.data.params
                 and (r.data.tags.get("nas.worker"), r.data.tags["nas.trial_id"]) in saved),
                None)


def wait_until(processes, condition, what: str):
    """Call `condition` until it returns something true, and return that; the chief must
    run meanwhile."""
    deadline = time.monotonic() + DEADLINE
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} in {DEADLINE} s\n{processes.logs()}"
        assert processes.started["chief"].poll() is None, processes.logs()
        time.sleep(0.05)
    return found


def own_folders(processes, *workers) -> dict:
    """The working folder of each worker `start_worker` started in a folder of its own."""
    return {worker: processes.folder / worker / ".nas" for worker in workers}


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files (MLflow's `cryptography`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "chief.pem", folder / "chief.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_chief_and_two_workers_run_one_search(processes, mlflow_server):
    chief = f"127.0.0.1:{free_port()}"
    cert, key = self_signed(processes.folder)  # over TLS (the other tests: plain gRPC)
    # (A worker held below stays silent: not for long enough to be taken for lost.)
    start_search(processes, mlflow_server, "two-workers", chief, "--tls-cert", cert,
                 "--tls-key", key, "--worker-timeout", str(DEADLINE))
    tls = ["--tls-ca", cert]
    start_worker(processes, mlflow_server, "two-workers", chief, "w1", extra=tls)
    start_worker(processes, mlflow_server, "two-workers", chief, "w2", extra=tls)
    # One that does not have the search's token is refused; the search goes on.
    start_worker(processes, mlflow_server, "two-workers", chief, "intruder", token="guessed",
                 extra=tls)
    # Each worker trains a trial whatever their speeds: the first seen training one is held
    # (SIGSTOP) until the other trains one too.
    folders = own_folders(processes, "w1", "w2")
    held = wait_until(processes, lambda: training_trial(mlflow_server, "two-workers", folders),
                      "worker training").data.tags["nas.worker"]
    os.killpg(processes.started[held].pid, signal.SIGSTOP)
    try:
        (other,) = set(folders) - {held}

        def other_trains():
            _, trials = search_runs(mlflow_server, "two-workers")
            return (any(r.data.tags.get("nas.worker") == other and r.info.status == "FINISHED"
                        for r in trials)
                    or training_trial(mlflow_server, "two-workers", {other: folders[other]}))

        wait_until(processes, other_trains, f"trial trained by {other}")
    finally:
        os.killpg(processes.started[held].pid, signal.SIGCONT)
    assert processes.wait("intruder", 60) == 2, processes.logs()
    refusal = processes.output("intruder")
    assert (f"Error: --token: the chief at {chief} refused this worker's token; give the "
            f"token the chief printed (--token or NAS_WORKER_TOKEN)") in refusal
    assert "Traceback" not in refusal

    assert processes.wait("chief") == 0, processes.logs()
    assert processes.wait("w1", 60) == 0, processes.logs()
    assert processes.wait("w2", 60) == 0, processes.logs()

    out = processes.output("chief")
    assert (f"nas worker --chief {chief} --space tiny --pipeline digits "
            f"--experiment two-workers --tracking-uri {mlflow_server} --tls-ca CERT.pem "
            f"--token {token_of(processes)}") in out
    assert "4 trials finished, 0 failed" in out
    parents, trials = search_runs(mlflow_server, "two-workers")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["nas.chief"] == chief
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["nas.trial_id"] for r in finished) == ["0", "1", "2", "3"]
    assert len(trials) == 4
    assert {r.data.tags["nas.worker"] for r in finished} == {"w1", "w2"}
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["nas.search_run_id"] == parent.info.run_id
        assert run.data.metrics["epochs_trained"] == 2  # the chief's --epochs
    assert "[w1] the search has ended; this worker trained" in processes.output("w1")
    for name in ("chief", "w1", "w2"):  # MLflow's own links, on an http store
        assert "View run" not in processes.output(name), processes.output(name)


@pytest.mark.slow
def test_no_mlflow_run_links_in_the_output_on_an_http_store(mlflow_server, monkeypatch,
                                                           capsys):
    from nas.tracking import Tracker

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    result = CliRunner().invoke(main, [
        "search", *TINY, "--max-trials", "1", "--epochs", "1", "--ensemble", "1",
        "--experiment", "http-output", "--tracking-uri", mlflow_server])
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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_worker_loses_only_its_trial(processes, mlflow_server):
    chief = f"127.0.0.1:{free_port()}"
    # Trials of 8 epochs: once a worker is seen training one, most of it is still ahead.
    start_search(processes, mlflow_server, "killed-worker", chief, "--worker-timeout", "8",
                 "--epochs", "8")
    start_worker(processes, mlflow_server, "killed-worker", chief, "w1")
    start_worker(processes, mlflow_server, "killed-worker", chief, "w2")
    # The first worker seen training a trial is killed there, whichever it is.
    folders = own_folders(processes, "w1", "w2")
    victim = wait_until(processes, lambda: training_trial(mlflow_server, "killed-worker",
                                                          folders), "worker training")
    lost = victim.data.tags["nas.worker"]
    (survivor,) = {"w1", "w2"} - {lost}
    processes.kill(lost)  # mid-trial

    assert processes.wait("chief") == 0, processes.logs()
    assert processes.wait(survivor, 60) == 0, processes.logs()
    trial_id = victim.data.tags["nas.trial_id"]
    assert f"worker {lost} lost (silent for" in processes.output("chief")
    assert "4 trials finished, 0 failed" in processes.output("chief")

    parents, trials = search_runs(mlflow_server, "killed-worker")
    assert [p.info.status for p in parents] == ["FINISHED"]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["nas.trial_id"] for r in finished) == ["0", "1", "2", "3"]
    first = MlflowClient(mlflow_server).get_run(victim.info.run_id)
    assert first.info.status in ("FAILED", "KILLED")
    assert f"worker {lost} was lost" in first.data.tags["nas.error"]
    (retried,) = [r for r in finished if r.data.tags["nas.trial_id"] == trial_id]
    assert retried.data.tags["nas.worker"] == survivor
    # The survivor has a working folder of its own: the trial starts over, and it says why.
    assert (f"[{survivor}] trial {trial_id} starts again at epoch 1: worker {lost} trained it "
            f"before and was lost") in processes.output(survivor)
    assert not [r for r in trials if r.info.status == "RUNNING"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_workers_trial_goes_on_from_its_last_epoch_where_the_folder_is_shared(
        processes, mlflow_server):
    chief = f"127.0.0.1:{free_port()}"
    start_search(processes, mlflow_server, "shared-folder", chief, "--worker-timeout", "8",
                 "--max-trials", "2", "--epochs", "8")
    shared = ("--workdir", str(processes.folder / "shared" / ".nas"))
    start_worker(processes, mlflow_server, "shared-folder", chief, "w1", extra=shared)
    project = processes.folder / "shared" / ".nas" / "shared-folder"
    run = wait_until(processes, lambda: training_trial(mlflow_server, "shared-folder",
                                                       {"w1": project.parent}), "w1 training")
    processes.kill("w1")  # mid-trial, with an epoch saved in the folder the workers share
    trial_id = run.data.tags["nas.trial_id"]
    victim = json.loads((project / f"trial_{trial_id}" / "resume.json").read_text())
    start_worker(processes, mlflow_server, "shared-folder", chief, "w2", extra=shared)

    assert processes.wait("chief") == 0, processes.logs()
    assert processes.wait("w2", 60) == 0, processes.logs()
    out = processes.output("w2")
    assert f"[w2] trial {trial_id} resumes at epoch " in out, processes.logs()
    assert "starts again at epoch 1" not in out
    parents, trials = search_runs(mlflow_server, "shared-folder")
    assert [p.info.status for p in parents] == ["FINISHED"]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["nas.trial_id"] for r in finished) == ["0", "1"]
    (lost,) = [r for r in trials if r.info.status != "FINISHED"]
    assert "worker w1 was lost" in lost.data.tags["nas.error"]
    (retried,) = [r for r in finished if r.data.tags["nas.trial_id"] == trial_id]
    assert retried.data.tags["nas.worker"] == "w2"
    curve = MlflowClient(mlflow_server).get_metric_history(retried.info.run_id, "val_accuracy")
    # The whole curve, each epoch once: w1's epochs from the saved state, then w2's.
    assert sorted(m.step for m in curve) == list(range(len(curve)))
    assert curve[0].value == pytest.approx(victim["history"]["val_accuracy"][0])
    assert not [r for r in trials if r.info.status == "RUNNING"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_workers_option_starts_chief_and_local_workers(processes, tmp_path):
    uri = f"sqlite:///{tmp_path}/local.db"
    processes.start("search", NAS + [
        "search", *TINY, "--max-trials", "2", "--epochs", "2", "--experiment", "local",
        "--tracking-uri", uri, "--workdir", str(tmp_path / ".nas"), "--workers", "2"])
    assert processes.wait("search") == 0, processes.logs()
    out = processes.output("search")
    assert "2 trials finished, 0 failed" in out
    assert "[local-1] the search has ended" in out
    assert "[local-2] the search has ended" in out
    parents, trials = search_runs(uri, "local")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(r.data.tags["nas.trial_id"] for r in trials
                  if r.info.status == "FINISHED") == ["0", "1"]
    assert {r.data.tags["nas.worker"] for r in trials} <= {"local-1", "local-2"}


@pytest.mark.slow
def test_mirrored_distribution_trains_on_the_cpu(tmp_path, monkeypatch):
    from nas import assembly

    made = []
    original = assembly.strategy
    monkeypatch.setattr(assembly, "strategy",
                        lambda name: made.append(original(name)) or made[-1])
    uri = f"sqlite:///{tmp_path}/mirrored.db"
    result = CliRunner().invoke(main, [
        "search", *TINY, "--max-trials", "1", "--epochs", "1", "--experiment", "mirrored",
        "--tracking-uri", uri, "--distribution", "mirrored"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 trial finished, 0 failed" in result.output
    (strategy,) = made
    assert type(strategy).__name__ == "MirroredStrategy"
    assert strategy.num_replicas_in_sync >= 1


@pytest.mark.parametrize("args, message", [
    (["worker", "--chief", "nowhere"],
     "Error: --chief: 'nowhere' is not HOST:PORT (for example 127.0.0.1:8000)"),
    (["worker", "--chief", "127.0.0.1:1", "--worker-id", "chief-2"],
     "Error: --worker-id: 'chief-2' must be non-empty and must not contain 'chief'"),
    (["search", "--workers", "2", "--chief", "127.0.0.1:1"],
     "Error: --workers and --chief exclude each other"),
])
def test_scale_out_input_errors(args, message):
    result = CliRunner().invoke(main, args + TINY)
    assert result.exit_code == 2
    assert message in result.output


def test_a_worker_refuses_another_space(tmp_path, monkeypatch):
    from nas import distributed, search
    from nas.data import load_arrays
    from nas.events import Callback
    from nas.specs import load_pipeline, load_space
    from nas.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/refuse.db"
    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id("refuse")
    chief_config = search.SearchConfig(space=load_space("tiny"), pipeline=load_pipeline("digits"))
    run_id = tracker.start_run(experiment_id, "search", tags={
        "nas.kind": "search", distributed.TAG_CHIEF: "127.0.0.1:9",
        distributed.TAG_SETTINGS: json.dumps(chief_config.worker_settings(
            load_arrays(chief_config.pipeline)))})
    config = search.SearchConfig(space=load_space("lenet"), pipeline=load_pipeline("digits"),
                                 experiment="refuse", tracking_uri=uri, chief="127.0.0.1:9",
                                 worker_id="w")
    with pytest.raises(search.SearchError, match=r"space: 'lenet' is not the space of the "
                       rf"chief's search \('tiny', run {run_id}\)"):
        distributed.run_worker(distributed.prepare_worker(config), Callback(),
                               wait=0)
