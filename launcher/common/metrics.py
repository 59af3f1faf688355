"""Which direction of each eval metric is better (placeholder of i13-metrics' module, same names and interface:
`METRIC_MODES`, `metric_mode`). Torch-free: the schema and the plan checks read it.
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["min", "max"]

CLASSIFICATION_KEYS = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "precision_micro",
                       "recall_micro")
ENTITY_KEYS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
GENERATION_KEYS = ("rouge1", "rouge2", "rougeL", "bleu", "exact_match")

METRIC_MODES: dict[str, Mode] = {
    "eval_loss": "min",
    "eval_perplexity": "min",
    **{f"eval_{key}": "max" for key in (*CLASSIFICATION_KEYS, *ENTITY_KEYS, *GENERATION_KEYS)},
}
"""Every eval metric key that can appear in metrics.jsonl -> whether lower ("min") or higher ("max") is better."""


def metric_mode(name: str) -> Mode:
    """Whether a lower or a higher value of the eval metric `name` is better; a clear error for an unknown name."""
    try:
        return METRIC_MODES[name]
    except KeyError:
        known = ", ".join(sorted(METRIC_MODES))
        hint = f" (did you mean eval_{name}?)" if f"eval_{name}" in METRIC_MODES else ""
        raise ValueError(f"unknown eval metric {name!r}{hint}. Known metrics: {known}") from None
