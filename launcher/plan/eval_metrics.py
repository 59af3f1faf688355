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

from launcher.common.metrics import CLASSIFICATION_KEYS, ENTITY_KEYS, GENERATION_KEYS, METRIC_MODES
from launcher.config.recipe import Problem
from launcher.config.schema import Recipe


def has_eval_data(recipe: Recipe) -> bool:
    """The recipe evaluates on held-out rows: data.eval sources, or a fraction of the training rows."""
    return bool(recipe.data.eval) or recipe.data.eval_fraction > 0


def task_type(recipe: Recipe) -> str:
    """The recipe's task (`task.type`, or a bare `task:` string); causal_lm for recipes without one."""
    task = getattr(recipe, "task", None)
    return str(getattr(task, "type", task) or "causal_lm")


def generates(recipe: Recipe) -> bool:
    """Evaluation generates answers: seq2seq always, causal_lm with eval.exact_match."""
    task = task_type(recipe)
    return has_eval_data(recipe) and (task == "seq2seq" or (task == "causal_lm" and recipe.eval.exact_match))


@dataclass(frozen=True)
class Producer:
    """Metrics one part of the evaluation writes into metrics.jsonl, and when it runs."""

    metrics: tuple[str, ...]
    """The metrics.jsonl keys it writes (`eval_loss`, ...)."""

    active: Callable[[Recipe], bool]
    """Whether the recipe turns it on."""

    setting: str
    """What turns it on, as a hint to the user (`set eval.exact_match: true`)."""


def _eval(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"eval_{key}" for key in keys)


PRODUCERS: list[Producer] = [
    Producer(("eval_loss",), has_eval_data, "add data.eval sources or set data.eval_fraction"),
    Producer(("eval_perplexity",), lambda r: has_eval_data(r) and task_type(r) in ("causal_lm", "seq2seq"),
             "perplexity is a language model's: task.type causal_lm or seq2seq, with held-out data"),
    # The generation metrics of greedy answers (launcher/train/task_eval.py with the task types; before them, a
    # causal LM's eval.exact_match writes eval_exact_match alone).
    Producer(_eval(GENERATION_KEYS), generates, "set eval.exact_match: true (causal_lm; seq2seq always generates), "
             "with held-out data: data.eval or data.eval_fraction"),
    Producer(_eval(CLASSIFICATION_KEYS), lambda r: has_eval_data(r) and task_type(r) == "sequence_classification",
             "task.type: sequence_classification, with held-out data"),
    Producer(_eval(ENTITY_KEYS), lambda r: has_eval_data(r) and task_type(r) == "token_classification",
             "task.type: token_classification, with held-out data"),
]
"""Every source of eval metrics, by recipe setting: extend it where an evaluation starts writing new keys."""


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
