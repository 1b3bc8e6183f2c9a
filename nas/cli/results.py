"""`nas trials`, `nas best`, `nas report`, `nas ui`: searches read back from MLflow."""

from __future__ import annotations

import os
import sys

import click

from nas.cli.common import (LATEST_EXPERIMENT, TRACKING_URI, UserError, cell, count,
                            describe_final, seconds, test_line, user_errors)
from nas.results import STATUSES  # standard library alone: `nas --help` stays light
from nas.settings import UNCAPPED_TRIALS


@click.command()
@LATEST_EXPERIMENT
@click.option("--sort", default="objective", show_default=True, metavar="METRIC",
              help="objective (best first), trial, params, flops, latency, fit_time, "
                   "epochs, or any metric of the trial runs (e.g. val_loss).")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show the first N rows only.")
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False), default=None,
              help="Only trials whose MLflow run ended so.")
@click.option("--pareto", is_flag=True,
              help="Only the trials on the Pareto front of the objective vs parameters, "
                   "FLOPs or (searched with --latency) latency, marked.")
@TRACKING_URI
@user_errors
def trials(experiment, sort, limit, status, pareto, tracking_uri):
    """The trials of a search, one row each, read back from MLflow."""
    from nas import results

    # A local SQLite store is read with sqlite3, without importing MLflow (seconds).
    reader = results.open_reader(tracking_uri)
    found = results.find_search(reader, experiment)
    every = results.list_trials(reader, found)
    rows, marks = results.select_trials(every, found, status=status, pareto=pareto, sort=sort,
                                        limit=limit)
    better = "higher" if found.direction == "max" else "lower"
    budget = (f"{len(every)} trials (as many as its time limit held)"
              if (found.max_trials or 0) >= UNCAPPED_TRIALS
              else f"{len(every)} of {found.max_trials or '?'} trials")
    click.echo(f"experiment {found.experiment_name!r}, search run {found.run_id} "
               f"({found.status}): {budget}; {found.objective}, {better} is better")
    if not rows:
        click.echo(f"no trial{' is ' + status.upper() if status else ' yet'}")
        return
    table = _results_table(rows, found.objective)
    click.echo(_with_pareto_column(table, rows, marks) if pareto else table)
    for row in rows:
        if row.error:
            click.echo(f"trial {row.trial_id} {row.status}: {row.error.splitlines()[0]}")


@click.command()
@LATEST_EXPERIMENT
@TRACKING_URI
@user_errors
def best(experiment, tracking_uri):
    """The best trial of a search: its scores, choices, layer table and MLflow run."""
    import textwrap

    from nas import final_model, results
    from nas.tracking import TAG_LATENCY, TAG_TRIAL

    tracker = results.open_store(tracking_uri)
    found = results.find_search(tracker, experiment)
    rows = results.list_trials(tracker, found)
    top = results.best_trial(rows, found)
    finished = sum(r.status == "FINISHED" for r in rows)
    click.echo(f"best trial {top.trial_id} of experiment {found.experiment_name!r}: "
               f"{found.objective} {top.objective:.4f} ({finished} finished trials)")
    latency = top.metrics.get("latency_ms")
    click.echo(f"{count(top.params)} parameters, {count(top.flops)} FLOPs, "
               f"fit {seconds(top.fit_seconds)} s, {top.epochs or '-'} epochs"
               + (f", latency {latency:.3f} ms" if latency is not None else ""))
    final = found.final_trials
    if final:
        click.echo(test_line(found.test, final, found.refit, found.flips))
        if "latency_ms" in found.metrics:
            click.echo(f"final model latency: {found.metrics['latency_ms']:.3f} ms at batch "
                       f"size 1 ({found.tags.get(TAG_LATENCY, 'measured')}; spread "
                       f"{found.metrics.get('latency_spread_ms', 0):.3f} ms)")
    values = "  ".join(f"{k}={cell(v)}" for k, v in top.values.items())
    click.echo(textwrap.fill(values, width=88, initial_indent="hyperparameters: ",
                             subsequent_indent="  ", break_on_hyphens=False))
    click.echo("")
    click.echo(results.layer_table(tracker, top))
    click.echo("")
    click.echo(f"MLflow: trial run {top.run_id}, search run {found.run_id}, experiment "
               f"{found.experiment_name!r} (id {found.experiment_id}) in {tracker.tracking_uri}")
    click.echo(f"  artifacts: {top.artifact_uri}")
    logged = final_model.logged_model(tracker, found)
    if logged is not None and final and logged.tags.get(TAG_TRIAL) == ",".join(final):
        click.echo(f"  model:     runs:/{found.run_id}/{final_model.MODEL_NAME} (the final "
                   f"model: {describe_final(final, found.refit, found.flips)})")
    hint = "" if tracker.tracking_uri.startswith("http") else "  (start it with `nas ui`)"
    click.echo(f"  UI:        {results.ui_link(tracker.tracking_uri, found, top.run_id)}{hint}")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 opens the UI to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@TRACKING_URI
@user_errors
def ui(host, port, tracking_uri):
    """The MLflow UI on the store the searches write to (Ctrl-C stops it).

    Runs `mlflow server` on the tracking store that `nas search` would use with the same
    --tracking-uri / MLFLOW_TRACKING_URI, so every search and trial is there.
    """
    from nas import results

    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        results.ui_command(tracking_uri, host, port)  # refuses: it is a server already
    tracker = results.open_store(tracking_uri)
    command = results.ui_command(tracker.tracking_uri, host, port)
    tracker.check()
    click.echo(f"MLflow UI of {tracker.tracking_uri} on http://{host}:{port} "
               f"(Ctrl-C stops it)")
    try:
        latest = results.find_search(tracker)
    except results.ResultsError:  # no search yet: the UI shows the store as it is
        latest = None
    if latest is not None:
        # This link opens the experiment on its runs; from MLflow's front page it opens on
        # the GenAI overview ("Traces: no data").
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        link = results.ui_link(tracker.tracking_uri, latest, server=f"http://{local}:{port}")
        click.echo(f"  the latest search (experiment {latest.experiment_name!r}): {link}")
    sys.stdout.flush()
    sys.stderr.flush()
    # MLflow 3's job runner (GenAI jobs, about eight more processes) is not needed to
    # browse runs: without it the server answers in 7-8 s, not 14-22 s (measured here).
    # A user who sets the variable keeps theirs.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Replaced by the server: Ctrl-C and signals reach it directly.
    os.execv(command[0], command)


def _results_table(rows, objective: str) -> str:
    funnel = any(r.fidelity for r in rows)  # a funnel's looks and full trainings
    timed = any("latency_ms" in r.metrics for r in rows)  # a search with --latency
    header = ("trial", "status", objective, "params", "FLOPs",
              *(("latency ms",) if timed else ()), "fit s", "epochs",
              *(("data",) if funnel else ()), "depth", "filters", "kernels", "strides",
              "pool", "1x1")
    table = [header]
    for r in rows:
        a = r.architecture
        latency = r.metrics.get("latency_ms")
        table.append((r.trial_id, r.status,
                      "-" if r.objective is None else f"{r.objective:.4f}",
                      count(r.params), count(r.flops),
                      *(("-" if latency is None else f"{latency:.3f}",) if timed else ()),
                      seconds(r.fit_seconds), "-" if r.epochs is None else str(r.epochs),
                      *((r.fidelity or "-",) if funnel else ()), cell(a["depth"]),
                      cell(a["filters"]), cell(a["kernels"]), cell(a["strides"]),
                      cell(a["pooling"]), cell(a["pointwise"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in table)


@click.command()
@LATEST_EXPERIMENT
@click.option("--out", required=True, metavar="FILE.png",
              type=click.Path(dir_okay=False, writable=True),
              help="Where to write the plot (PNG).")
@TRACKING_URI
@user_errors
def report(experiment, out, tracking_uri):
    """Plot a search's objective against parameters, FLOPs and (with --latency) latency,
    Pareto fronts drawn.

    The same plot as the pareto.png artifact of the search's MLflow run.
    """
    if not out.lower().endswith(".png"):
        raise click.BadParameter(f"{out!r} does not end in .png; the plot is a PNG",
                                 param_hint="--out")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise click.BadParameter(f"{out!r}: the folder {os.path.dirname(out)!r} does not exist",
                                 param_hint="--out")
    from nas import pareto, results

    tracker = results.open_store(tracking_uri)
    found = results.find_search(tracker, experiment)
    finished = results.finished_trials(results.list_trials(tracker, found))
    if not finished:
        raise UserError(f"experiment {found.experiment_name!r}: the search {found.run_id} has "
                        f"no finished trial to plot yet")
    pareto.plot_tradeoff(finished, out, found.objective, found.direction,
                         title=f"search {found.experiment_name}")
    timed = "latency" in pareto.costs_of(finished)
    against, cost = (("parameters, FLOPs and latency", "latency") if timed
                     else ("parameters and FLOPs", "parameters"))
    on_front = [r.trial_id for r in pareto.pareto_front(
        finished, "latency" if timed else "params", found.direction)]
    click.echo(f"wrote {out}: {found.objective} of {len(finished)} finished trials against "
               f"{against}; Pareto front ({cost}): trials {', '.join(on_front)}")


def _with_pareto_column(table: str, rows, marks: dict[str, str]) -> str:
    """`table` (a header line, then one line per row) with a `pareto` column appended."""
    lines = table.splitlines()
    width = max(len(line) for line in lines)
    cells = ["pareto"] + [marks.get(r.run_id, "") for r in rows]
    return "\n".join(f"{line.ljust(width)}  {cell}".rstrip() for line, cell in zip(lines, cells))

