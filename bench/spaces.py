"""The `space` figure: how long looking at a space takes, however large it is.

    python bench/run.py --only space

The spaces and the commands are those tests/test_space.py checks the answers of (the
tests assert what is printed; the time it takes is measured here, where a busy machine
does not fail a test): counting each built-in space on 32x32x3 inputs, `nas space show`
of a 20-stage space with 9,216 choices per stage (on the digits and on 64x64 images), of
a wider one whose costs can only be bounded (on 224x224 images), and refusing a deep
space nothing in can be trained. Each is timed once, in one fresh process, after a
warm-up that imports what they use.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

BUILTIN = ("cnn", "lenet", "tiny")
COUNT_TARGET, DESCRIBE_TARGET = 5.0, 2.0  # seconds


def figure_space(table, root: Path, run_worker, log) -> None:
    log("space: counting the built-in spaces; describing and refusing 20-stage spaces")
    result, _ = run_worker("space", root, folder=str(root))
    for name in BUILTIN:
        seconds = result["count"][name]
        table.add(f"space: counting {name} on 32x32x3 (s)", f"{seconds:.2f}", "-", "-",
                  f"nas < {COUNT_TARGET:g} s", seconds < COUNT_TARGET)
    for label, seconds in result["describe"].items():
        table.add(f"space: {label} (s)", f"{seconds:.2f}", "-", "-",
                  f"nas < {DESCRIBE_TARGET:g} s", seconds < DESCRIBE_TARGET)
    table.notes.append("space: tests/test_space.py's spaces and commands, each timed once in "
                       "one process after a warm-up; listing the 9,216 ** 20 architectures of "
                       "the 20-stage space, or every option of every stage on every feature "
                       "map it meets (the old way: 73 s for 12 stages), takes far longer")


# --- the worker (in its own process, as bench/run.py runs it) --------------------------


def worker_space(folder: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from click.testing import CliRunner
    from test_space import DEEP, directory_pipeline, write_space

    from nas.cli import main
    from nas.space import analyse, budget_problem
    from nas.specs import Constraints, load_space

    folder = Path(tempfile.mkdtemp(prefix="space-", dir=folder))

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    def show(*args) -> None:
        result = CliRunner().invoke(main, ["space", "show", *map(str, args)])
        if result.exit_code != 0:
            raise RuntimeError(f"nas space show {' '.join(map(str, args))}:\n{result.output}")

    show("tiny", "--samples", "1")  # warm-up: the imports and the digits' signature
    deep = write_space(folder, "deep", DEEP)
    wide = write_space(folder, "wide", DEEP.replace("[1, 3, 5, 7]", "[1, 2, 3, 4, 5, 6, 7]"))
    dead = write_space(folder, "dead", DEEP.replace("{min: 1, max: 20}", "{min: 2, max: 20}")
                       .replace("[same, valid]", "valid").replace("[1, 3, 5, 7]", "7")
                       .replace("[1, 2]", "1").replace("[max, avg, none]", "none"))
    count = {name: timed(lambda: analyse(load_space(name), (32, 32, 3), 10))
             for name in BUILTIN}
    describe = {
        "show a 20-stage space on digits": timed(lambda: show(
            deep, "--pipeline", "digits", "--samples", "1", "--max-params", "100000")),
        "show a 20-stage space on 64x64 images": timed(lambda: show(
            deep, "--pipeline", directory_pipeline(folder, 64), "--samples", "1",
            "--max-params", "100000")),
        "show a space too large to weigh on 224x224": timed(lambda: show(
            wide, "--pipeline", directory_pipeline(folder, 224), "--samples", "0",
            "--max-params", "100000", "--max-flops", "5000000")),
        "refuse a deep space nothing in can train": timed(lambda: budget_problem(
            load_space(str(dead)), (8, 8, 1), 10, Constraints())),
    }
    return {"count": count, "describe": describe}


WORKERS = {"space": worker_space}
