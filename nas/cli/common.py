"""What the commands of `nas` share: options, errors at the edge, TensorFlow's start, words.

Shared options are constants (the MLflow CLI's way): same flag, same help everywhere.
Nothing here imports TensorFlow or MLflow at import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

import click

from nas.errors import InputError
from nas.settings import SearchConfig

__all__ = ["TRACKING_URI", "EXPERIMENT", "WORKDIR", "SPACE", "PIPELINE", "PROGRESS",
           "LATENCY_TABLE", "LATEST_EXPERIMENT", "UserError", "user_errors", "flag_of",
           "tensorflow_environment", "start_tensorflow", "tensorflow_lines", "Duration",
           "Group", "plural", "describe_final", "test_line", "cell", "count", "seconds"]

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
    "--workdir", envvar="NAS_WORKDIR", default=SearchConfig.workdir, show_default=True,
    metavar="DIR",
    help="Where KerasTuner keeps each search's state, so a search resumes.  [env: NAS_WORKDIR]",
)


SPACE = click.option("--space", default="cnn", show_default=True, metavar="NAME|PATH",
                     help="Search space: a built-in name or a YAML file.")


PIPELINE = click.option("--pipeline", default="digits", show_default=True, metavar="NAME|PATH",
                        help="Pipeline: a built-in name or a YAML file.")


LATENCY_TABLE = click.option(
    "--latency-table", default=None, metavar="FILE",
    help="With --max-latency-ms: predict from this per-layer latency table, measured on "
         "another device, instead of this machine's (measured as needed, cached).",
)


PROGRESS = click.option(
    "--progress/--no-progress", envvar="NAS_PROGRESS", default=True, show_default=True,
    help="A line per epoch of each trial: its objective and the time left in the trial "
         "and in the search (updated in place on a terminal).  [env: NAS_PROGRESS=0 "
         "turns it off]",
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
            raise UserError(error.render(flag_of)) from None

    return wrapper


def flag_of(parameter: str) -> str:
    """The flag of a library parameter: the running command's option of that name (or
    spelled so: `format` is --format); a name no option has stays as it was, in backticks
    (a word quoted in a message that is no parameter). Outside a command: --parameter."""
    context = click.get_current_context(silent=True)
    if context is None:
        return "--" + parameter.replace("_", "-")
    spelled = "--" + parameter.replace("_", "-")
    for option in context.command.params:
        if isinstance(option, click.Option) and (option.name == parameter
                                                 or spelled in option.opts):
            return option.opts[0]
    return f"`{parameter}`"


def tensorflow_environment() -> None:
    """Settings TensorFlow reads once, when it starts: set before it is imported. From
    here on, wherever TensorFlow is first imported, its start-up lines are held to the log
    level (`start_tensorflow`)."""
    # Take GPU memory as trials need it, not all of it up front (and let several
    # trials share one GPU); nas.assembly.configure_tensorflow sets it per device too.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # MLflow's INFO lines ("Creating initial MLflow database tables...") are not for users;
    # MLflow reads this when it is imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow draws a progress bar for each artifact it reads back (`nas best`'s layer
    # table) wherever tqdm is installed (LiteRT brings it): not a line of ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # unless the user chose a level
    if "tensorflow" not in sys.modules and not any(
            isinstance(finder, _TensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowFinder())


_started = False  # TensorFlow imported and its devices found (`start_tensorflow`)


def start_tensorflow() -> None:
    """Import TensorFlow and find its devices, its C++ start-up lines held to the log level.

    TensorFlow 2.21 writes them to stderr (absl's "All log messages before
    absl::InitializeLog() is called are written to STDERR", oneDNN's custom operations,
    "Could not find cuda drivers", the CPU instructions it was not built for, a failed
    cuInit) before its logging reads TF_CPP_MIN_LOG_LEVEL, so the variable does not hide
    them. They are caught while TensorFlow starts, and only those at or above the level
    are written: none at the level nas sets when the user did not (3), nor at the user's
    3; more at a lower level the user chose.

    A command may import TensorFlow before this, inside a library call (Keras to read a
    Keras dataset): once `tensorflow_environment` has run, that first import is held the
    same way (`_TensorFlowFinder`).
    """
    global _started
    if _started:
        return
    with _start_up_lines_held():
        import tensorflow as tf

        tf.config.list_logical_devices()
    _started = True


_holding = False  # inside `_start_up_lines_held`


@contextlib.contextmanager
def _start_up_lines_held() -> Iterator[None]:
    """While inside, stderr (file descriptor 2, where TensorFlow's C++ code writes) is
    caught; then only the lines at or above TF_CPP_MIN_LOG_LEVEL are written
    (`tensorflow_lines`). Inside another: nothing more."""
    global _holding
    if _holding:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        _holding = True
        try:
            yield
        finally:
            _holding = False
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            shown = tensorflow_lines(caught.read().decode(errors="replace"),
                                      os.environ["TF_CPP_MIN_LOG_LEVEL"])
            if shown:
                sys.stderr.write(shown)
                sys.stderr.flush()


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds TensorFlow for its first import, wherever that is, and has it run with its
    start-up lines held (`_start_up_lines_held`): on every path of every command, not
    only where `start_tensorflow` is called. Keras and KerasTuner import TensorFlow too."""

    def __init__(self):
        self.finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self.finding or _holding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(name)  # as the other finders find it
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _HeldLoader(spec.loader)
        return spec


class _HeldLoader(importlib.abc.Loader):
    """Runs `loader`'s module with its start-up lines held; the module keeps `loader`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        with _start_up_lines_held():
            self.loader.exec_module(module)


_LOG_PREFIX = re.compile(r"([IWEF])\d{4} ")  # absl/glog: I0000 00:00:... file.cc:12] ...


_SEVERITIES = {"I": 0, "W": 1, "E": 2, "F": 3}  # the levels of TF_CPP_MIN_LOG_LEVEL


def tensorflow_lines(text: str, level: str) -> str:
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


class Group(click.Group):
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


def plural(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def describe_final(trial_ids: list[str], refit: bool = False, flips: bool = False) -> str:
    refitted = ", retrained on training + validation data" if refit else ""
    mirrored = ", over each image and its mirror image" if flips else ""
    if len(trial_ids) == 1:
        return f"trial {trial_ids[0]}{refitted}{mirrored}"
    return (f"ensemble of trials {', '.join(trial_ids)} (their probabilities averaged"
            f"{mirrored}{refitted})")


def test_line(test: dict, trial_ids: list[str], refit: bool = False,
              flips: bool = False) -> str:
    """The final model's held-out score, or why there is none."""
    if not trial_ids:
        return "final model: none (it could not be made; see the warning above)"
    final = describe_final(trial_ids, refit, flips)
    if "test_accuracy" not in test:
        return f"final model: {final}; no test score (no test data: data.test_split is 0)"
    return (f"final model: {final}, test_accuracy {test['test_accuracy']:.4f}  test_loss "
            f"{test['test_loss']:.4f}  on {int(test['test_samples']):,} held-out samples the "
            f"search never saw")


LATEST_EXPERIMENT = click.option(
    "--experiment", default=None, metavar="NAME",
    help="Experiment of the search (its latest search run).  [default: the experiment "
         "searched most recently]",
)


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "y" if value else "n"
    if isinstance(value, list):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def count(value) -> str:
    return "-" if value is None else f"{value:,}"


def seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"
