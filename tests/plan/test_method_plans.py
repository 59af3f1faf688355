"""Planning prompt_tuning, prefix_tuning, ia3 and adapter recipes (torch-free): what is refused and why, what `auto`
chooses, and the trainable counts in the plan. The counts are checked against the real models in
tests/train/test_methods.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.config.recipe import RecipeError, load_recipe
from launcher.plan.build import Plan, Resources, make_plan
from launcher.plan.memory_model import GiB

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = REPO / "recipes" / "models" / "llama-3.1-8b"
LLAMA_70B = REPO / "recipes" / "models" / "llama-3.1-70b"
GPU_1x8 = Resources(gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=80 * GiB)


def plan_for(tmp_path: Path, method: dict[str, Any], resources: Resources = GPU_1x8, **sections: Any) -> Plan:
    data: dict[str, Any] = {"name": "t", "model": {"path": str(LLAMA_8B), "dtype": "bfloat16"}, "method": method,
                            "data": {"train": [{"path": "t.jsonl"}]}, "output": {"root": str(tmp_path / "runs")}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return make_plan(load_recipe(path), resources, tmp_path / "runs" / "t")


PROMPT = {"name": "prompt_tuning", "num_virtual_tokens": 8}
PREFIX = {"name": "prefix_tuning"}
IA3 = {"name": "ia3"}
ADAPTER = {"name": "adapter"}


@pytest.mark.parametrize("method, sections, key, says", [
    (PROMPT, {"data": {"packing": True}}, "data.packing", "per-example attention of packed rows"),
    (PREFIX, {"data": {"packing": True}}, "data.packing", "per-example attention of packed rows"),
    (PREFIX, {"model": {"gradient_checkpointing": True}}, "model.gradient_checkpointing", "drop while training"),
    (PROMPT, {"output": {"merge": True}}, "output.merge", "adds virtual tokens, not weight updates"),
    (PREFIX, {"output": {"merge": True}}, "output.merge", "adds virtual tokens, not weight updates"),
    (ADAPTER, {"output": {"merge": True}}, "output.merge", "fold into no weight"),
    (IA3, {"strategy": {"name": "fsdp"}}, "strategy.name", "not verified under fsdp"),
    (PROMPT, {"strategy": {"name": "zero3"}}, "strategy.name", "not verified under zero3"),
    (ADAPTER, {"strategy": {"name": "fsdp"}}, "strategy.name", "not verified under fsdp"),
])
def test_unsupported_combinations_are_refused_with_the_key_and_a_fix(tmp_path: Path, method: dict, sections: dict,
                                                                     key: str, says: str) -> None:
    with pytest.raises(RecipeError) as err:
        plan_for(tmp_path, method, **sections)
    text = str(err.value)
    assert key in text and says in text and ("set " in text or "use " in text), text


@pytest.mark.parametrize("method, sections", [
    (PROMPT, {"model": {"gradient_checkpointing": True}, "kernels": ["rmsnorm", "fused_ce"]}),
    (PREFIX, {"strategy": {"name": "zero2"}, "kernels": ["fused_ce"]}),
    (IA3, {"output": {"merge": True}, "model": {"gradient_checkpointing": True}, "data": {"packing": True}}),
    (ADAPTER, {"data": {"packing": True}, "model": {"gradient_checkpointing": True}, "strategy": {"name": "zero1"}}),
])
def test_supported_combinations_plan(tmp_path: Path, method: dict, sections: dict) -> None:
    plan = plan_for(tmp_path, method, **sections)
    assert plan.runnable and plan.memory is not None


@pytest.mark.parametrize("method", [PROMPT, IA3])
def test_auto_stays_off_sharding_strategies_and_says_why(tmp_path: Path, method: dict) -> None:
    """A 70B base needs fsdp/zero3 on 80 GiB GPUs (auto picks them for LoRA); these methods are refused there, so
    `auto` keeps to the others and the plan says what would have fit."""
    gpus = Resources(gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=80 * GiB)
    assert plan_for(tmp_path, {"name": "lora"}, gpus, model={"path": str(LLAMA_70B)}).strategy in ("fsdp", "zero3")
    plan = plan_for(tmp_path, method, gpus, model={"path": str(LLAMA_70B)})
    assert plan.strategy in ("ddp", "zero1", "zero2")
    assert "nothing compatible with the recipe fits" in plan.strategy_reason
    assert f"method {method['name']} is not verified under" in plan.strategy_reason


def test_plan_counts_each_methods_trainable_parameters(tmp_path: Path) -> None:
    """The plan's trainable counts follow the methods' sizes: prompt tuning n*h, prefix tuning n*L*2*kv (GQA: kv is
    8 heads x 128, not the hidden size), IA3 a vector per targeted linear, adapters 2hb + b + h per placement and
    layer."""
    h, layers, kv, inter = 4096, 32, 8 * 128, 14336
    trainable = {name: plan_for(tmp_path, method).memory["trainable"] for name, method in [
        ("prompt", PROMPT), ("prefix", {**PREFIX, "num_virtual_tokens": 10}), ("ia3", IA3),
        ("adapter", {**ADAPTER, "placement": ["mlp"], "bottleneck": 64})]}
    assert trainable["prompt"] == 8 * h
    assert trainable["prefix"] == 10 * layers * 2 * kv
    assert trainable["ia3"] == layers * (kv + kv + inter)  # Llama: k_proj, v_proj outputs; down_proj's input
    assert trainable["adapter"] == layers * (2 * h * 64 + 64 + h)
    projected = plan_for(tmp_path, {**PREFIX, "num_virtual_tokens": 10, "projection": True}).memory["trainable"]
    assert projected > trainable["prefix"]  # the MLP is trained on top of what it produces


def test_prompt_tuning_sequences_are_longer_in_the_estimate(tmp_path: Path) -> None:
    few = plan_for(tmp_path, {**PROMPT, "num_virtual_tokens": 1}).memory["strategies"][0]["bytes"]["activations"]
    many = plan_for(tmp_path, {**PROMPT, "num_virtual_tokens": 512}).memory["strategies"][0]["bytes"]["activations"]
    assert many > few * 1.4  # max_length 1024 + 512 virtual tokens
