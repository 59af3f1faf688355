"""Planning side of the per-layer schedules and best checkpoints: the lr of each depth and the unfreezing order in
the plan, and the plan-time refusals (unknown or unproduced metrics, unsupported combinations). Torch-free, fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from launcher.config.recipe import RecipeError, load_recipe
from launcher.plan.build import Plan, Resources, make_plan
from launcher.plan.report import print_plan

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = REPO / "recipes" / "models" / "llama-3.1-8b"  # config.json only: 32 layers


def recipe(tmp_path: Path, **sections: Any) -> Path:
    data = {"name": "t", "model": {"path": str(LLAMA_8B)},
            "data": {"train": {"path": "t.jsonl"}, "eval_fraction": 0.1},
            "output": {"root": str(tmp_path / "runs")}, **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plan_of(path: Path, overrides: list[str] | None = None, resources: Resources | None = None) -> Plan:
    return make_plan(load_recipe(path, overrides or []), resources or Resources(), path.parent / "runs" / "t")


def problems_of(path: Path, overrides: list[str] | None = None, resources: Resources | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        plan_of(path, overrides, resources)
    return str(info.value)


def test_plan_shows_the_lr_of_every_depth(tmp_path: Path) -> None:
    plan = plan_of(recipe(tmp_path, optim={"lr": 2e-4, "layer_lr_decay": 0.9}))
    assert plan.schedules is not None and plan.schedules["layers"] == 32
    rows = plan.schedules["lr_by_depth"]
    assert [r["group"] for r in rows[:3]] == ["head, final norm", "layer 31", "layer 30"]
    assert [r["group"] for r in rows[-2:]] == ["layer 0", "embeddings"]
    # Hand-computed: depth d trains at 2e-4 * 0.9^d; layer 31 of 32 is depth 1, the embeddings depth 33.
    assert rows[0]["lr"] == pytest.approx(2e-4) and rows[1]["lr"] == pytest.approx(1.8e-4)
    assert rows[-2]["lr"] == pytest.approx(2e-4 * 0.9 ** 32) and rows[-1]["lr"] == pytest.approx(6.18e-6, rel=1e-3)
    console = Console(record=True, width=250)
    print_plan(plan, load_recipe(recipe(tmp_path, optim={"lr": 2e-4, "layer_lr_decay": 0.9})), console)
    text = console.export_text()
    assert "lr by depth" in text and "head, final norm 0.0002, layer 31 0.00018, layer 30 0.000162" in text
    assert "embeddings 6.18e-06" in text


def test_plan_shows_the_unfreezing_order_and_ddp_looks_for_unused_parameters(tmp_path: Path) -> None:
    plan = plan_of(recipe(tmp_path, method={"name": "full", "unfreeze": {"every_epochs": 1, "max_layers": 2}}))
    assert plan.schedules is not None
    assert plan.schedules["unfreeze"] == {"every": "1 epoch", "max_layers": 2,
                                          "order": ["head, final norm", "layer 31", "layer 30"]}
    assert plan.strategy == "ddp" and plan.strategy_config == {"master_weights": True, "find_unused_parameters": True}
    assert plan_of(recipe(tmp_path)).schedules is None  # recipes without them: the plan is as it was


@pytest.mark.parametrize("sections, overrides, resources, expected", [
    # A metric name that is no eval metric: the schema names the close one.
    ({"eval": {"every_steps": 5}, "early_stopping": {"metric": "accuracy"}}, [], None,
     "did you mean eval_accuracy"),
    ({"eval": {"every_steps": 5}, "checkpoint": {"keep_best": "eval_acc"}}, [], None, "unknown eval metric 'eval_acc'"),
    # Known, but no evaluation of this recipe writes it.
    ({"eval": {"every_steps": 5}, "early_stopping": {"metric": "eval_exact_match"}}, [], None,
     "early_stopping.metric (override `early_stopping.metric=eval_exact_match`)"),
    ({"eval": {"every_steps": 5}, "checkpoint": {"keep_best": "eval_accuracy"}}, [], None,
     "eval_accuracy is watched but no evaluation of this recipe writes it"),
    ({"eval": {"every_steps": 5}, "checkpoint": {"keep_best": "eval_loss"}}, ["data.eval_fraction=0"], None,
     "add data.eval sources or set data.eval_fraction"),
    # A direction against the metric's.
    ({"eval": {"every_steps": 5}, "early_stopping": {"metric": "eval_loss", "mode": "max"}}, [], None,
     "eval_loss is better when lower"),
    # Settings that need another one.
    ({"checkpoint": {"keep_best": "eval_loss"}}, [], None, "keeping the best checkpoint needs periodic evaluation"),
    ({"checkpoint": {"final_from_best": True}}, [], None, "set checkpoint.keep_best"),
    # Gradual unfreezing changes the trainable set between steps: ddp only.
    ({"method": {"name": "full", "unfreeze": {"every_steps": 10}}, "strategy": {"name": "fsdp"}}, [],
     Resources(procs_per_node=2), "method.unfreeze"),
    ({"method": {"name": "lora", "unfreeze": {"every_steps": 10}}, "strategy": {"name": "zero2"}}, [],
     Resources(procs_per_node=2), "use strategy.name: ddp"),
    ({"method": {"name": "full", "unfreeze": {"every_steps": 10, "every_epochs": 1}}}, [], None,
     "set exactly one of every_steps or every_epochs"),
])
def test_plan_time_refusals(tmp_path: Path, sections: dict, overrides: list[str], resources: Resources | None,
                            expected: str) -> None:
    if "early_stopping.metric (override" in expected:  # a problem found after loading names the override that set it
        sections = {k: v for k, v in sections.items() if k != "early_stopping"}
        overrides = ["early_stopping.metric=eval_exact_match", "early_stopping.patience=2"]
        expected += ": eval_exact_match is watched"
    assert expected in problems_of(recipe(tmp_path, **sections), overrides, resources)


def test_exact_match_once_turned_on_can_be_watched(tmp_path: Path) -> None:
    plan = plan_of(recipe(tmp_path, eval={"every_steps": 5, "exact_match": True},
                          early_stopping={"metric": "eval_exact_match"}, checkpoint={"keep_best": "eval_exact_match"}))
    assert plan.recipe["early_stopping"]["mode"] == "max"  # from METRIC_MODES, written into plan.json


@pytest.mark.parametrize("task, exact_match, expected", [
    ("causal_lm", False, {"eval_loss", "eval_perplexity"}),
    ("causal_lm", True, {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge1", "eval_rouge2",
                         "eval_rougeL", "eval_bleu"}),
    ("seq2seq", False, {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge1", "eval_rouge2",
                        "eval_rougeL", "eval_bleu"}),
    ("sequence_classification", False, {"eval_loss", "eval_accuracy", "eval_f1_macro", "eval_f1_micro",
                                        "eval_precision_macro", "eval_recall_macro", "eval_precision_micro",
                                        "eval_recall_micro"}),
    ("token_classification", False, {"eval_loss", "eval_entity_f1", "eval_entity_precision", "eval_entity_recall",
                                     "eval_token_accuracy"}),
])
def test_the_metrics_each_task_writes(task: str, exact_match: bool, expected: set[str]) -> None:
    """The table behind the watched-metric check, per task type (recipe.task as the task helper defines it)."""
    from types import SimpleNamespace

    from launcher.common.metrics import METRIC_MODES
    from launcher.plan.eval_metrics import produced_metrics

    recipe: Any = SimpleNamespace(task=SimpleNamespace(type=task), eval=SimpleNamespace(exact_match=exact_match),
                                  data=SimpleNamespace(eval=[], eval_fraction=0.1))
    assert produced_metrics(recipe) == expected and expected <= set(METRIC_MODES)
    recipe.data.eval_fraction = 0.0  # nothing held out: no evaluation writes anything
    assert produced_metrics(recipe) == set()
