"""A search's state: found again in MLflow when its folder is gone, and grown by a larger budget.

(One owner and a damaged state after a kill -9: test_reliability.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from nas.state import SearchLock, StateError
from test_reliability import SEARCH, runs_of, start_search, wait_until_training


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def assert_whole(trial_ids: list[str]) -> None:
    """Exactly these trials FINISHED, each once; one parent run, FINISHED; none RUNNING."""
    trials = runs_of()
    finished = sorted(r.data.tags["nas.trial_id"] for r in trials if r.info.status == "FINISHED")
    assert finished == sorted(trial_ids)
    assert not [r for r in trials if r.info.status == "RUNNING"]
    (parent,) = runs_of(kind="search")
    assert parent.info.status == "FINISHED"


# Trial 1 is killed after its first epoch: the epochs after it leave seconds to do so.
EPOCHS = ["--epochs", "8"]


@pytest.mark.slow
@pytest.mark.timeout(600)  # above its own waits (test_reliability.py)
def test_sigkill_then_the_working_folder_deleted_goes_on_from_mlflow(tmp_path):
    project = tmp_path / ".nas" / "rel"
    process = start_search(tmp_path, *EPOCHS)
    try:  # killed as trial 1 trains: trial 0 has ended
        wait_until_training("1", process, project)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    (first,) = [r for r in runs_of() if r.info.status == "FINISHED"]
    # Its weights are in MLflow: the checkpoint of its best epoch, as the disk holds it.
    logged = MlflowClient().download_artifacts(first.info.run_id, "checkpoint.weights.h5",
                                               str(tmp_path))
    assert (Path(logged).read_bytes()
            == (project / "trial_0" / "checkpoint.weights.h5").read_bytes())
    shutil.rmtree(tmp_path / ".nas")  # a new machine, a wiped disk

    result = invoke(SEARCH + ["--max-trials", "3", "--seed", "2", "--pipeline", "long.yaml",
                              *EPOCHS])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    (parent,) = runs_of(kind="search")
    assert (f"found this search in the tracking store (run {parent.info.run_id}); going on "
            f"from there") in result.output
    assert "rebuilt 1 ended trial from the tracking store" in result.output
    assert_whole(["0", "1", "2"])
    assert [r.info.run_id for r in runs_of() if r.data.tags["nas.trial_id"] == "0"] == \
        [first.info.run_id]  # the finished trial was not trained again
    # The final model is made from the weights in MLflow where the folder lost them.
    search = MlflowClient().get_run(parent.info.run_id)
    assert "test_accuracy" in search.data.metrics
    assert "nas.model_error" not in search.data.tags
    # And a trial exports from its weights in MLflow, with no checkpoint on this disk.
    exported = invoke(["export", "--experiment", "rel", "--trial", "0", "--out",
                       str(tmp_path / "trial0")])
    assert exported.exit_code == 0, exported.output
    assert (f"weights:     the weights logged to its MLflow run "
            f"runs:/{first.info.run_id}/checkpoint.weights.h5") in exported.output
    assert (tmp_path / "trial0" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_a_finished_search_grows_with_a_larger_budget(tmp_path):
    args = SEARCH + ["--seed", "3", "--epochs", "1", "--ensemble", "2"]
    assert invoke(args + ["--max-trials", "3"]).exit_code == 0
    before = {r.info.run_id: (r.data.tags["nas.trial_id"], r.info.status, r.info.end_time,
                              r.data.metrics) for r in runs_of()}
    (parent,) = runs_of(kind="search")

    same = invoke(args + ["--max-trials", "3"])
    assert "the search had already finished" in same.output
    smaller = invoke(args + ["--max-trials", "2"])
    assert smaller.exit_code == 0 and "the search had already finished" in smaller.output

    grown = invoke(args + ["--max-trials", "5"])
    assert grown.exit_code == 0, grown.output
    assert "growing the search from 3 to 5 trials" in grown.output
    assert "trial 3 (4/5)" in grown.output and "trial 4 (5/5)" in grown.output
    assert "final model: " in grown.output and "test_accuracy" in grown.output
    assert_whole(["0", "1", "2", "3", "4"])
    after = {r.info.run_id: (r.data.tags["nas.trial_id"], r.info.status, r.info.end_time,
                             r.data.metrics) for r in runs_of()}
    assert {k: after[k] for k in before} == before  # the first three runs unchanged
    search = MlflowClient().get_run(parent.info.run_id)
    assert search.data.tags["nas.max_trials"] == "5"
    assert search.data.metrics["finished_trials"] == 5
    shown = invoke(["trials", "--experiment", "rel"])
    assert "(FINISHED): 5 of 5 trials" in shown.output, shown.output

    other = CliRunner().invoke(main, args + ["--max-trials", "6", "--epochs", "2"])
    assert other.exit_code == 2 and "already holds a search with other settings" in \
        other.output


# Takes the lock of the search 'rel' in the folder argv[1] (as `nas search` would), says
# so, and holds it until killed.
HOLD_THE_LOCK = ("import sys, time\n"
                 "from nas.state import SearchLock\n"
                 "lock = SearchLock(sys.argv[1], 'rel')\n"
                 "lock.acquire()\n"
                 "print('held', flush=True)\n"
                 "time.sleep(600)\n")


def test_the_lock_is_one_process_s_and_dies_with_it(tmp_path):
    from nas import search
    from nas.specs import load_pipeline, load_space

    project = tmp_path / ".nas" / "rel"  # the folder of the search SEARCH runs
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(project)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "held\n"  # it holds the lock now (or it died)
        refused = CliRunner().invoke(main, SEARCH + ["--max-trials", "1"])
        assert refused.exit_code == 2, refused.output
        assert refused.output.startswith(
            f"Error: --experiment: the search 'rel' is running in process {holder.pid} on "
            f"{socket.gethostname()} since "), refused.output
        with pytest.raises(StateError, match=f"process {holder.pid} on "):
            SearchLock(project, "rel").acquire()
        os.killpg(holder.pid, signal.SIGKILL)  # kill -9: it never lets the lock go
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
    assert f'"pid": {holder.pid}' in (tmp_path / ".nas" / "rel.lock").read_text()

    # The next search takes the lock the dead process left (the kernel's lock died with it).
    prepared = search.prepare(search.SearchConfig(
        space=load_space("tiny"), pipeline=load_pipeline("digits"), experiment="rel",
        workdir=str(tmp_path / ".nas")))
    prepared.lock.acquire()
    try:
        assert f'"pid": {os.getpid()}' in (tmp_path / ".nas" / "rel.lock").read_text()
        with pytest.raises(StateError, match=f"process {os.getpid()} on "):
            SearchLock(project, "rel").acquire()  # and holds it: one owner at a time
    finally:
        prepared.lock.release()
    again = SearchLock(project, "rel")
    again.acquire()  # free once released
    again.release()


def own_lines(output: str) -> list[str]:
    """What nas printed (the test process's MLflow creates its store with INFO lines)."""
    return [line for line in output.strip().splitlines() if "mlflow.store.db" not in line]


@pytest.mark.slow
def test_what_cannot_be_resumed_is_refused_in_one_line_and_writes_nothing(tmp_path):
    # KerasTuner files that neither nas_search.json nor the tracking store accounts for.
    project = tmp_path / ".nas" / "rel"
    project.mkdir(parents=True)
    (project / "oracle.json").write_text("{}")
    unknown = CliRunner().invoke(main, SEARCH + ["--max-trials", "1"])
    assert unknown.exit_code == 2, unknown.output
    assert own_lines(unknown.output) == [
        f"Error: --workdir: {project} holds the KerasTuner state of a search that neither "
        f"it nor the tracking store knows; pass --overwrite to start afresh"]
    assert runs_of(kind="search") == [] and sorted(os.listdir(project)) == ["oracle.json"]
    shutil.rmtree(tmp_path / ".nas")

    # A Hyperband search whose folder is gone: its brackets are not in MLflow.
    args = SEARCH + ["--tuner", "hyperband", "--max-trials", "2", "--epochs", "2"]
    assert invoke(args).exit_code == 0
    before = [(r.info.run_id, r.info.status, r.info.end_time) for r in runs_of(kind="search")]
    shutil.rmtree(tmp_path / ".nas")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert own_lines(refused.output) == [
        f"Error: --workdir: the hyperband state of 'rel' in {project} is missing or damaged "
        f"and cannot be rebuilt (its brackets are not in MLflow, its trials are); pass "
        f"--overwrite to start afresh"]
    assert [(r.info.run_id, r.info.status, r.info.end_time)
            for r in runs_of(kind="search")] == before
    assert not (project / "nas_search.json").exists()
