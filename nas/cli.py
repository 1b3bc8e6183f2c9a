"""The `nas` command line. Thin: parse, call the modules, print.

TensorFlow is imported only inside the commands that train or export, so `nas --help`
and the read-only commands answer at once. Errors in the user's input end as one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import click

from nas import events
from nas.errors import InputError, Interrupted, SearchFailed
from nas.events import Printer
from nas.results import STATUSES  # standard library alone: `nas --help` stays light

__all__ = ["main"]

# Shared options, as constants (the MLflow CLI's way): same flag, same help everywhere.
TRACKING_URI = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
    help="MLflow tracking store.  [env: MLFLOW_TRACKING_URI; default: MLflow's own, "
         "sqlite:///mlflow.db with artifacts in ./mlruns]",
)
EXPERIMENT = click.option(
    "--experiment", default=None, metavar="NAME",
    help="MLflow experiment (one per search).  [default: SPACE-PIPELINE]",
)
WORKDIR = click.option(
    "--workdir", envvar="NAS_WORKDIR", default=".nas", show_default=True, metavar="DIR",
    help="Where KerasTuner keeps each search's state, so a search resumes.  [env: NAS_WORKDIR]",
)
SPACE = click.option("--space", default="cnn", show_default=True, metavar="NAME|PATH",
                     help="Search space: a built-in name or a YAML file.")
PIPELINE = click.option("--pipeline", default="digits", show_default=True, metavar="NAME|PATH",
                        help="Pipeline: a built-in name or a YAML file.")
PROGRESS = click.option(
    "--progress/--no-progress", envvar="NAS_PROGRESS", default=True, show_default=True,
    help="A line per epoch of each trial: its objective and the time left in the trial "
         "and in the search (updated in place on a terminal).  [env: NAS_PROGRESS=0 "
         "turns it off]",
)
DISTRIBUTION = click.option(
    "--distribution", type=click.Choice(["none", "mirrored"]), default="none",
    show_default=True,
    help="mirrored: train each trial over all GPUs this process sees (tf.distribute).",
)


class UserError(click.ClickException):
    """One line on stderr, exit code 2: the user's input is wrong."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", err=True)


def user_errors(func):
    """Turn the library's input errors (`nas.errors.InputError`) into `UserError` at the CLI
    edge, each parameter they name shown as its flag."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except InputError as error:
            raise UserError(error.render(_flag)) from None

    return wrapper


def _flag(parameter: str) -> str:
    """The flag of a library parameter: the running command's option of that name."""
    context = click.get_current_context(silent=True)
    for option in (context.command.params if context is not None else ()):
        if option.name == parameter and isinstance(option, click.Option):
            return option.opts[0]
    return "--" + parameter.replace("_", "-")


def _tensorflow_environment() -> None:
    """Settings TensorFlow reads once, when it starts: set before it is imported."""
    # Take GPU memory as trials need it, not all of it up front (and let several
    # workers share one GPU); nas.search.configure_tensorflow sets it per device too.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # MLflow's INFO lines ("Creating initial MLflow database tables...") are not for users;
    # MLflow reads this when it is imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def start_tensorflow() -> None:
    """Import TensorFlow and find its devices, its C++ start-up lines held to the log level.

    TensorFlow 2.21 writes them to stderr (absl's "All log messages before
    absl::InitializeLog() is called are written to STDERR", oneDNN's custom operations,
    "Could not find cuda drivers", the CPU instructions it was not built for, a failed
    cuInit) before its logging reads TF_CPP_MIN_LOG_LEVEL, so the variable does not hide
    them. They are caught while TensorFlow starts, and only those at or above the level
    are written: none at the level nas sets when the user did not (3), nor at the user's
    3; more at a lower level the user chose.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_logical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            shown = _tensorflow_lines(caught.read().decode(errors="replace"),
                                      os.environ["TF_CPP_MIN_LOG_LEVEL"])
            if shown:
                sys.stderr.write(shown)
                sys.stderr.flush()


_LOG_PREFIX = re.compile(r"([IWEF])\d{4} ")  # absl/glog: I0000 00:00:... file.cc:12] ...
_SEVERITIES = {"I": 0, "W": 1, "E": 2, "F": 3}  # the levels of TF_CPP_MIN_LOG_LEVEL


def _tensorflow_lines(text: str, level: str) -> str:
    """The lines of `text` (TensorFlow's start-up output) at or above `level`."""
    try:
        minimum = int(level)
    except ValueError:  # as TensorFlow reads a value that is not a number
        minimum = 0
    severity = _SEVERITIES["W"]  # absl's "WARNING: All log messages before ..." comes first
    kept = []
    for line in text.splitlines(keepends=True):
        found = _LOG_PREFIX.match(line)
        if found:
            severity = _SEVERITIES[found.group(1)]
        elif line.startswith("WARNING: "):
            severity = _SEVERITIES["W"]
        if severity >= minimum:  # a line without a prefix continues the one before
            kept.append(line)
    return "".join(kept)


class Duration(click.ParamType):
    """A time span: 90s, 30m, 1.5h, or plain seconds."""

    name = "duration"
    _UNITS = {"s": 1, "m": 60, "h": 3600}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "s")
        try:
            seconds = float(number) * self._UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a duration such as 90s, 30m or 2h", param, ctx)
        if not seconds > 0 or seconds == float("inf"):
            self.fail(f"{value!r} must be above 0", param, ctx)
        return seconds


class _Group(click.Group):
    """A group whose usage errors are one line (`Error: ...`) with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            click.echo(f"Error: {error.format_message()}{hint}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


SKIP_BAD_IMAGES = click.option(
    "--skip-bad-images", is_flag=True,
    help="Leave a directory's unreadable image files out (listed on the search's run) "
         "instead of refusing the data.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nas")
def main():
    """Neural architecture search for Keras: CNN spaces, KerasTuner, MLflow."""
    _tensorflow_environment()


@main.command()
@SPACE
@PIPELINE
@click.option("--tuner", type=click.Choice(["evolution", "random", "bayesian", "hyperband",
                                            "grid"]),
              default="evolution", show_default=True,
              help="The search algorithm: evolution (known-good seeds, then one-knob moves "
                   "near the best) or one of KerasTuner's own.")
@click.option("--max-trials", type=click.IntRange(min=1), default=10, show_default=True,
              help="Trials to train (rejected candidates do not count).")
@click.option("--time-limit", type=Duration(), default=None, metavar="DURATION",
              help="Start no trial that would not end within this time (90s, 30m, 2h); "
                   "with --max-trials, whichever comes first.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs per trial.  [default: the pipeline's]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="[default: the pipeline's]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The same seed gives the same sequence of candidates.")
@EXPERIMENT
@TRACKING_URI
@WORKDIR
@click.option("--overwrite", is_flag=True, help="Start afresh instead of resuming.")
@click.option("--max-failures", type=click.IntRange(min=1), default=3, show_default=True,
              help="Consecutive failed trials that end the search.")
@click.option("--max-params", type=click.IntRange(min=1), default=None,
              help="Parameter budget per candidate.")
@click.option("--max-flops", type=click.IntRange(min=1), default=None,
              help="FLOPs budget per candidate.")
@click.option("--mixed-precision", is_flag=True, help="float16 compute, float32 output.")
@click.option("--jit-compile", is_flag=True, help="Compile training steps with XLA.")
@click.option("--register", default=None, metavar="NAME",
              help="Register the final model in the MLflow Model Registry as NAME.")
@click.option("--ensemble", type=click.IntRange(min=1), default=3, show_default=True,
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
@click.option("--worker-timeout", type=click.FloatRange(min=1), default=60.0,
              show_default=True, metavar="SECONDS",
              help="A worker silent this long is lost; its trial goes to another worker.")
@PROGRESS
@user_errors
def search(space, pipeline, tuner, max_trials, time_limit, epochs, batch_size, seed, experiment,
           tracking_uri, workdir, overwrite, max_failures, max_params, max_flops,
           mixed_precision, jit_compile, register, ensemble, refit, skip_bad_images,
           distribution, chief, tls_cert, tls_key, workers, worker_timeout, progress):
    """Search a space for the best CNN on a pipeline's data, logging to MLflow."""
    from nas import search as search_module
    from nas.specs import load_pipeline, load_space

    config = search_module.SearchConfig(
        space=load_space(space), pipeline=load_pipeline(pipeline), tuner=tuner,
        max_trials=max_trials, time_limit=time_limit, epochs=epochs, batch_size=batch_size,
        seed=seed, experiment=experiment, tracking_uri=tracking_uri, workdir=workdir,
        overwrite=overwrite, max_failures=max_failures, max_params=max_params,
        max_flops=max_flops, mixed_precision=mixed_precision, jit_compile=jit_compile,
        register=register, ensemble=ensemble, refit=refit, skip_bad_images=skip_bad_images,
        distribution=_distribution(distribution),
        chief=chief, worker_timeout=worker_timeout, tls_cert=tls_cert, tls_key=tls_key,
    )
    if (tls_cert or tls_key) and not chief:
        raise click.UsageError("--tls-cert and --tls-key are for a chief: give --chief too")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together: give both")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and b"-----BEGIN " not in Path(path).read_bytes():
            raise click.BadParameter(f"{path!r} is not a PEM file", param_hint=flag)
    if workers:
        _search_with_local_workers(config, workers)
    if chief:
        from nas import distributed

        distributed.check_address(chief)
        config.worker_token = distributed.new_token()
    prepared = search_module.prepare(config)
    click.echo(f"searching {config.space.name} on {config.pipeline.name} with {tuner}: "
               f"{_plural(max_trials, 'trial')}, experiment {config.experiment_name!r}")
    if prepared.state:
        click.echo(f"resuming the search in {config.project_dir} (--overwrite starts afresh)")
    if chief:
        _print_worker_command(prepared, space, pipeline)
    from nas import final_model

    final_model.prepare_model_logging()  # in the background, while TensorFlow loads
    start_tensorflow()
    shown = _Progress(terminal=sys.stdout.isatty(), epochs=progress)
    try:
        with shown:
            if chief:  # workers train the trials; this process serves the oracle
                from nas import distributed

                result = distributed.run_chief(prepared, shown)
            else:
                result = search_module.run(prepared, shown)
    except (KeyboardInterrupt, Interrupted) as error:
        click.echo(f"Interrupted ({str(error) or 'Ctrl-C'}): the trial and the search were "
                   f"closed as KILLED and the state saved; run the same command to resume.",
                   err=True)
        sys.exit(130)
    except SearchFailed as error:
        click.echo(f"Error: the search failed: {error.render(_flag)}", err=True)
        for line in error.errors:
            click.echo(f"  {line}", err=True)
        sys.exit(1)
    _print_result(result)


class _Progress(Printer):
    """Prints a search's events (`nas.events`) and, with `epochs`, its epochs: on a
    terminal, the epoch line is one line rewritten in place (a carriage return) and the
    next line of the search replaces it; elsewhere (a file, a pipe) each epoch is a plain
    line, without control characters."""

    def __init__(self, terminal: bool, epochs: bool = True):
        super().__init__(self.echo_line)
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


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _print_result(result) -> None:
    finished = result.finished
    failed = [t for t in result.trials if t.status == "FAILED"]
    click.echo("")
    click.echo(f"{_plural(len(finished), 'trial')} finished, {len(failed)} failed, "
               f"{_plural(result.rejected, 'candidate')} rejected before training")
    if result.stopped_by_time:
        click.echo("stopped by --time-limit: the next trial would not have ended in time "
                   "(a larger limit resumes the search)")
    if finished:
        click.echo(_trial_table(finished[:5], result.objective))
        click.echo(_test_line(result.test, result.final_trials, result.refit))
    click.echo(f"search run: {result.search_run_id} (experiment {result.experiment_id})")


def _final_model(trial_ids: list[str], refit: bool = False) -> str:
    refitted = ", retrained on training + validation data" if refit else ""
    if len(trial_ids) == 1:
        return f"trial {trial_ids[0]}{refitted}"
    return (f"ensemble of trials {', '.join(trial_ids)} (their probabilities averaged"
            f"{refitted})")


def _test_line(test: dict, trial_ids: list[str], refit: bool = False) -> str:
    """The final model's held-out score, or why there is none."""
    if not trial_ids:
        return "final model: none (it could not be made; see the warning above)"
    if "test_accuracy" not in test:
        return (f"final model: {_final_model(trial_ids, refit)}; no test score (no test "
                f"data: data.test_split is 0)")
    return (f"final model: {_final_model(trial_ids, refit)}, test_accuracy "
            f"{test['test_accuracy']:.4f}  test_loss {test['test_loss']:.4f}  on "
            f"{int(test['test_samples']):,} held-out samples the search never saw")


def _trial_table(trials, objective: str) -> str:
    rows = [("trial", objective, "params", "FLOPs", "fit s", "depth", "filters", "kernels")]
    for t in trials:
        a = t.architecture
        rows.append((t.trial_id, f"{t.objective:.4f}", f"{t.params:,}", f"{t.flops:,}",
                     f"{t.fit_seconds:.1f}", str(a["depth"]),
                     ",".join(map(str, a["filters"])), ",".join(map(str, a["kernels"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --- nas space (issue 6): look at a space before searching it; no TensorFlow ---


@main.group()
def space():
    """Look at search spaces before searching them."""


@space.command("show")
@click.argument("space_ref", metavar="SPACE")
@PIPELINE
@click.option("--samples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Candidates to draw and show with their layer tables.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples.")
@click.option("--max-params", type=click.IntRange(min=1), default=None,
              help="Parameter budget to check the space against.")
@click.option("--max-flops", type=click.IntRange(min=1), default=None,
              help="FLOPs budget to check the space against.")
@user_errors
def space_show(space_ref, pipeline, samples, seed, max_params, max_flops):
    """How many architectures SPACE holds, which are impossible, what they cost.

    SPACE is a built-in name or a YAML file. Counts are exact and cover the discrete
    knobs (only those active under each choice); continuous ranges are named, not
    counted. Cost ranges are exact too, except in a space too large to weigh exactly
    (deep, many choices per stage, large inputs): they are then bounds, and say so. The
    pipeline gives the input shape. No model is built.
    """
    from nas import space as space_module
    from nas.specs import Constraints, load_pipeline, load_space

    chosen, pipe = load_space(space_ref), load_pipeline(pipeline)
    input_shape, num_classes, pixel_scale = space_module.input_signature(pipe)
    budget = Constraints.tightest(Constraints(max_params, max_flops), pipe.constraints,
                                   chosen.constraints)
    report = space_module.analyse(chosen, input_shape, num_classes)
    shape = "x".join(map(str, input_shape))
    click.echo(f"space {chosen.name} ({chosen.source}) on pipeline {pipe.name}: "
               f"{shape} inputs, {num_classes} classes")
    click.echo(space_module.describe(report, budget))
    if not samples or not report.fits(budget):
        return
    found, rejected = space_module.sample(chosen, input_shape, num_classes, samples, seed,
                                          pixel_scale, budget)
    skipped = f"; {rejected} drawn and skipped as impossible or over budget" if rejected else ""
    noun = "candidate" if len(found) == 1 else "candidates"
    click.echo(f"\n{len(found)} sampled {noun} (seed {seed}{skipped})")
    for number, architecture in enumerate(found, 1):
        click.echo(f"\ncandidate {number}: {architecture.params:,} parameters, "
                   f"{architecture.flops:,} FLOPs")
        click.echo(space_module.describe_candidate(architecture))


# --- results, the MLflow UI and export (issue 3): read back from MLflow ---------------

LATEST_EXPERIMENT = click.option(
    "--experiment", default=None, metavar="NAME",
    help="Experiment of the search (its latest search run).  [default: the experiment "
         "searched most recently]",
)


@main.command()
@LATEST_EXPERIMENT
@click.option("--sort", default="objective", show_default=True, metavar="METRIC",
              help="objective (best first), trial, params, flops, fit_time, epochs, or any "
                   "metric of the trial runs (e.g. val_loss).")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show the first N rows only.")
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False), default=None,
              help="Only trials whose MLflow run ended so.")
@click.option("--pareto", is_flag=True,
              help="Only the trials on the Pareto front of the objective vs parameters or "
                   "FLOPs, marked.")
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
    click.echo(f"experiment {found.experiment_name!r}, search run {found.run_id} "
               f"({found.status}): {len(every)} of {found.max_trials or '?'} trials; "
               f"{found.objective}, {better} is better")
    if not rows:
        click.echo(f"no trial{' is ' + status.upper() if status else ' yet'}")
        return
    table = _results_table(rows, found.objective)
    click.echo(_with_pareto_column(table, rows, marks) if pareto else table)
    for row in rows:
        if row.error:
            click.echo(f"trial {row.trial_id} {row.status}: {row.error.splitlines()[0]}")


@main.command()
@LATEST_EXPERIMENT
@TRACKING_URI
@user_errors
def best(experiment, tracking_uri):
    """The best trial of a search: its scores, choices, layer table and MLflow run."""
    import textwrap

    from nas import final_model, results
    from nas.tracking import TAG_TRIAL

    tracker = results.open_store(tracking_uri)
    found = results.find_search(tracker, experiment)
    rows = results.list_trials(tracker, found)
    top = results.best_trial(rows, found)
    finished = sum(r.status == "FINISHED" for r in rows)
    click.echo(f"best trial {top.trial_id} of experiment {found.experiment_name!r}: "
               f"{found.objective} {top.objective:.4f} ({finished} finished trials)")
    click.echo(f"{_count(top.params)} parameters, {_count(top.flops)} FLOPs, "
               f"fit {_seconds(top.fit_seconds)} s, {top.epochs or '-'} epochs")
    final = found.final_trials
    if final:
        click.echo(_test_line(found.test, final, found.refit))
    values = "  ".join(f"{k}={_cell(v)}" for k, v in top.values.items())
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
                   f"model: {_final_model(final, found.refit)})")
    hint = "" if tracker.tracking_uri.startswith("http") else "  (start it with `nas ui`)"
    click.echo(f"  UI:        {results.ui_link(tracker.tracking_uri, found, top.run_id)}{hint}")


@main.command()
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
    # Replaced by the server: Ctrl-C and signals reach it directly.
    os.execv(command[0], command)


@main.command("export")
@click.option("--experiment", default=None, metavar="NAME",
              help="Export the best trial of this experiment's latest search.  [default: the "
                   "experiment searched most recently]")
@click.option("--run", "run_id", default=None, metavar="RUN_ID",
              help="A search's run (export its final model) or a trial's run (that trial).")
@click.option("--trial", "trial_id", default=None, metavar="ID",
              help="Export this trial of the search alone.")
@click.option("--ensemble", type=click.IntRange(min=1), default=None, metavar="K",
              help="Export the average of the search's best K trials (1: the best alone).  "
                   "[default: the search's final model]")
@click.option("--out", required=True, metavar="DIR",
              type=click.Path(file_okay=False, writable=True),
              help="Folder to write; must be empty or new unless --force.")
@click.option("--force", is_flag=True, help="Replace the content of a non-empty DIR.")
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "tflite"]),
              default="savedmodel", show_default=True,
              help="A TensorFlow SavedModel, or a TFLite flatbuffer (model.tflite).")
@click.option("--register", default=None, metavar="NAME",
              help="Also register the model in the MLflow Model Registry as NAME.")
@TRACKING_URI
@WORKDIR
@user_errors
def export_model(experiment, run_id, trial_id, ensemble, out, force, fmt, register,
                 tracking_uri, workdir):
    """Write the search's final model (best-epoch weights) for serving.

    The final model is what `nas search` scored on the test data: its best trial's
    model, or with `nas search --ensemble K` the average of its best K. The model
    takes images as the pipeline reads them (raw float32 pixel values; the
    scaling is inside) and returns class probabilities; class_names.json is written
    beside it. The weights come from KerasTuner's checkpoint in --workdir when it holds
    the search, else from the MLflow model the search logged.
    """
    if experiment is not None and run_id is not None:
        raise click.UsageError("--experiment and --run exclude each other; give one")
    if trial_id is not None and ensemble is not None:
        raise click.UsageError("--trial and --ensemble exclude each other; give one")
    from nas import export as export_module
    from nas import results

    tracker = results.open_store(tracking_uri)
    tracker.check()
    start_tensorflow()
    done = export_module.export(tracker, out, experiment=experiment, run_id=run_id,
                                workdir=workdir, force=force, format=fmt, register=register,
                                trial_id=trial_id, ensemble=ensemble)
    what = "a SavedModel" if fmt == "savedmodel" else "TFLite (model.tflite)"
    scores = ", ".join(f"{m.objective:.4f}" for m in done.members)
    final = " (the search's final model)" if done.is_final else ""
    refit = done.is_final and done.search.refit
    click.echo(f"exported {_final_model([m.trial_id for m in done.members], refit)}{final} of "
               f"experiment {done.search.experiment_name!r} ({done.search.objective} "
               f"{scores}) to {done.out} as {what}")
    click.echo(f"  weights:     {done.source}")
    if done.is_final and "test_accuracy" in done.search.test:
        test = done.search.test
        click.echo(f"  test score:  test_accuracy {test['test_accuracy']:.4f}  test_loss "
                   f"{test['test_loss']:.4f} ({int(test['test_samples']):,} held-out samples)")
    click.echo(f"  class names: {done.out / export_module.CLASS_NAMES_FILE}")
    if fmt == "savedmodel":
        click.echo(f"  signature:   serving_default (image: raw pixels -> output_0: class "
                   f"probabilities); see `saved_model_cli show --dir {done.out} --all`")
    if done.registered:
        click.echo(f"registered as {done.registered}")


def _results_table(rows, objective: str) -> str:
    header = ("trial", "status", objective, "params", "FLOPs", "fit s", "epochs", "depth",
              "filters", "kernels", "strides", "pool", "1x1")
    table = [header]
    for r in rows:
        a = r.architecture
        table.append((r.trial_id, r.status,
                      "-" if r.objective is None else f"{r.objective:.4f}",
                      _count(r.params), _count(r.flops), _seconds(r.fit_seconds),
                      "-" if r.epochs is None else str(r.epochs), _cell(a["depth"]),
                      _cell(a["filters"]), _cell(a["kernels"]), _cell(a["strides"]),
                      _cell(a["pooling"]), _cell(a["pointwise"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in table)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "y" if value else "n"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


# --- scale out: nas worker, and the helpers of search --chief / --workers ---------------


@main.command()
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
    from nas import search as search_module
    from nas.specs import load_pipeline, load_space

    worker_id = worker_id if worker_id is not None else (
        f"{socket.gethostname()}-{os.getpid()}".replace("chief", "chf"))
    config = search_module.SearchConfig(
        space=load_space(space), pipeline=load_pipeline(pipeline), experiment=experiment,
        tracking_uri=tracking_uri, workdir=workdir, distribution=_distribution(distribution),
        chief=chief, worker_id=worker_id, worker_token=token, tls_ca=tls_ca,
        skip_bad_images=skip_bad_images,
    )
    if tls_ca and b"-----BEGIN " not in Path(tls_ca).read_bytes():
        raise click.BadParameter(f"{tls_ca!r} is not a PEM file", param_hint="--tls-ca")
    prepared = distributed.prepare_worker(config)

    def echo(line):
        click.echo(f"[{worker_id}] {line}")

    start_tensorflow()
    try:
        trained = distributed.run_worker(prepared, Printer(echo), wait=wait)
    except (KeyboardInterrupt, Interrupted) as error:
        click.echo(f"Interrupted ({str(error) or 'Ctrl-C'}): the trial was closed as KILLED; the "
                   f"chief hands it to another worker.", err=True)
        sys.exit(130)
    echo(f"the search has ended; this worker trained {len(trained)} trial(s)"
         + (f": {', '.join(trained)}" if trained else ""))


def _distribution(choice: str | None) -> str | None:
    return None if choice in (None, "none") else choice


def _print_worker_command(prepared, space: str, pipeline: str) -> None:
    from nas import distributed

    config = prepared.config
    uri = prepared.tracker.tracking_uri
    click.echo("start workers (any number, on any machine that reaches this one) with:")
    click.echo("  " + distributed.worker_command(config.chief, space, pipeline,
                                                 config.experiment_name, uri,
                                                 config.distribution, config.worker_token,
                                                 "CERT.pem" if config.tls_cert else None,
                                                 config.skip_bad_images))
    click.echo(f"  (the token is this search's; the chief refuses workers without it. Set "
               f"{distributed.TOKEN_ENV} to choose it, e.g. to keep it when the chief restarts)")
    if config.tls_cert:
        click.echo(f"  (over TLS: CERT.pem is a copy of {config.tls_cert}, or of the CA that "
                   f"signed it, on the worker's machine)")
    if not uri.startswith(("http://", "https://")):
        click.echo(f"  (workers on other machines need a tracking server both reach: "
                   f"--tracking-uri http://...; {uri} is local to this machine)")


def _search_with_local_workers(config, workers: int) -> None:
    """`nas search --workers N`: the chief and N workers as processes; exits with the chief's
    exit code."""
    from nas import distributed
    from nas import search as search_module

    if config.chief:
        raise click.UsageError("--workers and --chief exclude each other: --workers starts "
                               "its own chief on 127.0.0.1")
    # Checks the input and creates the tracking store once, before several processes
    # open it at the same time.
    prepared = search_module.prepare(config)
    params = click.get_current_context().params
    chief_args = _options_of(click.get_current_context(), skip={"workers", "chief"})
    worker_args = ["--space", params["space"], "--pipeline", params["pipeline"],
                   "--experiment", config.experiment_name,
                   "--tracking-uri", prepared.tracker.tracking_uri,
                   "--workdir", config.workdir, "--distribution", params["distribution"]]
    worker_args += ["--skip-bad-images"] if config.skip_bad_images else []
    sys.exit(distributed.run_local(chief_args, worker_args, workers, echo=click.echo))


def _options_of(ctx: click.Context, skip: set[str]) -> list[str]:
    """The options of the running command, as arguments that give them again."""
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in skip or value is None:
            continue
        if param.is_flag:
            args += [param.opts[0]] if value else param.secondary_opts[:1]
        else:
            args += [param.opts[0], str(value)]
    return args


# --- trade-offs (issue 6): the Pareto front of objective vs parameters and FLOPs ---


@main.command()
@LATEST_EXPERIMENT
@click.option("--out", required=True, metavar="FILE.png",
              type=click.Path(dir_okay=False, writable=True),
              help="Where to write the plot (PNG).")
@TRACKING_URI
@user_errors
def report(experiment, out, tracking_uri):
    """Plot a search's objective against parameters and FLOPs, Pareto fronts drawn.

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
    on_front = [r.trial_id for r in pareto.pareto_front(finished, "params", found.direction)]
    click.echo(f"wrote {out}: {found.objective} of {len(finished)} finished trials against "
               f"parameters and FLOPs; Pareto front (parameters): trials {', '.join(on_front)}")


def _with_pareto_column(table: str, rows, marks: dict[str, str]) -> str:
    """`table` (a header line, then one line per row) with a `pareto` column appended."""
    lines = table.splitlines()
    width = max(len(line) for line in lines)
    cells = ["pareto"] + [marks.get(r.run_id, "") for r in rows]
    return "\n".join(f"{line.ljust(width)}  {cell}".rstrip() for line, cell in zip(lines, cells))


if __name__ == "__main__":
    main()
