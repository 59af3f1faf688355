"""Which eval metrics a recipe's evaluations produce, so that a watched metric (early_stopping.metric,
checkpoint.keep_best) that no evaluation would write fails at `launch plan` instead of silently never stopping or
never keeping anything. Torch-free.

The table is the one place to extend: a task or an eval setting that adds metrics appends a `Producer` (what
produces them, when, and the setting that turns it on) to `PRODUCERS`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from launcher.common.metrics import METRIC_MODES
from launcher.config.recipe import Problem
from launcher.config.schema import Recipe


def has_eval_data(recipe: Recipe) -> bool:
    """The recipe evaluates on held-out rows: data.eval sources, or a fraction of the training rows."""
    return bool(recipe.data.eval) or recipe.data.eval_fraction > 0


@dataclass(frozen=True)
class Producer:
    """Metrics one part of the evaluation writes into metrics.jsonl, and when it runs."""

    metrics: tuple[str, ...]
    """The metrics.jsonl keys it writes (`eval_loss`, ...)."""

    active: Callable[[Recipe], bool]
    """Whether the recipe turns it on."""

    setting: str
    """What turns it on, as a hint to the user (`set eval.exact_match: true`)."""


PRODUCERS: list[Producer] = [
    Producer(("eval_loss", "eval_perplexity"), has_eval_data, "add data.eval sources or set data.eval_fraction"),
    Producer(("eval_exact_match",), lambda r: r.eval.exact_match and has_eval_data(r), "set eval.exact_match: true "
             "(with held-out data: data.eval or data.eval_fraction)"),
]
"""Every source of eval metrics, by recipe setting. Task metrics are added by the task's module."""


def produced_metrics(recipe: Recipe) -> set[str]:
    """The eval metrics the recipe's evaluations write."""
    return {name for producer in PRODUCERS if producer.active(recipe) for name in producer.metrics}


def metric_problems(recipe: Recipe, path: str, metric: str) -> list[Problem]:
    """Problems with watching `metric` (at key `path`): unknown to METRIC_MODES, or not produced by this recipe."""
    if metric not in METRIC_MODES:  # the schema refuses these already; kept for recipes built without it
        close = difflib.get_close_matches(metric, list(METRIC_MODES), n=1)
        return [Problem(path, f"{metric!r} is not an eval metric",
                        hint=f"did you mean {close[0]}?" if close else f"one of {', '.join(sorted(METRIC_MODES))}")]
    if metric in produced_metrics(recipe):
        return []
    ways = [p.setting for p in PRODUCERS if metric in p.metrics]
    produced = ", ".join(sorted(produced_metrics(recipe))) or "none"
    hint = "; or ".join(ways) if ways else f"watch one of {produced}" if produced != "none" else "add eval data"
    return [Problem(path, f"{metric} is watched but no evaluation of this recipe writes it (it writes: {produced})",
                    hint=hint)]
