"""A search's settings: what identifies it must not change between versions of nas.

A search resumes only when its fingerprint matches the one its state file and its run
hold, and its run's params and its workers' settings are read back by other versions:
these outputs are pinned as an earlier nas gave them.
"""

import dataclasses
import types

import click
import pytest

from nas.settings import DEFAULT_TUNER, TUNERS, Budget, FinalModel, ScaleOut, SearchConfig
from nas.specs import load_pipeline, load_space

SPACE = """\
name: pinned
stages:
  depth: {min: 1, max: 2}
  conv:
    filters: [4, 8]
    kernel_size: 3
head:
  reduce: global_avg
optimizer:
  name: adam
  learning_rate: [0.003, 0.01]
"""

PIPELINE = """\
name: pinned
data:
  source: digits
  validation_split: 0.2
  seed: 0
train:
  epochs: 5
  batch_size: 16
objective: val_accuracy
"""

ARRAYS = types.SimpleNamespace(data_digest="d", samples=7)  # as `nas.data.Arrays` has them

EVERY_SETTING = dict(tuner="random", max_trials=5, epochs=2, batch_size=8, seed=3,
                     max_params=5000, max_flops=10**6, ensemble=1, refit=True,
                     mixed_precision=True, time_limit=60.0, max_failures=4, register="m",
                     jit_compile=True, experiment="e", workdir="w", chief="h:1")

SHAS = {"space": "pinned", "space_sha": "77ba979d9b66b868",
        "pipeline": "pinned", "pipeline_sha": "91b0bd1787945b3a"}
DEFAULTS = {**SHAS, "tuner": "evolution", "max_trials": 10, "epochs": 5, "batch_size": 16,
            "seed": 0, "objective": "val_accuracy", "max_failures": 3, "max_params": None,
            "max_flops": None, "mixed_precision": False, "jit_compile": False, "ensemble": 3,
            "refit": False}
GIVEN = {**SHAS, "tuner": "random", "max_trials": 5, "epochs": 2, "batch_size": 8, "seed": 3,
         "objective": "val_accuracy", "max_failures": 4, "max_params": 5000,
         "max_flops": 1000000, "mixed_precision": True, "jit_compile": True, "ensemble": 1,
         "refit": True}
WORKER_KEYS = ("space", "space_sha", "pipeline", "pipeline_sha", "tuner", "max_trials",
               "epochs", "batch_size", "seed", "mixed_precision", "jit_compile")


@pytest.fixture
def specs(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return load_space(str(tmp_path / "s.yaml")), load_pipeline(str(tmp_path / "p.yaml"))


@pytest.mark.parametrize("given, fingerprint, settings, worker_fingerprint", [
    ({}, "b66f9e081c1913ff", DEFAULTS, "ca042cc3f646f504"),
    (EVERY_SETTING, "dccf58459102d946", GIVEN, "dccf58459102d946"),
])
def test_settings_are_those_an_earlier_nas_wrote(specs, given, fingerprint, settings,
                                                  worker_fingerprint):
    config = SearchConfig(space=specs[0], pipeline=specs[1], **given)

    assert config.fingerprint() == fingerprint
    assert list(config.settings().items()) == list(settings.items())  # the order too
    assert config.params() == {k: v for k, v in settings.items() if not k.endswith("_sha")}
    for_workers = config.worker_settings(ARRAYS)
    assert list(for_workers.items()) == [*((k, settings[k]) for k in WORKER_KEYS),
                                         ("data_digest", "d"), ("data_files", 7)]
    worker = config.for_worker(for_workers)
    assert worker.settings() == settings
    assert worker.fingerprint() == worker_fingerprint


def test_the_tuners_are_those_nas_oracles_makes():
    """`nas.settings` names the tuners without importing KerasTuner; `nas.oracles` makes
    them: one registry, the other's list checked against it."""
    from nas import oracles

    assert tuple(oracles.ORACLES) == TUNERS
    assert DEFAULT_TUNER == TUNERS[0] == SearchConfig.tuner


def test_a_groups_settings_given_by_their_own_names_are_that_group(specs):
    space, pipeline = specs
    grouped = SearchConfig(space=space, pipeline=pipeline, seed=2,
                           budget=Budget(max_trials=5, time_limit=60.0),
                           final=FinalModel(ensemble=1), scale=ScaleOut(chief="h:1"))

    assert SearchConfig(space=space, pipeline=pipeline, seed=2, max_trials=5, time_limit=60.0,
                        ensemble=1, chief="h:1") == grouped
    grown = dataclasses.replace(grouped, max_trials=6)
    assert grown.budget == Budget(max_trials=6, time_limit=60.0)
    assert (grown.final, grown.scale) == (grouped.final, grouped.scale)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_trial'"):
        SearchConfig(space=space, pipeline=pipeline, max_trial=5)


def test_the_cli_defaults_are_the_settings_defaults():
    """`nas search` and `nas worker` read their defaults from the settings' dataclasses."""
    from nas.cli.search import search, worker

    fields = {f.name: f for kind in (SearchConfig, Budget, FinalModel, ScaleOut)
              for f in dataclasses.fields(kind)}
    # --max-trials: none given means as many as --time-limit holds (without it, the
    # budget's default); --distribution none is no distribution (None).
    given = {"max_trials": None, "distribution": "none"}
    checked = set()
    for command in (search, worker):
        context = click.Context(command)  # what the option gives when it is not passed
        for option in command.params:
            field = fields.get(option.name)
            if field is None or field.default is dataclasses.MISSING or option.required:
                continue
            default = option.get_default(context)
            assert default == given.get(option.name, field.default), option.name
            checked.add(option.name)
    assert {"tuner", "seed", "workdir", "max_failures", "ensemble",
            "worker_timeout"} <= checked
