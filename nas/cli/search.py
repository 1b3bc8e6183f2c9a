"""`nas search`: a search, in this process or with its trials on Ray."""

from __future__ import annotations

import shutil
import sys

import click

from nas import events
from nas.cli.common import (LATENCY_TABLE, Duration, EXPERIMENT, PIPELINE, PROGRESS, SPACE,
                            TRACKING_URI, WORKDIR, flag_of, plural, start_tensorflow, test_line,
                            user_errors)
from nas.errors import Interrupted, SearchFailed
from nas.events import Printer, duration
from nas.settings import (LOCAL_RAY, TUNERS, UNCAPPED_TRIALS, Budget, FinalModel, ScaleOut,
                          SearchConfig)


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
@click.option("--latency", type=click.Choice(["tflite", "keras"]), default=None,
              is_flag=False, flag_value="tflite",
              help="Measure each trial's and the final model's latency at batch size 1 on "
                   "this machine: as TFLite runs it (the default), or Keras's forward "
                   "pass; logged as latency_ms.")
@click.option("--latency-threads", type=click.IntRange(min=1),
              default=SearchConfig.latency_threads, show_default=True, metavar="N",
              help="With --latency tflite: the threads the TFLite interpreter runs on.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="MS",
              help="A latency budget: candidates a per-layer table predicts slower are not "
                   "trained, trials measured slower are never chosen, and the final model is "
                   "kept within it (measured as --latency says; TFLite without it).")
@LATENCY_TABLE
@click.option("--register", default=None, metavar="NAME",
              help="Register the final model in the MLflow Model Registry as NAME.")
@click.option("--ensemble", type=click.IntRange(min=1), default=FinalModel.ensemble,
              show_default=True,
              metavar="K", help="The final model averages the best K trials' probabilities.")
@click.option("--refit", is_flag=True,
              help="Retrain the final model's trials on training + validation data, for the "
                   "epochs each needed to reach its best validation score.")
@click.option("--skip-bad-images", is_flag=True,
              help="Leave a directory's unreadable image files out (listed on the search's "
                   "run) instead of refusing the data.")
@click.option("--distribution", type=click.Choice(["none", "mirrored"]), default="none",
              show_default=True,
              help="mirrored: train each trial over all GPUs its process sees "
                   "(tf.distribute).")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train N trials at once on a local Ray started for the search: "
                   "--ray --max-concurrent N.")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value=LOCAL_RAY,
              metavar="[ADDRESS|auto]",
              help="Train the trials as Ray tasks: on the cluster at ADDRESS, on the one "
                   "RAY_ADDRESS or a running local head names (auto), or, with no address, on "
                   "a local Ray started for the search.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True),
              default=ScaleOut.cpus_per_trial, show_default=True,
              help="With --ray or --workers: CPUs Ray gives each trial.")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0),
              default=ScaleOut.gpus_per_trial, show_default=True,
              help="With --ray or --workers: GPUs Ray gives each trial (0.5: two trials "
                   "share one).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --ray: trials at once.  [default: as many as the cluster's CPUs "
                   "and GPUs hold]")
@click.option("--max-retries", type=click.IntRange(min=0), default=ScaleOut.max_retries,
              show_default=True,
              help="With --ray or --workers: how often Ray runs a trial again when its "
                   "process or node dies (it goes on from its last saved epoch where the "
                   "working folder is shared).")
@PROGRESS
@user_errors
def search(space, pipeline, tuner, max_trials, time_limit, epochs, batch_size, seed, experiment,
           tracking_uri, workdir, overwrite, max_failures, max_params, max_flops,
           mixed_precision, jit_compile, latency, latency_threads, max_latency_ms,
           latency_table, register, ensemble, refit, skip_bad_images, distribution, workers,
           ray_address, cpus_per_trial, gpus_per_trial, max_concurrent, max_retries, progress):
    """Search a space for the best CNN on a pipeline's data, logging to MLflow."""
    from nas import search as search_module
    from nas.specs import load_pipeline, load_space

    if max_trials is None:
        max_trials = Budget.max_trials if time_limit is None else UNCAPPED_TRIALS
    given = [f"--{name.replace('_', '-')}" for name in ("cpus_per_trial", "gpus_per_trial",
                                                         "max_concurrent", "max_retries")
             if click.get_current_context().get_parameter_source(name)
             != click.core.ParameterSource.DEFAULT]
    if workers is not None:
        if max_concurrent is not None:
            raise click.UsageError("--workers and --max-concurrent exclude each other: "
                                   "--workers N is --ray --max-concurrent N")
        if ray_address not in (None, LOCAL_RAY):
            raise click.UsageError(f"--workers and --ray {ray_address} exclude each other: "
                                   f"--workers trains on a local Ray; on a cluster, give "
                                   f"--max-concurrent")
        ray_address, max_concurrent = LOCAL_RAY, workers
    if ray_address is None and given:
        raise click.UsageError(f"{given[0]} is for a search on Ray: give --ray too")
    config = SearchConfig(
        space=load_space(space), pipeline=load_pipeline(pipeline), tuner=tuner,
        epochs=epochs, batch_size=batch_size, seed=seed, max_params=max_params,
        max_flops=max_flops, mixed_precision=mixed_precision, jit_compile=jit_compile,
        latency=latency, latency_threads=latency_threads, max_latency_ms=max_latency_ms,
        latency_table=latency_table,
        experiment=experiment, tracking_uri=tracking_uri, workdir=workdir,
        overwrite=overwrite, skip_bad_images=skip_bad_images,
        budget=Budget(max_trials=max_trials, time_limit=time_limit, max_failures=max_failures),
        final=FinalModel(ensemble=ensemble, refit=refit, register=register),
        scale=ScaleOut(distribution=None if distribution == "none" else distribution,
                       ray=ray_address, cpus_per_trial=cpus_per_trial,
                       gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                       max_retries=max_retries),
    )
    if config.latency_engine != "tflite" and click.get_current_context().get_parameter_source(
            "latency_threads") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--latency-threads is for --latency tflite: give it too")
    if ray_address is not None:  # this process the driver, the trials Ray tasks
        from nas import scaleout

        prepared = scaleout.prepare(config)
    else:
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
    from nas import final_model

    final_model.prepare_model_logging()  # in the background, while TensorFlow loads
    start_tensorflow()
    shown = Progress(terminal=sys.stdout.isatty(), epochs=progress)
    try:
        with shown:
            if ray_address is not None:
                result = scaleout.run(prepared, shown)
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
        click.echo(test_line(result.test, result.final_trials, result.refit, result.flips))
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

