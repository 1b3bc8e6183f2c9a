"""A search's settings: what identifies it must not change between versions of nas.

A search resumes only when its fingerprint matches the one its state file and its run
hold, and its run's params are read back by other versions: these outputs are pinned as
an earlier nas gave them.
"""

import dataclasses

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

EVERY_SETTING = dict(tuner="random", max_trials=5, epochs=2, batch_size=8, seed=3,
                     max_params=5000, max_flops=10**6, ensemble=1, refit=True,
                     mixed_precision=True, time_limit=60.0, max_failures=4, register="m",
                     jit_compile=True, experiment="e", workdir="w", ray="auto")

DEFAULTS = {"space": "pinned", "pipeline": "pinned", "tuner": "evolution", "max_trials": 10,
            "epochs": 5, "batch_size": 16, "seed": 0, "objective": "val_accuracy",
            "max_failures": 3, "max_params": None, "max_flops": None, "mixed_precision": False,
            "jit_compile": False, "ensemble": 3, "refit": False}
GIVEN = {"space": "pinned", "pipeline": "pinned", "tuner": "random", "max_trials": 5,
         "epochs": 2, "batch_size": 8, "seed": 3, "objective": "val_accuracy",
         "max_failures": 4, "max_params": 5000, "max_flops": 1000000, "mixed_precision": True,
         "jit_compile": True, "ensemble": 1, "refit": True}


@pytest.fixture
def specs(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return load_space(str(tmp_path / "s.yaml")), load_pipeline(str(tmp_path / "p.yaml"))


@pytest.mark.parametrize("given, fingerprint, params", [
    ({}, "b66f9e081c1913ff", DEFAULTS),
    (EVERY_SETTING, "dccf58459102d946", GIVEN),
])
def test_settings_are_those_an_earlier_nas_wrote(specs, given, fingerprint, params):
    config = SearchConfig(space=specs[0], pipeline=specs[1], **given)

    assert config.fingerprint() == fingerprint
    assert list(config.params().items()) == list(params.items())  # the order too


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
                           final=FinalModel(ensemble=1), scale=ScaleOut(ray="auto"))

    assert SearchConfig(space=space, pipeline=pipeline, seed=2, max_trials=5, time_limit=60.0,
                        ensemble=1, ray="auto") == grouped
    grown = dataclasses.replace(grouped, max_trials=6)
    assert grown.budget == Budget(max_trials=6, time_limit=60.0)
    assert (grown.final, grown.scale) == (grouped.final, grouped.scale)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_trial'"):
        SearchConfig(space=space, pipeline=pipeline, max_trial=5)


def test_the_cli_defaults_are_the_settings_defaults():
    """`nas search` reads its defaults from the settings' dataclasses."""
    from nas.cli.search import search

    fields = {f.name: f for kind in (SearchConfig, Budget, FinalModel, ScaleOut)
              for f in dataclasses.fields(kind)}
    # --max-trials: none given means as many as --time-limit holds (without it, the
    # budget's default); --distribution none is no distribution (None).
    given = {"max_trials": None, "distribution": "none"}
    context = click.Context(search)  # what the option gives when it is not passed
    checked = set()
    for option in search.params:
        field = fields.get(option.name)
        if field is None or field.default is dataclasses.MISSING:
            continue
        assert option.get_default(context) == given.get(option.name, field.default), option.name
        checked.add(option.name)
    assert {"tuner", "seed", "workdir", "max_failures", "ensemble", "cpus_per_trial",
            "gpus_per_trial", "max_retries"} <= checked
