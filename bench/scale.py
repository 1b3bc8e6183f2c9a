"""The `scale` figure (issue 24): what a search on Ray costs its driver and its tracking
store per trial, measured with 2-8 concurrent short trials on a local Ray, and what that
means for 100 GPUs running 10-minute trials.

    python bench/run.py --only scale

Each row is one `nas search --ray --max-concurrent C` of short trials (the tiny space on
the digits, one epoch each, `2/C` CPUs per trial so that C fit on 2 cores), against an
`mlflow server` started for the figure: the store every node of a cluster would log to.

- The driver's own seconds per trial are what the driver logs on the search's run
  (`driver_seconds_per_trial`, `nas.scaleout.drive`): everything it does but wait for the
  tasks: proposing (the oracle and its guard), dispatching, passing on the tasks' events,
  ending each trial and saving the search's state.
- The store's requests per trial are the server's own access log (one line a request),
  counted over the search and divided by its trials: the trials' own writes (run, params,
  tags, a batch of metrics an epoch, artifacts, the close) and the driver's.

The extrapolation: 100 concurrent trials of 10 minutes end at 100 / 600 s = 1/6 trial a
second; the driver is busy `seconds per trial / 6 s` of its time (the target: <= 1% of a
10-minute trial, i.e. <= 6 s a trial), and the store serves `requests per trial / 6 s`,
plus one batch of metrics per epoch of each running trial.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENT = (2, 4, 8)
TRIALS_PER_SLOT = 3  # trials per concurrent slot: a search of 3C trials
TARGET_SHARE = 0.01  # of a 10-minute trial: the driver's cost per trial
GPUS, TRIAL_SECONDS = 100, 600.0


def figure_scale(table, root: Path, nas: str, env: dict, log, quick: bool = False) -> None:
    startup(table, root, nas, env, log, repeats=1 if quick else 2)
    concurrent = CONCURRENT[:1] if quick else CONCURRENT
    folder = Path(tempfile.mkdtemp(prefix="scale-", dir=root))
    with _mlflow_server(folder, env) as (url, access_log):
        rows = []
        for count in concurrent:
            trials = TRIALS_PER_SLOT * count
            before = _requests(access_log)
            log(f"scale: {trials} trials, {count} at once, on a local Ray")
            start = time.perf_counter()
            done = subprocess.run(
                [nas, "search", "--space", "tiny", "--pipeline", "digits", "--epochs", "1",
                 "--max-trials", str(trials), "--ray", "--max-concurrent", str(count),
                 "--cpus-per-trial", f"{2 / count:g}", "--tracking-uri", url,
                 "--experiment", f"scale-{count}", "--workdir", str(folder / f"w{count}")],
                cwd=folder, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"scale: the search failed:\n{done.stdout}\n{done.stderr}")
            requests = _requests(access_log) - before
            per_trial = _driver_seconds(url, f"scale-{count}")
            rows.append((count, trials, per_trial, requests / trials, wall))
            log(f"  driver {per_trial * 1000:.0f} ms a trial, {requests / trials:.0f} "
                f"requests a trial, wall {wall:.0f} s")
    worst = max(row[2] for row in rows)
    rate = GPUS / TRIAL_SECONDS  # trials ending a second at 100 concurrent 10-minute trials
    for count, trials, per_trial, requests, wall in rows:
        table.add(f"scale: driver s per trial, {count} at once", f"{per_trial:.3f}",
                  "-", "-", "(measured)", None)
        table.add(f"scale: store requests per trial, {count} at once", f"{requests:.0f}",
                  "-", "-", "(measured)", None)
        table.notes.append(f"scale ({count} at once): {trials} trials of one epoch in "
                           f"{wall:.0f} s; driver {per_trial:.3f} s and {requests:.0f} store "
                           f"requests per trial")
    share = worst / TRIAL_SECONDS  # the driver's cost of a trial, of that trial's 10 minutes
    table.add("scale: driver cost per trial / a 10-minute trial", f"{share:.5f}", "-", "-",
              f"<= {TARGET_SHARE}", share <= TARGET_SHARE)
    requests = max(row[3] for row in rows)
    table.notes.append(
        f"scale, extrapolated to {GPUS} GPUs running {TRIAL_SECONDS / 60:.0f}-minute trials: "
        f"{rate:.3f} trials end a second; the driver is busy {worst * rate:.2%} of its time "
        f"(worst measured {worst:.3f} s a trial); the store serves {requests * rate:.1f} "
        f"requests a second from trials ending or starting, plus one metrics batch per "
        f"epoch of each of the {GPUS} running trials")


def startup(table, root: Path, nas: str, env: dict, log, repeats: int = 2) -> None:
    """A one-trial search with `--ray` (a local Ray started and stopped for it) against the
    same search without, alternating, the best of `repeats` each."""
    folder = Path(tempfile.mkdtemp(prefix="scale-startup-", dir=root))
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for attempt in range(repeats):
        for kind in (("local", "ray") if attempt % 2 == 0 else ("ray", "local")):
            log(f"scale: start-up, a one-trial search ({kind})")
            start = time.perf_counter()
            subprocess.run(
                [nas, "search", "--space", "tiny", "--pipeline", "digits", "--epochs", "1",
                 "--max-trials", "1", "--experiment", f"{kind}-{attempt}", "--tracking-uri",
                 f"sqlite:///{folder}/mlflow.db", "--workdir", str(folder / "work"),
                 *(["--ray"] if kind == "ray" else [])],
                cwd=folder, env=env, check=True, capture_output=True)
            times[kind].append(time.perf_counter() - start)
    local, ray = min(times["local"]), min(times["ray"])
    table.add("scale: a one-trial search, --ray over local (s)", f"{ray - local:.1f}",
              f"{local:.1f}", f"{ray / local:.2f}", "<= 10 s", ray - local <= 10)
    table.notes.append(f"scale: start-up, best of {repeats} alternating runs: a one-trial "
                       f"search (tiny space, digits, one epoch) takes {local:.1f} s, with "
                       f"--ray {ray:.1f} s (every run: local {times['local']}, ray "
                       f"{times['ray']})")


def _driver_seconds(url: str, experiment: str) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'search'")
    return runs[0].data.metrics["driver_seconds_per_trial"]


def _requests(access_log: Path) -> int:
    """Requests the MLflow server has answered so far (its access log: one line each)."""
    text = access_log.read_text(errors="replace") if access_log.exists() else ""
    return len(re.findall(r'"(?:GET|POST|PUT|PATCH|DELETE) /', text))


@contextlib.contextmanager
def _mlflow_server(folder: Path, env: dict):
    import socket

    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    access_log = folder / "mlflow-server.log"
    with open(access_log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"scale: mlflow server did not start:\n"
                                   f"{access_log.read_text()}")
            time.sleep(0.5)
        yield url, access_log
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
