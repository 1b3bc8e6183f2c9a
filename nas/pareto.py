"""Trade-offs between a search's objective and what its candidates cost.

`pareto_front` keeps the trials no other trial beats: none reaches at least as good an
objective at no greater cost (parameters, FLOPs, or the latency a search run with
`--latency` measured) while being better on one of the two. `plot_tradeoff` draws the
objective against the costs with the fronts marked, using matplotlib's Agg canvas (no
display, no pyplot state), and `log_plot` attaches that plot to a search's MLflow run.

Trials are anything with `trial_id`, `objective`, `params` and `flops` (and `latency`,
in ms, where measured), as attributes or as mapping keys; a trial without an objective
(failed, still running) is left out, and from the latency's front one without a latency.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

__all__ = ["COSTS", "PLOT_FILE", "costs_of", "pareto_front", "front_marks", "plot_tradeoff",
           "log_plot"]

COSTS = ("params", "flops", "latency")
PLOT_FILE = "pareto.png"  # the artifact's name on the search's MLflow run
_LABELS = {"params": "parameters", "flops": "FLOPs", "latency": "latency (ms, batch size 1)"}


def _get(trial: Any, key: str):
    return trial.get(key) if isinstance(trial, dict) else getattr(trial, key, None)


def _scored(trials: Sequence) -> list:
    return [t for t in trials
            if _get(t, "objective") is not None and not math.isnan(_get(t, "objective"))]


def pareto_front(trials: Sequence, cost: str = "params", direction: str = "max") -> list:
    """The trials on the Pareto front of objective vs `cost`, cheapest first.

    Args:
        trials: Objects or mappings with `objective` and `cost`.
        cost: "params", "flops" or "latency".
        direction: "max" when a higher objective is better (accuracy), "min" (loss).

    Two trials with the same cost and objective are both on the front when nothing
    beats them: neither beats the other.
    """
    if cost not in COSTS:
        raise ValueError(f"cost {cost!r} is not one of {list(COSTS)}")
    if direction not in ("max", "min"):
        raise ValueError(f"direction {direction!r} is not one of ['max', 'min']")
    sign = 1.0 if direction == "max" else -1.0
    costed = [t for t in _scored(trials) if _get(t, cost) is not None]
    ranked = sorted(costed, key=lambda t: (_get(t, cost), -sign * _get(t, "objective")))
    front, best, best_cost = [], -math.inf, None
    for trial in ranked:
        score, spent = sign * _get(trial, "objective"), _get(trial, cost)
        if score > best:
            front.append(trial)
            best, best_cost = score, spent
        elif score == best and spent == best_cost:
            front.append(trial)
    return front


def costs_of(trials: Sequence) -> tuple[str, ...]:
    """The costs `trials` have: parameters and FLOPs, and latency where one was measured."""
    return COSTS if any(_get(t, "latency") is not None for t in trials) else COSTS[:2]


def front_marks(trials: Sequence, direction: str = "max") -> list[tuple[str, ...]]:
    """For each trial, in order, the costs (`costs_of`) on whose front it lies."""
    costs = costs_of(trials)
    on = {cost: {id(t) for t in pareto_front(trials, cost, direction)} for cost in costs}
    return [tuple(cost for cost in costs if id(t) in on[cost]) for t in trials]


def plot_tradeoff(trials: Sequence, path, objective: str = "objective",
                  direction: str = "max", title: str | None = None) -> Path:
    """Write a PNG of the objective against parameters, FLOPs and (where measured) latency,
    fronts drawn.

    Args:
        trials: The trials to plot (those without an objective are left out).
        path: Where to write the PNG.
        objective: The objective's name, for the axis label.
        direction: "max" or "min", as for `pareto_front`.
        title: A title above both panels.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = _scored(trials)
    costs = costs_of(scored)
    figure = Figure(figsize=(5.5 * len(costs), 4.5))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.06)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(costs), sharey=True)
    for ax, cost in zip(axes, costs):
        costed = [t for t in scored if _get(t, cost) is not None]
        xs = [_get(t, cost) for t in costed]
        ys = [_get(t, "objective") for t in costed]
        ax.scatter(xs, ys, s=28, color="tab:blue", alpha=0.6, label="trial")
        front = pareto_front(costed, cost, direction)
        if front:
            fx = [_get(t, cost) for t in front]
            fy = [_get(t, "objective") for t in front]
            ax.step(fx, fy, where="post", color="tab:red", linewidth=1.5)
            ax.scatter(fx, fy, s=46, color="tab:red", zorder=3, label="Pareto front")
            for trial, x, y in zip(front, fx, fy):
                ax.annotate(str(_get(trial, "trial_id")), (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(_LABELS[cost])
        ax.grid(True, alpha=0.3)
        if not scored:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center",
                    transform=ax.transAxes)
    axes[0].set_ylabel(f"{objective} ({'higher' if direction == 'max' else 'lower'} is better)")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(title or f"{objective} against cost: {len(scored)} trials")
    path = Path(path)
    figure.savefig(path, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    return path


def log_plot(tracker, run_id: str, trials: Sequence, objective: str, direction: str,
             title: str | None = None) -> None:
    """Attach the trade-off plot to an MLflow run as `pareto.png`; nothing without trials."""
    if not _scored(trials):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = plot_tradeoff(trials, os.path.join(folder, PLOT_FILE), objective, direction,
                             title)
        tracker.log_artifact(run_id, path)
