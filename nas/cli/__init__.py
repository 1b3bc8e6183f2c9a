"""The `nas` command line. Thin: parse, one library call, print.

One module per command group, as MLflow's CLI: `search`, `results`
(trials, best, report, ui), `space` (space show), `export`, `latency`
(latency-table export, import); what they share is in
`common`. TensorFlow is imported only inside the commands that train or export, so
`nas --help` and the read-only commands answer at once. Errors in the user's input end as
one line on stderr and exit code 2, never a traceback (`common.user_errors`).
"""

from __future__ import annotations

import click

from nas.cli import export, latency, results, search, space
from nas.cli.common import Group, tensorflow_environment

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nas")
def main():
    """Neural architecture search for Keras: CNN spaces, KerasTuner, MLflow."""
    tensorflow_environment()


for command in (search.search, space.space, results.trials, results.best, results.ui,
                export.export_model, results.report, latency.latency_table):
    main.add_command(command)
