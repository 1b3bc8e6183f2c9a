"""`nas export`: a search's final model (or a trial, an ensemble) for serving."""

from __future__ import annotations

import click

from nas.cli.common import (TRACKING_URI, WORKDIR, describe_final, start_tensorflow,
                            user_errors)


@click.command("export")
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
    flips = done.is_final and done.search.flips
    click.echo(f"exported {describe_final([m.trial_id for m in done.members], refit, flips)}"
               f"{final} of "
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

