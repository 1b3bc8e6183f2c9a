"""`nas latency-table`: per-layer latency tables made on another device, for
`nas search --max-latency-ms --latency-table FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nas.cli.common import PIPELINE, SPACE, UserError, plural, start_tensorflow, user_errors


@click.group("latency-table")
def latency_table():
    """Per-layer latency tables measured on another device (a phone, a board)."""


@latency_table.command("export")
@click.argument("folder", type=click.Path(file_okay=False))
@SPACE
@PIPELINE
@user_errors
def export_models(folder, space, pipeline):
    """Write every layer a candidate of the space can have as a TFLite model of it alone.

    FOLDER (new or empty) gets 00001.tflite..., empty.tflite (the empty model: its input
    passed through) and layers.json (which layer each file is). Time each file on the
    device with TFLite's benchmark_model, then `nas latency-table import`. Takes a
    TFLite conversion per layer (the cnn space on 28x28 images has ~3,300 layers).
    """
    from nas import latency
    from nas.latency_table import space_layers
    from nas.space import input_signature
    from nas.specs import load_pipeline, load_space

    out = Path(folder)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: not empty; give a new or empty folder")
    chosen, pipe = load_space(space), load_pipeline(pipeline)
    input_shape, num_classes, pixel_scale = input_signature(pipe)
    entries = list(space_layers(chosen, input_shape, num_classes, pixel_scale).values())
    click.echo(f"writing {plural(len(entries), 'layer')} of space {chosen.name} on "
               f"{'x'.join(map(str, input_shape))} inputs to {out}, a TFLite model each")
    start_tensorflow()
    out.mkdir(parents=True, exist_ok=True)
    latency.write_layer_models(entries, out)
    click.echo(f"done: time each .tflite in {out} on the device, then `nas latency-table "
               f"import {out} TIMINGS --machine NAME --out FILE`")


@latency_table.command("import")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("timings", type=click.Path(dir_okay=False))
@click.option("--machine", required=True, metavar="NAME",
              help="The device the models were timed on, as the table will name it.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              metavar="N", help="The threads they were timed on (benchmark_model "
                                "--num_threads).")
@click.option("--out", required=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="The table to write (JSON), for --latency-table.")
@user_errors
def import_timings(folder, timings, machine, threads, out):
    """Make a latency table from the timings of the models `export` wrote to FOLDER.

    TIMINGS is a text file with a line "MODEL_FILE MICROSECONDS" per model (empty.tflite
    included): the "Inference (avg)" benchmark_model reports.
    """
    from nas.latency_table import from_timings

    table = from_timings(folder, timings, machine, threads)
    Path(out).write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    click.echo(f"wrote {out}: {plural(len(table.entries), 'layer')} and the empty model "
               f"({table.overhead_ms:.3g} ms) as timed on {machine}")
