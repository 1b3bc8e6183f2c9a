"""The space as KerasTuner sees it, and the guard that keeps impossible candidates out."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from nas.architecture import Architecture
from nas.oracles import declare, make_oracle
from nas.specs import Constraints, load_space


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


@pytest.mark.parametrize("tuner", ["evolution", "random", "hyperband", "bayesian", "grid"])
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


# --- evolution, the default strategy ---------------------------------------------------------


def differences(a: dict, b: dict) -> set:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_evolution_starts_from_the_known_good_seeds_snapped_to_the_space(tmp_path):
    space = load_space("cnn")
    first = proposals(guarded("evolution", space), 3, tmp_path)
    assert [v["depth"] for v in first] == [2, 3, 2]
    assert [v["stage_1/filters"] for v in first] == [64, 32, 32]
    assert [v["stage_1/pool"] for v in first] == ["none", "max", "max"]
    # 128 filters is not in the cnn space: the second seed's last stage takes 64
    assert first[1]["stage_3/filters"] == 64 and first[1]["reduce"] == "flatten"
    for values in first:
        assert values["optimizer"] == "adam" and values["learning_rate"] == pytest.approx(1e-3)
        assert values["stage_1/batch_norm"] is True and values["stage_1/padding"] == "same"
        assert values["dense_layers"] == 1 and values["dense_1/units"] == 128
        assert values["dense_1/dropout"] == 0.25
    # a space without some seed values: every seed value is one the space allows
    tiny = load_space("tiny")
    for values in proposals(guarded("evolution", tiny), 3, tmp_path / "tiny"):
        assert values["stage_1/filters"] in (4, 8) and values["learning_rate"] in (0.003, 0.01)
        assert values["stage_1/batch_norm"] is False  # tiny fixes it


def test_evolution_then_moves_one_knob_of_a_good_parent(tmp_path):
    space = load_space("cnn")
    oracle = guarded("evolution", space)
    values = proposals(oracle, 15, tmp_path)
    moves = values[3:]  # after the three known-good seeds
    finished = list(values)
    for move in moves:
        # One knob moved; the knobs it switches on or off (a new stage, a pool's size)
        # come and go with it, and a new stage copies the one before it.
        def moved(parent):
            return {k for k in differences(parent, move) if k in parent and k in move}

        closest = min((v for v in finished if v is not move),
                      key=lambda v: (len(moved(v)), len(differences(v, move))))
        assert len(moved(closest)) <= 1, differences(closest, move)
        if not moved(closest):  # a knob that only switched others on or off
            assert {"depth", "dense_layers"} & differences(closest, move) or any(
                k.endswith("/pool") for k in differences(closest, move))
    assert len({str(sorted(v.items())) for v in values}) == len(values)  # never twice


def test_evolution_same_seed_same_sequence_and_it_resumes_where_it_stopped(tmp_path):
    space = load_space("cnn")
    first = proposals(guarded("evolution", space, seed=3), 8, tmp_path / "a")
    again = proposals(guarded("evolution", space, seed=3), 8, tmp_path / "b")
    assert first == again
    assert first[3:] != proposals(guarded("evolution", space, seed=4), 8, tmp_path / "c")[3:]
    oracle = guarded("evolution", space, seed=3)
    head = proposals(oracle, 5, tmp_path / "d")
    resumed = guarded("evolution", space, seed=3)
    resumed.set_state(oracle.get_state())
    resumed.trials = oracle.trials
    resumed._tried_so_far = oracle._tried_so_far
    tail = proposals(resumed, 3, tmp_path / "d")
    assert head == first[:5] and not set(map(str, tail)) & set(map(str, head))


def test_evolution_keeps_its_moves_within_budget(tmp_path):
    space = load_space("cnn")
    budget = Constraints(max_params=20_000)
    oracle = guarded("evolution", space, budget)
    values = proposals(oracle, 10, tmp_path)
    assert len(values) == 10
    for v in values:
        assert Architecture.from_values(space, v, (8, 8, 1), 10).params <= 20_000
    assert oracle.rejected > 0  # the seeds themselves are over this budget


def test_median_rule_stops_a_trial_worse_than_the_median_of_earlier_curves():
    from nas.tuning import MedianStopping

    curves = [[0.5, 0.7, 0.8, 0.9], [0.6, 0.8, 0.9, 0.95], [0.4, 0.6, 0.7, 0.8]]
    rule = MedianStopping("val_accuracy", "max", grace=2, min_trials=3)
    rule.curves = curves
    assert not rule.should_stop([0.1])  # within the grace period
    # after 2 epochs the running averages are 0.6, 0.7, 0.5: median 0.6
    assert rule.should_stop([0.3, 0.55])
    assert not rule.should_stop([0.3, 0.65])
    # The same curves, but fewer than min_trials of them: a trial this bad goes on.
    fewer = MedianStopping("val_accuracy", "max", grace=2, min_trials=4)
    fewer.curves = curves
    assert rule.should_stop([0.0, 0.0]) and not fewer.should_stop([0.0, 0.0])
    # Only the earlier trials that trained as long count: after 2 epochs all three (running
    # averages 0.5, 0.6, 0.7), after 4 only the last, fewer than min_trials.
    short = MedianStopping("val_accuracy", "max", grace=2, min_trials=2)
    short.curves = [[0.4, 0.6], [0.5, 0.7], [0.6, 0.8, 0.7, 0.7]]
    assert short.should_stop([0.1, 0.1])
    assert not short.should_stop([0.1, 0.1, 0.1, 0.1])
    losses = MedianStopping("val_loss", "min", grace=1, min_trials=1)
    losses.curves = [[1.0, 0.5]]
    assert losses.should_stop([1.2]) and not losses.should_stop([0.9])


@pytest.mark.slow
def test_median_rule_ends_a_real_fit_early_and_learns_its_curve():
    import keras
    import numpy as np

    from nas.tuning import MedianStopping

    rule = MedianStopping("val_accuracy", "max", grace=2, min_trials=1)
    rule.curves = [[1.0] * 10]  # an earlier trial that was perfect from the start
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).random((32, 4)), np.arange(32) % 2
    history = model.fit(x, y, validation_data=(x, 1 - y), epochs=10, verbose=0,
                        callbacks=[rule.callback()])
    assert len(history.history["loss"]) == 2  # stopped once the grace period was over
    assert len(rule.curves) == 2 and len(rule.curves[-1]) == 2
