"""Looking at a space before searching it: exact counts, costs, samples and budgets."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from nas.architecture import Architecture, Builder, Impossible, hyperparameter_specs
from nas.cli import main
from nas.space import analyse, budget_problem, sample
from nas.specs import Constraints, builtin_spaces, load_space

SMALL_SPACES = {
    # Three stages; pool size is chosen only when a stage pools: a conditional knob.
    "pools": """
        stages:
          depth: {min: 1, max: 3}
          conv: {filters: 2, kernel_size: [1, 3], padding: valid, stride: [1, 2]}
          pool: {type: [max, none], size: [2, 3], stride: 2}
        head: {reduce: [flatten, global_max]}
        optimizer: {name: [adam, sgd], learning_rate: 0.01}
    """,
    # Pool strides chosen apart from pool sizes, both padding modes.
    "strides": """
        stages:
          depth: 2
          conv: {filters: [2, 3], kernel_size: [1, 3], padding: [same, valid]}
          pool: {type: [avg, none], size: 2, stride: [1, 2]}
        head: {reduce: [flatten, global_avg]}
        optimizer: {name: adam, learning_rate: 0.01}
    """,
    # Dense layers 0..2, each with its own units and a stepped dropout; batch norm and
    # pointwise convs change the costs, not the shapes.
    "dense": """
        stages:
          depth: [1, 2]
          conv: {filters: [4], kernel_size: [3, 5], padding: valid, batch_norm: [false, true]}
          pointwise: [false, true]
          pool: {type: none}
        head:
          reduce: [flatten, global_avg]
          dense:
            layers: {min: 0, max: 2}
            units: [8, 16]
            dropout: {min: 0.0, max: 0.5, step: 0.5}
        optimizer: {name: adam, learning_rate: {min: 0.0001, max: 0.01, sampling: log}}
    """,
    # Stacked convs per stage: with valid padding each shrinks the map, so the count of
    # convs decides what fits; separable convs change the costs, not the shapes.
    "stacked": """
        stages:
          depth: {min: 1, max: 2}
          conv: {filters: 3, convs: [1, 2, 3], kernel_size: [1, 3], padding: [same, valid],
                 stride: 2, batch_norm: [false, true], separable: [false, true]}
          pool: {type: [max, none], size: 2}
        head: {reduce: [flatten, global_avg]}
        optimizer: {name: adam, learning_rate: 0.01}
    """,
    # A continuous dropout range cannot be counted: it is left out, counted once.
    "continuous": """
        stages:
          depth: 2
          conv: {filters: [2, 4], kernel_size: [3, 7], padding: [same, valid], stride: [1, 3]}
        head:
          dense: {layers: [0, 1], units: [5], dropout: {min: 0.1, max: 0.4}}
        optimizer: {name: [sgd, rmsprop, adam], learning_rate: [0.1, 0.01]}
    """,
}


def write_space(folder, name: str, text: str):
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def brute_force(space, input_shape, num_classes=10):
    """Build every architecture of `space` one by one: the reference `analyse` must match."""
    specs = [s for s in hyperparameter_specs(space) if s.name not in ("optimizer", "learning_rate")]

    def assignments(index, chosen):
        if index == len(specs):
            yield dict(chosen)
            return
        spec = specs[index]
        if not all(chosen.get(parent) in allowed for parent, allowed in spec.conditions):
            yield from assignments(index + 1, chosen)
            return
        for value in spec.knob.values() or [spec.knob.min]:
            chosen[spec.name] = value
            yield from assignments(index + 1, chosen)
        del chosen[spec.name]

    training = {"optimizer": space.optimizer.lowest(),
                "learning_rate": space.learning_rate.lowest()}
    return [Architecture.from_values(space, {**values, **training}, input_shape, num_classes)
            for values in assignments(0, {})]


def pareto_of(points):
    return sorted(p for p in set(points)
                  if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points))


@pytest.mark.parametrize("name", sorted(SMALL_SPACES))
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (5, 7, 3), (3, 3, 1)])
def test_counts_and_costs_match_brute_force_enumeration(tmp_path, name, input_shape):
    space = load_space(str(write_space(tmp_path, name, SMALL_SPACES[name])))
    every = brute_force(space, input_shape)
    possible = [a for a in every if not a.impossible]

    report = analyse(space, input_shape, 10)

    assert report.architectures == len(every)
    assert report.impossible == len(every) - len(possible)
    assert dict(report.impossible_reasons) == collections.Counter(
        a.impossible for a in every if a.impossible)
    assert report.possible == len(possible)
    if possible:
        assert report.min_params == min(a.params for a in possible)
        assert report.max_params == max(a.params for a in possible)
        assert report.min_flops == min(a.flops for a in possible)
        assert report.max_flops == max(a.flops for a in possible)
        assert list(report.front) == pareto_of([(a.params, a.flops) for a in possible])
    else:
        assert report.front == () and report.max_params is None


def test_the_small_spaces_really_exercise_impossible_candidates(tmp_path):
    space = load_space(str(write_space(tmp_path, "pools", SMALL_SPACES["pools"])))
    report = analyse(space, (8, 8, 1), 10)
    assert 0 < report.impossible < report.architectures
    assert sum(report.impossible_by_stage().values()) == report.impossible
    assert all(why.startswith("stage ") for why, _ in report.impossible_reasons)


def test_continuous_knobs_are_named_and_left_out_of_the_count(tmp_path):
    report = analyse(load_space(str(write_space(tmp_path, "c", SMALL_SPACES["continuous"]))),
                     (8, 8, 1), 10)
    assert report.left_out == ("dropout: continuous, linear from 0.1 to 0.4",)
    assert report.training_settings == 6
    assert report.candidates == report.architectures * 6

    lenet = analyse(load_space("lenet"), (8, 8, 1), 10)
    assert lenet.left_out == ("learning_rate: continuous, log from 0.0005 to 0.005",)
    assert lenet.architectures == 3 * 3 * 2 * 2 * 2 * 2 * 2 * 2 * 2 * 2  # 2 stages, 2 dense


@pytest.mark.parametrize("name", builtin_spaces())
def test_every_builtin_space_is_counted(name):
    # How long it takes is a benchmark figure: bench/run.py --only space.
    report = analyse(load_space(name), (32, 32, 3), 10)
    assert report.possible > 0 and report.min_params <= report.max_params


def test_cnn_is_counted_exactly_by_structure():
    report = analyse(load_space("cnn"), (8, 8, 1), 10)
    per_stage = 3 * 2 * 2 * 2 * 2 * 2 * 3  # filters, kernel, stride, padding, bn, pointwise, pool
    head = 3 * (1 + 3 * 3 + (3 * 3) ** 2)  # reduce x (0, 1 or 2 dense layers of units x dropout)
    assert report.architectures == head * sum(per_stage ** d for d in (1, 2, 3))
    assert report.training_settings == 2
    # On 8x8 inputs, a stride-2 conv and a pool each halve the map: deep stacks collapse.
    assert report.impossible_by_stage()[2] > 0 and report.impossible_by_stage()[3] > 0


def test_samples_are_drawn_like_a_random_search_and_skip_what_cannot_be_trained():
    space = load_space("tiny")
    found, rejected = sample(space, (8, 8, 1), 10, 20, seed=3,
                             constraints=Constraints(max_params=1500))
    assert len(found) == 20 and rejected > 0
    assert all(not a.impossible and a.params <= 1500 for a in found)
    again, _ = sample(space, (8, 8, 1), 10, 20, seed=3, constraints=Constraints(max_params=1500))
    assert [a.values for a in again] == [a.values for a in found]


def test_budget_problem_names_the_budget_and_the_smallest_reachable():
    space = load_space("tiny")
    assert budget_problem(space, (8, 8, 1), 10, Constraints(max_params=90)) is None
    assert budget_problem(space, (8, 8, 1), 10, Constraints(max_params=89),
                          {"max_params": "--max-params"}) == (
        "--max-params 89: no candidate of search_spaces/tiny.yaml fits on 8x8x1 inputs; "
        "the smallest the space reaches is 90 parameters and 2,960 FLOPs")


def test_budget_problem_when_every_candidate_is_impossible(tmp_path):
    path = write_space(tmp_path, "big", """
        stages: {depth: 1, conv: {filters: 4, kernel_size: [9, 11], padding: valid}}
        head: {reduce: flatten}
        optimizer: {name: adam, learning_rate: 0.01}
    """)
    problem = budget_problem(load_space(str(path)), (8, 8, 1), 10, Constraints())
    assert problem == (f"{path}: every one of the 2 architectures is impossible on 8x8x1 "
                       f"inputs (e.g. stage 1: a 11x11 conv with valid padding and stride 1 does "
                       f"not fit the 8x8 feature map)")


# --- the command line ----------------------------------------------------------------


def test_space_show_prints_counts_reasons_costs_and_sampled_tables():
    result = CliRunner().invoke(main, ["space", "show", "tiny", "--samples", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("space tiny (search_spaces/tiny.yaml) on pipeline digits: "
                          "8x8x1 inputs, 10 classes\n")
    assert "architectures      1,088 " in out
    assert "impossible         208 (19.1%) on 8x8x1 inputs" in out
    assert "stage 2 collapses in 208" in out
    assert "a 5x5 conv with valid padding and stride 1 does not fit the 4x4 feature map" in out
    assert "parameters         90 to 10,194" in out
    assert "FLOPs              2,960 to 248,128" in out
    assert out.count("\ncandidate ") == 2 and out.count("layer         type") == 2


def test_space_show_with_a_budget_nothing_fits():
    result = CliRunner().invoke(main, ["space", "show", "tiny", "--max-params", "50"])
    assert result.exit_code == 0
    assert "budget             max_params 50: no candidate fits" in result.output
    assert "candidate 1" not in result.output


def test_space_show_works_on_a_directory_pipeline_without_reading_images(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / "data" / name).mkdir(parents=True)
    (tmp_path / "p.yaml").write_text("data: {source: directory, path: data, "
                                     "image_size: [20, 24], color_mode: rgb}\n")
    result = CliRunner().invoke(main, ["space", "show", "cnn", "--pipeline",
                                       str(tmp_path / "p.yaml"), "--samples", "1"])
    assert result.exit_code == 0, result.output
    assert "20x24x3 inputs, 3 classes" in result.output


@pytest.mark.parametrize("text, message", [
    ("stages: {depth: 1, conv: {filters: 4, kernel_size: 3, padding: full}}\n"
     "head: {}\noptimizer: {name: adam, learning_rate: 0.01}\n",
     "stages.conv.padding: 'full' is not one of ['same', 'valid']"),
    ("stages: {depth: 1}\nhead: {}\noptimizer: {name: adam, learning_rate: 0.01}\n",
     "stages.conv: is required"),
    ("stages: [1\n", "not valid YAML"),
])
def test_space_show_reports_the_same_spec_errors_as_search(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    runner = CliRunner()
    shown = runner.invoke(main, ["space", "show", str(path)])
    searched = runner.invoke(main, ["search", "--space", str(path)])
    assert shown.exit_code == searched.exit_code == 2
    assert shown.output == searched.output
    assert shown.output.startswith(f"Error: {path}: ") and message in shown.output
    assert shown.output.count("\n") == 1


def test_space_show_imports_no_tensorflow():
    code = ("import sys\nfrom nas.cli import main\n"
            "try:\n    main(['space', 'show', 'cnn', '--samples', '1'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "architectures      6,544,111,392" in done.stdout


# --- budgets in a search ---------------------------------------------------------------


@pytest.mark.new_store
def test_a_budget_nothing_fits_is_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--max-params", "60",
                                       "--max-trials", "2", "--epochs", "2"])
    assert result.exit_code == 2
    assert result.output == (
        "Error: --max-params 60: no candidate of search_spaces/tiny.yaml fits on 8x8x1 "
        "inputs; the smallest the space reaches is 90 parameters and 2,960 FLOPs\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, mlruns, .nas


@pytest.mark.new_store
def test_budgets_from_the_space_are_named_when_refused(tmp_path):
    text = (load_space("tiny").text + "constraints: {max_params: 5000, max_flops: 1000}\n")
    path = tmp_path / "budget.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["search", "--space", str(path), "--max-params", "8000"])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {path}: constraints.max_params 5,000 and {path}: constraints.max_flops 1,000: "
        f"no candidate of {path} fits on 8x8x1 inputs; the smallest the space reaches is "
        f"90 parameters and 2,960 FLOPs\n")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.new_store
def test_a_space_of_impossible_candidates_is_refused_before_anything_is_written(tmp_path):
    path = write_space(tmp_path, "big", """
        stages: {depth: 1, conv: {filters: 4, kernel_size: 9, padding: valid}}
        head: {reduce: flatten}
        optimizer: {name: adam, learning_rate: 0.01}
    """)
    result = CliRunner().invoke(main, ["search", "--space", str(path)])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {path}: every one of the 1 architectures is "
                                    f"impossible on 8x8x1 inputs (e.g. stage 1: a 9x9 conv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml"]


@pytest.mark.new_store
def test_a_budget_below_one_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--max-flops", "0"],
                                prog_name="nas")
    assert result.exit_code == 2
    assert result.output == ("Error: Invalid value for '--max-flops': 0 is not in the range "
                             "x>=1. (see 'nas search --help')\n")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_search_under_a_tight_budget_trains_only_candidates_within_it(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--max-trials", "2", "--epochs", "2",
        "--max-params", "800", "--max-flops", "20000", "--tracking-uri", uri, "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "2 trials finished, 0 failed" in result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-digits")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("nas.kind") == "trial"]
    (search,) = [r for r in runs if r.data.tags.get("nas.kind") == "search"]
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["params"] <= 800 and run.data.metrics["flops"] <= 20000
    rejected = search.data.metrics["rejected_candidates"]
    assert rejected > 0  # most of tiny is over this budget: rejected, never trials
    assert f"{int(rejected)} candidates rejected before training" in result.output
    # The trade-off plot rides on the search's run.
    artifacts = [a.path for a in client.list_artifacts(search.info.run_id)]
    assert "pareto.png" in artifacts


# --- deep spaces: counted at once, bounded where exactness is dear ----------------------

# 20 stages of 8 x 4 x 2 x 2 x 2 x 2 x 2 x 9 = 9,216 options each.
DEEP = """
    stages:
      depth: {min: 1, max: 20}
      conv:
        filters: [8, 16, 24, 32, 48, 64, 96, 128]
        kernel_size: [1, 3, 5, 7]
        stride: [1, 2]
        padding: [same, valid]
        activation: [relu, gelu]
        batch_norm: [false, true]
      pointwise: [false, true]
      pool: {type: [max, avg, none], size: [2, 3], stride: [1, 2]}
    head:
      reduce: [flatten, global_avg, global_max]
      dense: {layers: {min: 0, max: 2}, units: [64, 128, 256], dropout: [0.0, 0.25, 0.5]}
    optimizer: {name: [adam, sgd], learning_rate: {min: 0.0001, max: 0.01, sampling: log}}
"""
DEEP_PER_STAGE = 8 * 4 * 2 * 2 * 2 * 2 * 2 * (1 + 2 * 2 * 2)
DEEP_HEADS = 3 * (1 + 9 + 9 ** 2)


def directory_pipeline(folder, size: int):
    """A `directory` pipeline of `size`x`size` RGB images in 2 (empty) class folders."""
    for name in ("a", "b"):
        (folder / "images" / name).mkdir(parents=True, exist_ok=True)
    path = folder / f"p{size}.yaml"
    path.write_text(f"data: {{source: directory, path: images, image_size: {size}, "
                    f"color_mode: rgb}}\n")
    return str(path)


@pytest.mark.parametrize("inputs", ["digits", 64])
def test_a_20_stage_space_with_thousands_of_choices_per_stage_is_described(tmp_path, inputs):
    # Without listing its 9,216 ** 20 architectures: how long it takes is a benchmark
    # figure (bench/run.py --only space).
    path = write_space(tmp_path, "deep", DEEP)
    pipeline = inputs if inputs == "digits" else directory_pipeline(tmp_path, inputs)
    result = CliRunner().invoke(main, ["space", "show", str(path), "--pipeline", pipeline,
                                       "--samples", "1", "--max-params", "100000"])
    assert result.exit_code == 0, result.output
    total = DEEP_HEADS * sum(DEEP_PER_STAGE ** depth for depth in range(1, 21))
    assert f"architectures      {total:,} " in result.output
    assert "stage 20 collapses in" in result.output
    assert "\nparameters         " in result.output and "(bounds" not in result.output
    assert "budget             max_params 100,000: some candidates fit" in result.output
    assert "\ncandidate 1: " in result.output


def exhaustive_program(space, input_shape, num_classes=10):
    """(front, max params, max FLOPs) as `analyse` once found them: every option of every
    stage built on every feature-map shape it meets, fronts never thinned."""
    specs = [s for s in hyperparameter_specs(space) if s.name not in ("optimizer",
                                                                        "learning_rate")]

    def assignments(chosen_specs):
        names, out = {s.name for s in chosen_specs}, [{}]
        for spec in chosen_specs:
            grown = []
            for chosen in out:
                if all(chosen.get(p) in allowed for p, allowed in spec.conditions if p in names):
                    grown += [{**chosen, spec.name: v} for v in spec.knob.values()]
                else:
                    grown.append(chosen)
            out = grown
        return out

    def prune(points):
        front, best = [], None
        for p, f in sorted(set(points)):
            if best is None or f < best:
                front.append((p, f))
                best = f
        return front

    def cost(builder):
        return (sum(layer.params for layer in builder.layers),
                sum(layer.flops for layer in builder.layers))

    stage = [s for s in specs if s.name.startswith("stage_1/")]
    heads = assignments([s for s in specs if s.name == "reduce" or s.name.startswith("dense_")])
    depths = set(space.depth.values())
    level = {tuple(input_shape): ([(0, 0)], 0, 0)}
    final, most_params, most_flops = [], None, None
    for number in range(1, max(depths) + 1):
        reached = collections.defaultdict(lambda: ([], -1, -1))
        for shape, (front, top_params, top_flops) in level.items():
            for option in assignments(stage):
                builder = Builder(shape)
                try:
                    builder.stage(number, {name.replace("stage_1/", f"stage_{number}/"): v
                                           for name, v in option.items()})
                except Impossible:
                    continue
                params, flops = cost(builder)
                points, p, f = reached[builder.shape]
                reached[builder.shape] = (points + [(a + params, b + flops) for a, b in front],
                                          max(p, top_params + params), max(f, top_flops + flops))
        level = {shape: (prune(points), p, f) for shape, (points, p, f) in reached.items()}
        if number in depths:
            for shape, (front, top_params, top_flops) in level.items():
                for head in heads:
                    builder = Builder(shape)
                    builder.head(head, num_classes)
                    params, flops = cost(builder)
                    final += [(a + params, b + flops) for a, b in front]
                    most_params = max(most_params or 0, top_params + params)
                    most_flops = max(most_flops or 0, top_flops + flops)
    return prune(final), most_params, most_flops


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (16, 16, 1)])
def test_a_20_stage_space_is_weighed_exactly_as_the_exhaustive_program_weighs_it(
        tmp_path, input_shape):
    # At least 16 stages: a valid 2x2 or 3x3 conv shrinks the map (more parameters,
    # fewer FLOPs downstream), so the front holds more than the cheapest candidate.
    space = load_space(str(write_space(tmp_path, "deep", """
        stages:
          depth: {min: 16, max: 20}
          conv:
            filters: [2, 3]
            kernel_size: [1, 2, 3]
            padding: valid
            batch_norm: [false, true]
          pool: {type: [max, none], size: 2}
        head: {reduce: [flatten, global_avg], dense: {layers: [0, 1], units: [4, 8]}}
        optimizer: {name: adam, learning_rate: 0.01}
    """)))
    front, most_params, most_flops = exhaustive_program(space, input_shape)

    report = analyse(space, input_shape, 10)

    assert report.costs_exact and report.front_exact
    assert list(report.front) == front and len(front) > 1
    assert (report.max_params, report.max_flops) == (most_params, most_flops)


def dominated(point, front):
    return any(p <= point[0] and f <= point[1] for p, f in front)


# Whether one point per feature map is fewer than the front holds somewhere.
THINNED = {"pools": True, "strides": True, "dense": False, "continuous": False,
           "stacked": False}


@pytest.mark.parametrize("name", sorted(SMALL_SPACES))
def test_thinned_fronts_and_bounded_costs_never_rule_out_what_fits(tmp_path, monkeypatch,
                                                                   name):
    import nas.costs

    space = load_space(str(write_space(tmp_path, name, SMALL_SPACES[name])))
    possible = [a for a in brute_force(space, (8, 8, 1)) if not a.impossible]
    costs = {(a.params, a.flops) for a in possible}
    exact = analyse(space, (8, 8, 1), 10)

    thinned = analyse(space, (8, 8, 1), 10, work=1)  # one point per feature map
    monkeypatch.setattr(nas.costs, "EXACT_WORK", 0)  # too large to weigh exactly
    bounded = analyse(space, (8, 8, 1), 10)

    for report in (thinned, bounded):
        assert (report.architectures, report.impossible_reasons) == (
            exact.architectures, exact.impossible_reasons)  # counts stay exact
        assert all(dominated(cost, report.front) for cost in costs)
        assert all(report.fits(Constraints(p, f)) for p, f in costs)
        assert set(report.reached) <= costs
    assert thinned.costs_exact and thinned.front_exact is not THINNED[name]
    assert (thinned.min_params, thinned.max_params, thinned.min_flops, thinned.max_flops) == (
        exact.min_params, exact.max_params, exact.min_flops, exact.max_flops)
    assert not bounded.costs_exact and not bounded.front_exact and bounded.reached == ()
    assert bounded.min_params <= exact.min_params and bounded.min_flops <= exact.min_flops
    assert bounded.max_params >= exact.max_params and bounded.max_flops >= exact.max_flops


def test_a_space_too_large_to_weigh_exactly_gets_bounds_that_say_so(tmp_path):
    path = write_space(tmp_path, "deep", DEEP.replace("[1, 3, 5, 7]", "[1, 2, 3, 4, 5, 6, 7]"))
    pipeline = directory_pipeline(tmp_path, 224)
    result = CliRunner().invoke(main, ["space", "show", str(path), "--pipeline", pipeline,
                                       "--samples", "0", "--max-params", "100000",
                                       "--max-flops", "5000000"])
    assert result.exit_code == 0, result.output
    assert "\nparameters         at least " in result.output
    assert "\nFLOPs              at least " in result.output
    assert ("  (bounds, not the exact range: the space is too large to weigh its costs "
            "exactly; the counts above are exact)") in result.output
    assert ("budget             max_params 100,000, max_flops 5,000,000: some candidates may "
            "fit (an estimate from bounds: the space is too large to check this budget "
            "exactly; only what cannot fit is ruled out)") in result.output


def test_bounds_still_refuse_what_cannot_fit_and_say_they_are_bounds(monkeypatch):
    import nas.costs

    monkeypatch.setattr(nas.costs, "EXACT_WORK", 0)
    space = load_space("tiny")
    assert budget_problem(space, (8, 8, 1), 10, Constraints(max_params=90)) is None
    assert budget_problem(space, (8, 8, 1), 10, Constraints(max_params=89)) == (
        "max_params 89: no candidate of search_spaces/tiny.yaml fits on 8x8x1 inputs; the "
        "smallest the space reaches is at least 90 parameters and at least 2,960 FLOPs")


@pytest.mark.new_store
def test_a_deep_space_nothing_in_can_be_trained_is_refused_at_once(tmp_path):
    # From stage 2 on, a valid 7x7 conv meets a 2x2 map: every architecture collapses.
    path = write_space(tmp_path, "deep", DEEP.replace("{min: 1, max: 20}", "{min: 2, max: 20}")
                       .replace("[same, valid]", "valid").replace("[1, 3, 5, 7]", "7")
                       .replace("[1, 2]", "1").replace("[max, avg, none]", "none"))
    problem = budget_problem(load_space(str(path)), (8, 8, 1), 10, Constraints())
    assert problem.startswith(f"{path}: every one of the ")
    assert problem.endswith(" architectures is impossible on 8x8x1 inputs (e.g. stage 2: a "
                            "7x7 conv with valid padding and stride 1 does not fit the 2x2 "
                            "feature map)")

    result = CliRunner().invoke(main, ["search", "--space", str(path)])
    assert result.exit_code == 2
    assert result.output == f"Error: {problem}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.yaml"]


@pytest.mark.new_store
def test_a_budget_below_a_deep_space_is_refused_at_once(tmp_path):
    path = write_space(tmp_path, "deep", DEEP)
    smallest = analyse(load_space(str(path)), (8, 8, 1), 10)
    result = CliRunner().invoke(main, ["search", "--space", str(path), "--max-params", "50"])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: --max-params 50: no candidate of {path} fits on 8x8x1 inputs; the smallest "
        f"the space reaches is {smallest.min_params:,} parameters and "
        f"{smallest.min_flops:,} FLOPs\n")
    assert smallest.costs_exact and smallest.min_params > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.yaml"]


@pytest.mark.parametrize("scale", [None, 8.0])
def test_the_digits_are_known_without_reading_them_as_search_reads_them(tmp_path, scale):
    from nas.data import load_arrays
    from nas.space import input_signature
    from nas.specs import load_pipeline

    pipeline = load_pipeline("digits")
    if scale:
        (tmp_path / "d.yaml").write_text(f"data: {{source: digits, pixel_scale: {scale}}}\n")
        pipeline = load_pipeline(str(tmp_path / "d.yaml"))
    arrays = load_arrays(pipeline)
    assert input_signature(pipeline) == (arrays.input_shape, arrays.num_classes,
                                         arrays.pixel_scale)


def test_augmentation_knobs_are_counted_as_training_settings(tmp_path):
    from nas.space import analyse, describe
    from nas.specs import load_space

    text = (Path(__file__).parent.parent / "search_spaces" / "tiny.yaml").read_text()
    plain = load_space("tiny")
    path = tmp_path / "augmented.yaml"
    path.write_text(text + "augment:\n  flip: [none, horizontal]\n  zoom: [0.0, 0.1, 0.2]\n"
                           "  rotation: {min: 0.0, max: 0.2}\n")
    before, after = analyse(plain, (8, 8, 1), 10), analyse(load_space(str(path)), (8, 8, 1), 10)
    assert after.architectures == before.architectures  # no layer that changes the network
    assert after.training_settings == before.training_settings * 6
    shown = describe(after)
    assert f"x {after.training_settings:,} optimizer and augmentation settings" in shown
    assert "not counted: rotation: continuous, linear from 0 to 0.2" in shown
