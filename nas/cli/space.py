"""`nas space show`: what a space holds before it is searched; no TensorFlow (but to
measure the layers this machine's latency table lacks, with `--max-latency-ms`)."""

from __future__ import annotations

import click

from nas.cli.common import LATENCY_TABLE, PIPELINE, plural, start_tensorflow, user_errors


@click.group()
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
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="MS",
              help="Latency budget: how many of --latency-samples sampled candidates the "
                   "per-layer latency table predicts within MS (layers this machine's table "
                   "lacks are measured first).")
@click.option("--latency", type=click.Choice(["tflite", "keras"]), default=None,
              help="With --max-latency-ms: the engine whose table predicts.  [default: tflite]")
@click.option("--latency-threads", type=click.IntRange(min=1), default=1, show_default=True,
              metavar="N", help="With --max-latency-ms and TFLite: the threads it runs on.")
@LATENCY_TABLE
@click.option("--latency-samples", type=click.IntRange(min=1), default=100, show_default=True,
              metavar="N", help="With --max-latency-ms: candidates to draw and predict.")
@user_errors
def space_show(space_ref, pipeline, samples, seed, max_params, max_flops, max_latency_ms,
               latency, latency_threads, latency_table, latency_samples):
    """How many architectures SPACE holds, which are impossible, what they cost.

    SPACE is a built-in name or a YAML file. Counts are exact and cover the discrete
    knobs (only those active under each choice); continuous ranges are named, not
    counted. Cost ranges are exact too, except in a space too large to weigh exactly
    (deep, many choices per stage, large inputs): they are then bounds, and say so. The
    pipeline gives the input shape. No model is built, but to measure layers for
    --max-latency-ms.
    """
    from nas import space as space_module
    from nas.specs import Constraints, load_pipeline, load_space

    given = click.get_current_context().get_parameter_source
    latency_flags = [name for name in ("latency", "latency_threads", "latency_table",
                                       "latency_samples")
                     if given(name) != click.core.ParameterSource.DEFAULT]
    if max_latency_ms is None and latency_flags:
        raise click.UsageError(f"--{latency_flags[0].replace('_', '-')} is for "
                               f"--max-latency-ms: give it too")
    if latency == "keras" and "latency_threads" in latency_flags:
        raise click.UsageError("--latency-threads is for --latency tflite")
    chosen, pipe = load_space(space_ref), load_pipeline(pipeline)
    input_shape, num_classes, pixel_scale = space_module.input_signature(pipe)
    budget = Constraints.tightest(Constraints(max_params, max_flops), pipe.constraints,
                                   chosen.constraints)
    table = None if max_latency_ms is None else _table(latency or "tflite", latency_threads,
                                                       latency_table)
    report = space_module.analyse(chosen, input_shape, num_classes)
    shape = "x".join(map(str, input_shape))
    click.echo(f"space {chosen.name} ({chosen.source}) on pipeline {pipe.name}: "
               f"{shape} inputs, {num_classes} classes")
    click.echo(space_module.describe(report, budget))
    if not report.fits(budget):
        return
    if table is not None:
        _latency(space_module, chosen, input_shape, num_classes, pixel_scale, budget, table,
                 max_latency_ms, latency_samples, seed)
    if not samples:
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


def _table(engine: str, threads: int, path: str | None):
    """The per-layer table that predicts: the file `path`, else this machine's."""
    from nas.latency_table import LatencyTable

    return LatencyTable.load(path) if path else LatencyTable.cached(engine, threads)


def _latency(space_module, chosen, input_shape, num_classes, pixel_scale, budget, table,
             max_latency_ms, count, seed) -> None:
    """The line of `--max-latency-ms`: how many sampled candidates are predicted within."""
    from nas import latency
    from nas.latency_table import LatencyGuard, how

    found, _ = space_module.sample(chosen, input_shape, num_classes, count, seed, pixel_scale,
                                   budget)
    if not found:
        click.echo("latency            no candidate drawn meets the other budgets")
        return
    lacking = {entry.key for architecture in found
               for entry in table.missing(architecture.for_serving())}
    if lacking and not table.fixed:
        click.echo(f"measuring {plural(len(lacking), 'layer')} this machine's latency table "
                   f"lacks, each as a model of it alone ({table.path})")
        start_tensorflow()
    guard = LatencyGuard(table, max_latency_ms, None if table.fixed else latency.measure_layers)
    within, predicted = space_module.latency_estimate(found, guard)
    where = (f"table {table.path}, measured on {table.machine}" if table.fixed
             else "this machine's table")
    click.echo(f"latency            {within} of {len(found)} sampled candidates (seed {seed}) "
               f"predicted within {max_latency_ms:g} ms: an estimate from a sample, not a "
               f"count ({where}, {how(table.engine, table.threads)}; predicted "
               f"{min(predicted):.3g} to {max(predicted):.3g} ms)")
