"""`nas search` and `nas worker`: a search, on one machine or as the chief of workers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import click

from nas import events
from nas.cli.common import (DISTRIBUTION, Duration, EXPERIMENT, PIPELINE, PROGRESS,
                            SKIP_BAD_IMAGES, SPACE, TRACKING_URI, WORKDIR, distribution_of,
                            flag_of, plural, start_tensorflow, test_line, user_errors)
from nas.errors import Interrupted, SearchFailed
from nas.events import Printer, duration
from nas.settings import TUNERS, UNCAPPED_TRIALS, Budget, FinalModel, ScaleOut, SearchConfig


@click.command()
@SPACE
@PIPELINE
@click.option("--tuner", type=click.Choice(TUNERS),
              default=SearchConfig.tuner, show_default=True,
              help="The search algorithm: evolution (known-good seeds, then one-knob moves "
                   "near the best) or one of KerasTuner's own.")
@click.option("--max-trials", type=click.IntRange(min=1), default=None,
              help=f"Trials to train (rejected candidates do not count).  [default: "
                   f"{Budget.max_trials}; with --time-limit, as many as fit]")
@click.option("--time-limit", type=Duration(), default=None, metavar="DURATION",
              help="The time the search may take, the final model included (90s, 30m, 2h): "
                   "no trial starts that would not end in it; with --max-trials, whichever "
                   "comes first.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs per trial.  [default: the pipeline's]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="[default: the pipeline's]")
@click.option("--seed", type=int, default=SearchConfig.seed, show_default=True,
              help="The same seed gives the same sequence of candidates.")
@EXPERIMENT
@TRACKING_URI
@WORKDIR
@click.option("--overwrite", is_flag=True, help="Start afresh instead of resuming.")
@click.option("--max-failures", type=click.IntRange(min=1), default=Budget.max_failures,
              show_default=True,
              help="Consecutive failed trials that end the search.")
@click.option("--max-params", type=click.IntRange(min=1), default=None,
              help="Parameter budget per candidate.")
@click.option("--max-flops", type=click.IntRange(min=1), default=None,
              help="FLOPs budget per candidate.")
@click.option("--mixed-precision", is_flag=True, help="float16 compute, float32 output.")
@click.option("--jit-compile", is_flag=True, help="Compile training steps with XLA.")
@click.option("--register", default=None, metavar="NAME",
              help="Register the final model in the MLflow Model Registry as NAME.")
@click.option("--ensemble", type=click.IntRange(min=1), default=FinalModel.ensemble,
              show_default=True,
              metavar="K", help="The final model averages the best K trials' probabilities.")
@click.option("--refit", is_flag=True,
              help="Retrain the final model's trials on training + validation data, for the "
                   "epochs each needed to reach its best validation score.")
@SKIP_BAD_IMAGES
@DISTRIBUTION
@click.option("--chief", default=None, metavar="HOST:PORT",
              help="Run as the chief of a distributed search: serve trials to `nas worker` "
                   "processes at this address (0.0.0.0:PORT for other machines).")
@click.option("--tls-cert", default=None, metavar="CERT.pem",
              type=click.Path(exists=True, dir_okay=False),
              help="With --chief: serve workers over TLS with this certificate (PEM).")
@click.option("--tls-key", default=None, metavar="KEY.pem",
              type=click.Path(exists=True, dir_okay=False),
              help="With --tls-cert: its private key (PEM).")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Start a chief and N local worker processes on 127.0.0.1 and wait for them.")
@click.option("--worker-timeout", type=click.FloatRange(min=1), default=ScaleOut.worker_timeout,
              show_default=True, metavar="SECONDS",
              help="A worker silent this long is lost; its trial goes to another worker.")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="",
              metavar="[ADDRESS|auto]",
              help="Train the trials as Ray tasks: on the cluster at ADDRESS, on the one "
                   "RAY_ADDRESS or a running local head names (auto), or, with no address, on "
                   "a local Ray started for the search.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True),
              default=ScaleOut.cpus_per_trial, show_default=True,
              help="With --ray: CPUs Ray gives each trial.")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0),
              default=ScaleOut.gpus_per_trial, show_default=True,
              help="With --ray: GPUs Ray gives each trial (0.5: two trials share one).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --ray: trials at once.  [default: as many as the cluster's CPUs "
                   "and GPUs hold]")
@click.option("--max-retries", type=click.IntRange(min=0), default=ScaleOut.max_retries,
              show_default=True,
              help="With --ray: how often Ray runs a trial again when its process or node "
                   "dies (it goes on from its last saved epoch where the working folder is "
                   "shared).")
@PROGRESS
@user_errors
def search(space, pipeline, tuner, max_trials, time_limit, epochs, batch_size, seed, experiment,
           tracking_uri, workdir, overwrite, max_failures, max_params, max_flops,
           mixed_precision, jit_compile, register, ensemble, refit, skip_bad_images,
           distribution, chief, tls_cert, tls_key, workers, worker_timeout, ray_address,
           cpus_per_trial, gpus_per_trial, max_concurrent, max_retries, progress):
    """Search a space for the best CNN on a pipeline's data, logging to MLflow."""
    from nas import search as search_module
    from nas.specs import load_pipeline, load_space

    if max_trials is None:
        max_trials = Budget.max_trials if time_limit is None else UNCAPPED_TRIALS
    given = [f"--{name.replace('_', '-')}" for name in ("cpus_per_trial", "gpus_per_trial",
                                                         "max_concurrent", "max_retries")
             if click.get_current_context().get_parameter_source(name)
             != click.core.ParameterSource.DEFAULT]
    if ray_address is None and given:
        raise click.UsageError(f"{given[0]} is for a search on Ray: give --ray too")
    if ray_address is not None and (workers or chief):
        raise click.UsageError(f"--ray and {'--workers' if workers else '--chief'} exclude "
                               f"each other: on Ray, --max-concurrent trials run at once")
    config = SearchConfig(
        space=load_space(space), pipeline=load_pipeline(pipeline), tuner=tuner,
        epochs=epochs, batch_size=batch_size, seed=seed, max_params=max_params,
        max_flops=max_flops, mixed_precision=mixed_precision, jit_compile=jit_compile,
        experiment=experiment, tracking_uri=tracking_uri, workdir=workdir,
        overwrite=overwrite, skip_bad_images=skip_bad_images,
        budget=Budget(max_trials=max_trials, time_limit=time_limit, max_failures=max_failures),
        final=FinalModel(ensemble=ensemble, refit=refit, register=register),
        scale=ScaleOut(distribution=distribution_of(distribution), chief=chief,
                       worker_timeout=worker_timeout, tls_cert=tls_cert, tls_key=tls_key,
                       ray=ray_address, cpus_per_trial=cpus_per_trial,
                       gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                       max_retries=max_retries),
    )
    if (tls_cert or tls_key) and not chief:
        raise click.UsageError("--tls-cert and --tls-key are for a chief: give --chief too")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together: give both")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and b"-----BEGIN " not in Path(path).read_bytes():
            raise click.BadParameter(f"{path!r} is not a PEM file", param_hint=flag)
    if workers or chief:
        from nas import distributed
    if ray_address is not None:  # this process the driver, the trials Ray tasks
        from nas import scaleout

        prepared = scaleout.prepare(config)
    elif workers:  # this process the chief, N local workers
        prepared = distributed.prepare_local(config)
    else:
        if chief:
            distributed.check_address(chief)
            config = dataclasses.replace(config, worker_token=distributed.new_token())
        prepared = search_module.prepare(config)
    # Taken now, not when `run` starts: of two searches of one experiment started at once,
    # the second is refused here, in one line, before it prints or loads anything.
    prepared.lock.acquire()
    budget = (f"as many trials as fit in {duration(time_limit)}"
              if max_trials >= UNCAPPED_TRIALS else plural(max_trials, 'trial'))
    click.echo(f"searching {config.space.name} on {config.pipeline.name} with {tuner}: "
               f"{budget}, experiment {config.experiment_name!r}")
    if prepared.state:
        click.echo(f"resuming the search in {config.project_dir} (--overwrite starts afresh)")
    if chief:
        _print_worker_command(prepared, space, pipeline)
    from nas import final_model

    final_model.prepare_model_logging()  # in the background, while TensorFlow loads
    start_tensorflow()
    shown = Progress(terminal=sys.stdout.isatty(), epochs=progress)
    try:
        with shown:
            if ray_address is not None:
                result = scaleout.run(prepared, shown)
            elif workers:
                result = distributed.run_local(prepared, space, pipeline, workers, shown)
            elif chief:  # workers train the trials; this process serves the oracle
                result = distributed.run_chief(prepared, shown)
            else:
                result = search_module.run(prepared, shown)
    except (KeyboardInterrupt, Interrupted) as error:
        click.echo(f"Interrupted ({str(error) or 'Ctrl-C'}): the trial and the search were "
                   f"closed as KILLED and the state saved; run the same command to resume.",
                   err=True)
        sys.exit(130)
    except SearchFailed as error:
        click.echo(f"Error: the search failed: {error.render(flag_of)}", err=True)
        for line in error.errors:
            click.echo(f"  {line}", err=True)
        sys.exit(1)
    _print_result(result)


class Progress(Printer):
    """Prints a search's events (`nas.events`) and, with `epochs`, its epochs: on a
    terminal, the epoch line is one line rewritten in place (a carriage return) and the
    next line of the search replaces it; elsewhere (a file, a pipe) each epoch is a plain
    line, without control characters."""

    def __init__(self, terminal: bool, epochs: bool = True):
        super().__init__(self.echo_line, flag_of)
        self.terminal = terminal
        self.epochs = epochs
        self.width = 0  # of the epoch line on the screen; 0: none

    def on_epoch_end(self, event) -> None:
        if not self.epochs:
            return
        line = events.line(event)
        if not self.terminal:
            click.echo(line)
            return
        # Never wider than the terminal: a wrapped line cannot be rewritten in place.
        line = line[:max(20, shutil.get_terminal_size().columns - 1)]
        click.echo("\r" + line.ljust(self.width), nl=False)
        self.width = len(line)

    def echo_line(self, message: str = "", **kwargs) -> None:
        self.clear()
        click.echo(message, **kwargs)

    def clear(self) -> None:
        if self.width:
            click.echo("\r" + " " * self.width + "\r", nl=False)
            self.width = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.clear()  # before whatever is printed next, an error too


def _print_result(result) -> None:
    finished = result.finished
    failed = [t for t in result.trials if t.status == "FAILED"]
    click.echo("")
    click.echo(f"{plural(len(finished), 'trial')} finished, {len(failed)} failed, "
               f"{plural(result.rejected, 'candidate')} rejected before training")
    if result.stopped_by_time:
        click.echo("stopped by --time-limit: the next trial would not have ended in time "
                   "(a larger limit resumes the search)")
    if finished:
        click.echo(_trial_table(finished[:5], result.objective))
        click.echo(test_line(result.test, result.final_trials, result.refit))
    click.echo(f"search run: {result.search_run_id} (experiment {result.experiment_id})")


def _trial_table(trials, objective: str) -> str:
    funnel = any(t.fidelity for t in trials)  # a funnel's looks and full trainings
    rows = [("trial", objective, "params", "FLOPs", "fit s", *(("data", "epochs") if funnel
                                                              else ()),
             "depth", "filters", "kernels")]
    for t in trials:
        a = t.architecture
        shown = (t.fidelity or "-", str(t.epochs)) if funnel else ()
        rows.append((t.trial_id, f"{t.objective:.4f}", f"{t.params:,}", f"{t.flops:,}",
                     f"{t.fit_seconds:.1f}", *shown, str(a["depth"]),
                     ",".join(map(str, a["filters"])), ",".join(map(str, a["kernels"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.command()
@SPACE
@PIPELINE
@EXPERIMENT
@TRACKING_URI
@WORKDIR
@click.option("--chief", required=True, metavar="HOST:PORT",
              help="The address of the chief (`nas search --chief HOST:PORT`).")
@click.option("--worker-id", default=None, metavar="ID",
              help="This worker's name, in the chief's log and as the nas.worker tag of its "
                   "trial runs.  [default: HOSTNAME-PID]")
@click.option("--token", default=None, envvar="NAS_WORKER_TOKEN", metavar="TOKEN",
              help="The search's worker token, as the chief printed it.  [env: "
                   "NAS_WORKER_TOKEN]")
@click.option("--tls-ca", default=None, metavar="CERT.pem",
              type=click.Path(exists=True, dir_okay=False),
              help="Reach a chief that serves TLS, trusting this certificate or CA (PEM).")
@SKIP_BAD_IMAGES
@DISTRIBUTION
@click.option("--wait", type=click.FloatRange(min=0), default=600.0, show_default=True,
              metavar="SECONDS", help="How long to wait for the chief's search to start.")
@user_errors
def worker(space, pipeline, experiment, tracking_uri, workdir, chief, worker_id, token,
           tls_ca, skip_bad_images, distribution, wait):
    """Train trials for the chief of a distributed search, until the search ends.

    Give the chief's --space, --pipeline, --experiment and --tracking-uri (a tracking
    server all machines reach); epochs, batch size, seed and precision come from the
    chief. One worker per GPU: set CUDA_VISIBLE_DEVICES for each.
    """
    import socket

    from nas import distributed
    from nas.specs import load_pipeline, load_space

    worker_id = worker_id if worker_id is not None else (
        f"{socket.gethostname()}-{os.getpid()}".replace("chief", "chf"))
    config = SearchConfig(
        space=load_space(space), pipeline=load_pipeline(pipeline), experiment=experiment,
        tracking_uri=tracking_uri, workdir=workdir, skip_bad_images=skip_bad_images,
        scale=ScaleOut(distribution=distribution_of(distribution), chief=chief,
                       worker_id=worker_id, worker_token=token, tls_ca=tls_ca),
    )
    if tls_ca and b"-----BEGIN " not in Path(tls_ca).read_bytes():
        raise click.BadParameter(f"{tls_ca!r} is not a PEM file", param_hint="--tls-ca")
    prepared = distributed.prepare_worker(config)

    def echo(line):
        click.echo(f"[{worker_id}] {line}")

    start_tensorflow()
    try:
        trained = distributed.run_worker(prepared, Printer(echo, flag_of), wait=wait)
    except (KeyboardInterrupt, Interrupted) as error:
        click.echo(f"Interrupted ({str(error) or 'Ctrl-C'}): the trial was closed as KILLED; the "
                   f"chief hands it to another worker.", err=True)
        sys.exit(130)
    echo(f"the search has ended; this worker trained {len(trained)} trial(s)"
         + (f": {', '.join(trained)}" if trained else ""))


def _print_worker_command(prepared, space: str, pipeline: str) -> None:
    from nas import distributed

    config = prepared.config
    uri = prepared.tracker.tracking_uri
    click.echo("start workers (any number, on any machine that reaches this one) with:")
    click.echo("  " + distributed.worker_command(config, space, pipeline, uri,
                                                 config.scale.worker_token,
                                                 "CERT.pem" if config.scale.tls_cert else None))
    click.echo(f"  (the token is this search's; the chief refuses workers without it. Set "
               f"{distributed.TOKEN_ENV} to choose it, e.g. to keep it when the chief restarts)")
    if config.scale.tls_cert:
        click.echo(f"  (over TLS: CERT.pem is a copy of {config.scale.tls_cert}, or of the CA "
                   f"that signed it, on the worker's machine)")
    if not uri.startswith(("http://", "https://")):
        click.echo(f"  (workers on other machines need a tracking server both reach: "
                   f"--tracking-uri http://...; {uri} is local to this machine)")
