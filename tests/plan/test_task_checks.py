"""`task:` at plan time (issue 13): the schema (a bare string, label lists), and every combination refused before a
job starts, with the key it names. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.config.recipe import RecipeError, load_recipe, validate
from launcher.config.schema import Recipe, TaskConfig
from launcher.plan.build import Resources, make_plan
from launcher.plan.checks import problems


def _model(tmp_path: Path, name: str, encoder_decoder: bool) -> Path:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    config: dict[str, Any] = {"model_type": "t5" if encoder_decoder else "bert", "vocab_size": 100}
    if encoder_decoder:
        config["is_encoder_decoder"] = True
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _recipe(tmp_path: Path, task: Any, encoder_decoder: bool = False, **sections: Any) -> Recipe:
    data = {"model": {"path": str(_model(tmp_path, "m", encoder_decoder))},
            "data": {"train": [{"path": "t.jsonl"}], "eval_fraction": 0.1}, "task": task, **sections}
    return validate(data)


def _paths(recipe: Recipe, strategy: str = "ddp") -> dict[str, str]:
    return {p.path: p.message for p in problems(recipe, Resources(), strategy)}


def test_task_accepts_a_bare_string_and_defaults_to_causal_lm(tmp_path: Path) -> None:
    assert _recipe(tmp_path, "seq2seq").task.type == "seq2seq"
    assert validate({"model": {"path": "m"}, "data": {"train": [{"path": "t"}]}}).task.type == "causal_lm"
    assert TaskConfig.model_validate({"type": "sequence_classification", "labels": [0, 1]}).labels == ["0", "1"]
    for bad in ({"type": "regression"}, {"type": "sequence_classification", "labels": ["a", "a"]},
                {"type": "sequence_classification", "labels": [True, False]}, {"type": "seq2seq", "colour": "x"}):
        with pytest.raises(ValueError):
            TaskConfig.model_validate(bad)


def test_a_valid_task_recipe_has_no_problems(tmp_path: Path) -> None:
    assert _paths(_recipe(tmp_path, {"type": "sequence_classification", "text_pair_column": "b"})) == {}
    assert _paths(_recipe(tmp_path, {"type": "seq2seq", "source_prefix": "summarize: "}, encoder_decoder=True)) == {}


@pytest.mark.parametrize("task, encoder_decoder, sections, key, words", [
    ("sequence_classification", False, {"data": {"train": [{"path": "t"}], "packing": True}}, "data.packing",
     "cannot share a row"),
    ("token_classification", False, {"eval": {"exact_match": True}}, "eval.exact_match", "generates no text"),
    ("sequence_classification", False, {"kernels": ["rmsnorm"]}, "kernels", "not verified"),
    ("seq2seq", False, {}, "task.type", "is_encoder_decoder"),
    ("token_classification", True, {}, "task.type", "encoder-decoder"),
    ({"type": "seq2seq", "label_column": "y"}, True, {}, "task.label_column", "does not read"),
    ({"type": "causal_lm", "source_prefix": "x"}, False, {}, "task.source_prefix", "does not read"),
    ("seq2seq", True, {"method": {"name": "freeze", "trainable_layers": 1}}, "method.trainable_layers", "ambiguous"),
    ("sequence_classification", False, {"method": {"name": "qlora"}, "output": {"merge": True}}, "output.merge",
     "not implemented"),
])
def test_refused_combinations_name_their_key(tmp_path: Path, task: Any, encoder_decoder: bool,
                                             sections: dict[str, Any], key: str, words: str) -> None:
    found = _paths(_recipe(tmp_path, task, encoder_decoder, **sections))
    assert key in found and words in found[key], found


@pytest.mark.parametrize("strategy", ["fsdp", "zero1", "zero2", "zero3"])
def test_task_heads_are_refused_under_unverified_strategies(tmp_path: Path, strategy: str) -> None:
    found = _paths(_recipe(tmp_path, "sequence_classification"), strategy)
    assert "verified with ddp only" in found["strategy.name"]
    assert "strategy.name" not in _paths(_recipe(tmp_path, "causal_lm"), strategy)


def test_plan_of_a_task_model_the_memory_planner_cannot_size(tmp_path: Path) -> None:
    """A BERT or T5 config is outside the planner's decoder families: the plan warns instead of refusing."""
    model = _model(tmp_path, "t5", encoder_decoder=True)
    (tmp_path / "t.jsonl").write_text('{"source": "a", "target": "b"}\n')
    recipe = {"name": "t", "model": {"path": str(model)}, "data": {"train": {"path": "t.jsonl"}}, "task": "seq2seq",
              "output": {"root": str(tmp_path / "runs")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = make_plan(load_recipe(path), Resources(), tmp_path / "runs" / "t")
    assert plan.memory is None and any(w.startswith("memory: no estimate") for w in plan.warnings)
    path.write_text(yaml.safe_dump({**recipe, "task": "causal_lm"}))
    with pytest.raises(RecipeError, match="cannot size the model"):
        make_plan(load_recipe(path), Resources(), tmp_path / "runs" / "t")
    path.write_text(yaml.safe_dump({**recipe, "data": {"train": {"path": "t.jsonl"}, "packing": True}}))
    with pytest.raises(RecipeError, match=r"data\.packing \(.*r\.yaml:\d+\): packing"):
        make_plan(load_recipe(path), Resources(), tmp_path / "runs" / "t")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "ia3", "adapter"])
def test_the_other_adapter_methods_are_refused_for_non_causal_tasks(tmp_path: Path, method: str) -> None:
    found = _paths(_recipe(tmp_path, "sequence_classification", method={"name": method}))
    assert "verified with causal_lm only" in found.get("method.name", ""), found
