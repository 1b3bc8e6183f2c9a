"""`nas space show`: what a space holds before it is searched; no TensorFlow."""

from __future__ import annotations

import click

from nas.cli.common import (PIPELINE, user_errors)


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

