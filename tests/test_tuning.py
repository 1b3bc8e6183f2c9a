"""The space as KerasTuner sees it, and the guard that keeps impossible candidates out."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from nas.architecture import Architecture
from nas.specs import Constraints, load_space
from nas.tuning import declare, make_oracle


def test_whole_space_is_declared_up_front_with_conditions():
    hp = declare(load_space("cnn"))
    names = {p.name for p in hp.space}
    assert {"depth", "stage_1/filters", "stage_3/kernel_size", "stage_3/pool_size",
            "dense_2/units", "dense_2/dropout", "optimizer", "learning_rate"} <= names
    by_name = {p.name: p for p in hp.space}
    (condition,) = by_name["stage_3/filters"].conditions
    assert condition.name == "depth" and list(condition.values) == [3]
    (condition,) = by_name["stage_2/stride"].conditions
    assert list(condition.values) == [2, 3]
    pool_size_conditions = {c.name: list(c.values) for c in by_name["stage_1/pool_size"].conditions}
    assert pool_size_conditions == {"depth": [1, 2, 3], "stage_1/pool": ["max", "avg"]}
    assert by_name["learning_rate"].sampling == "log"


def test_conditional_knobs_are_active_only_when_the_depth_reaches_them():
    hp = declare(load_space("cnn"))
    hp.values["depth"] = 1
    assert hp.is_active("stage_1/filters")
    assert not hp.is_active("stage_2/filters")
    hp.values["depth"] = 3
    assert hp.is_active("stage_3/filters")


def guarded(tuner, space, constraints=Constraints(), seed=0, max_trials=30):
    hp = declare(space)

    def check(values):
        return Architecture.from_values(space, values, (8, 8, 1), 10).rejection(constraints)

    return make_oracle(tuner, hp, kt.Objective("val_accuracy", "max"), max_trials=max_trials,
                       seed=seed, max_epochs=4, max_failures=3, check=check)


def proposals(oracle, count, folder):
    """Run `count` trials through the oracle's life cycle, as a tuner would; their values."""
    oracle._set_project_dir(str(folder), "project")
    out = []
    for _ in range(count):
        trial = oracle.create_trial("tuner0")
        if trial.status != "RUNNING":
            break
        values = dict(trial.hyperparameters.values)
        out.append(values)
        score = (sum(map(ord, str(sorted(values.items())))) % 97) / 97  # any fixed score
        oracle.update_trial(trial.trial_id, {"val_accuracy": score})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    return out


@pytest.mark.parametrize("tuner", ["random", "hyperband", "bayesian", "grid"])
def test_guard_never_proposes_an_impossible_candidate(tuner, tmp_path):
    space = load_space("cnn")
    oracle = guarded(tuner, space)
    values = proposals(oracle, 25, tmp_path)
    assert len(values) >= 5
    for v in values:
        assert Architecture.from_values(space, v, (8, 8, 1), 10).impossible is None
    assert len(values) == len({str(sorted(v.items())) for v in values})  # no repeats
    if tuner == "random":
        assert oracle.rejected > 0  # the cnn space on 8x8 inputs holds impossible candidates


def test_guard_keeps_candidates_within_budget(tmp_path):
    space = load_space("cnn")
    oracle = guarded("random", space, Constraints(max_params=5_000, max_flops=100_000))
    for v in proposals(oracle, 15, tmp_path):
        a = Architecture.from_values(space, v, (8, 8, 1), 10)
        assert a.params <= 5_000 and a.flops <= 100_000


def test_same_seed_same_sequence_other_seed_other_sequence(tmp_path):
    space = load_space("cnn")
    first = proposals(guarded("random", space, seed=7), 6, tmp_path / "a")
    again = proposals(guarded("random", space, seed=7), 6, tmp_path / "b")
    other = proposals(guarded("random", space, seed=8), 6, tmp_path / "c")
    assert first == again
    assert first != other


def test_rejections_survive_a_save_and_reload(tmp_path):
    space = load_space("cnn")
    oracle = guarded("random", space)
    proposals(oracle, 10, tmp_path)
    state = oracle.get_state()
    fresh = guarded("random", space)
    fresh.set_state(state)
    assert fresh.rejected == oracle.rejected > 0
