"""The `nas` command line. Thin: parse, call the modules, print.

TensorFlow is imported only inside the commands that train or export, so `nas --help`
and the read-only commands answer at once. Errors in the user's input end as one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys

import click

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


class UserError(click.ClickException):
    """One line on stderr, exit code 2: the user's input is wrong."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", err=True)


def user_errors(func):
    """Turn the library's input errors into `UserError` at the CLI edge."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from nas.data import DataError
        from nas.search import SearchError
        from nas.specs import SpecError
        from nas.tracking import TrackingError

        try:
            return func(*args, **kwargs)
        except (SpecError, DataError, SearchError, TrackingError) as error:
            raise UserError(str(error)) from None

    return wrapper


def _quiet_tensorflow() -> None:
    # Before TensorFlow is imported: its C++ start-up chatter is not for our users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nas")
def main():
    """Neural architecture search for Keras: CNN spaces, KerasTuner, MLflow."""
    _quiet_tensorflow()


@main.command()
@SPACE
@PIPELINE
@click.option("--tuner", type=click.Choice(["random", "bayesian", "hyperband", "grid"]),
              default="random", show_default=True, help="KerasTuner's search algorithm.")
@click.option("--max-trials", type=int, default=10, show_default=True,
              help="Trials to train (rejected candidates do not count).")
@click.option("--epochs", type=int, default=None, help="Epochs per trial.  [default: the pipeline's]")
@click.option("--batch-size", type=int, default=None, help="[default: the pipeline's]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The same seed gives the same sequence of candidates.")
@EXPERIMENT
@TRACKING_URI
@WORKDIR
@click.option("--overwrite", is_flag=True, help="Start afresh instead of resuming.")
@click.option("--max-failures", type=int, default=3, show_default=True,
              help="Consecutive failed trials that end the search.")
@click.option("--max-params", type=int, default=None, help="Parameter budget per candidate.")
@click.option("--max-flops", type=int, default=None, help="FLOPs budget per candidate.")
@click.option("--mixed-precision", is_flag=True, help="float16 compute, float32 output.")
@click.option("--jit-compile", is_flag=True, help="Compile training steps with XLA.")
@user_errors
def search(space, pipeline, tuner, max_trials, epochs, batch_size, seed, experiment,
           tracking_uri, workdir, overwrite, max_failures, max_params, max_flops,
           mixed_precision, jit_compile):
    """Search a space for the best CNN on a pipeline's data, logging to MLflow."""
    from nas import search as search_module
    from nas.specs import load_pipeline, load_space

    config = search_module.SearchConfig(
        space=load_space(space), pipeline=load_pipeline(pipeline), tuner=tuner,
        max_trials=max_trials, epochs=epochs, batch_size=batch_size, seed=seed,
        experiment=experiment, tracking_uri=tracking_uri, workdir=workdir,
        overwrite=overwrite, max_failures=max_failures, max_params=max_params,
        max_flops=max_flops, mixed_precision=mixed_precision, jit_compile=jit_compile,
    )
    prepared = search_module.prepare(config)
    click.echo(f"searching {config.space.name} on {config.pipeline.name} with {tuner}: "
               f"{max_trials} trials, experiment {config.experiment_name!r}")
    if prepared.state:
        click.echo(f"resuming the search in {config.project_dir} (--overwrite starts afresh)")
    try:
        result = search_module.run(prepared, echo=click.echo)
    except (KeyboardInterrupt, _interrupted()) as error:
        click.echo(f"Interrupted ({error or 'Ctrl-C'}): the trial and the search were closed "
                   f"as KILLED and the state saved; run the same command to resume.", err=True)
        sys.exit(130)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        click.echo(f"Error: the search failed: {first[0] if first else error}", err=True)
        for line in first[1:]:
            click.echo(f"  {line}", err=True)
        sys.exit(1)
    _print_result(result)


def _interrupted():
    from nas.tracking import Interrupted

    return Interrupted


def _print_result(result) -> None:
    finished = result.finished
    failed = [t for t in result.trials if t.status == "FAILED"]
    click.echo("")
    click.echo(f"{len(finished)} trials finished, {len(failed)} failed, "
               f"{result.rejected} candidates rejected before training")
    if finished:
        click.echo(_trial_table(finished[:5], result.objective))
    click.echo(f"search run: {result.search_run_id} (experiment {result.experiment_id})")


def _trial_table(trials, objective: str) -> str:
    rows = [("trial", objective, "params", "FLOPs", "fit s", "depth", "filters", "kernels")]
    for t in trials:
        a = t.architecture
        rows.append((t.trial_id, f"{t.objective:.4f}", f"{t.params:,}", f"{t.flops:,}",
                     f"{t.fit_seconds:.1f}", str(a["depth"]),
                     ",".join(map(str, a["filters"])), ",".join(map(str, a["kernels"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


if __name__ == "__main__":
    main()
