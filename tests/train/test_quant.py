"""Quantized training (`method: qlora`, bitsandbytes on CPU) and the 8-bit / paged optimizers.

What bitsandbytes 0.50.2 does on CPU, measured and relied on here: Linear4bit (nf4, fp4, with or without double
quantization) and Linear8bitLt train through PEFT LoRA; AdamW8bit runs (8-bit moments for tensors of >= 4096
elements) and its state round-trips through `state_dict`; the paged optimizers warn and run unpaged.

Training runs go through `launcher.train.job.run_job` in this process, like tests/train/test_train.py. Planning tests import no
torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import LocalExecutor
from launcher.plan.build import Resources, make_plan
from launcher.config.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


# ------------------------------------------------------------------------------------------------------ helpers
def _rows(n: int) -> list[dict[str, Any]]:
    """The reverse-a-word task of tests/train/test_train.py, as messages."""
    return [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in (WORDS[i % len(WORDS)] for i in range(n))]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quant_recipe(tmp_path: Path, model_dir: Path, method: dict[str, Any], **sections: Any) -> Path:
    """A qlora recipe on the tiny model: fp32 weights and compute on CPU (exact resumes), LoRA r=8 on all linears."""
    recipe: dict[str, Any] = {
        "name": "quant",
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(_write_jsonl(tmp_path / "train.jsonl", _rows(64)))},
                 "eval": [{"path": str(_write_jsonl(tmp_path / "eval.jsonl", _rows(10)))}], "max_length": 64},
        "method": {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "compute_dtype": "float32", **method},
        "optim": {"lr": 1e-2, "micro_batch": 4, "max_steps": 8, "schedule": "constant", "seed": 3},
        "eval": {"at_start": True},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp_path / "quant.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def plan_for(recipe: Path, resources: Resources | None = None, overrides: list[str] | None = None) -> Any:
    loaded = load_recipe(recipe, overrides or [])
    return make_plan(loaded, resources or Resources(), Path(loaded.recipe.output.root) / "planned")


def start_run(recipe: Path) -> Path:
    return LocalExecutor(Resources()).prepare(load_recipe(recipe)).run_dir


def run(run_dir: Path) -> int:
    from launcher.train.job import run_job

    return run_job(run_dir)


def metrics(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def reload_model(run_dir: Path, base: str) -> Any:
    """RUN_DIR/adapter loaded with PEFT onto a fresh base built the way the run built it (`quantized`), or the
    plain model directory RUN_DIR/merged (`merged`)."""
    import torch

    if base == "merged":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    from peft import PeftModel

    from launcher.train.model import load_base_model, quantization_config

    recipe = run_recipe(run_dir)
    quantized = load_base_model(recipe.model, torch.device("cpu"), quantization_config(recipe))
    return PeftModel.from_pretrained(quantized, run_dir / "adapter")


def run_recipe(run_dir: Path) -> Any:
    from launcher.plan.files import load_plan

    return load_plan(run_dir).typed_recipe()


def eval_loss_of(model: Any, run_dir: Path) -> float:
    """The trainer's eval loss of `model` on the run's eval set."""
    import torch

    from launcher.train.data import tokenize_cached
    from launcher.train.evaluate import eval_loss
    from launcher.common.model_files import load_tokenizer
    from launcher.strategies.ddp import DDPStrategy

    recipe, cpu = run_recipe(run_dir), torch.device("cpu")
    tokenizer = load_tokenizer(recipe.model)
    data = tokenize_cached(recipe.data, tokenizer, run_dir.parent.parent / "cache")
    return eval_loss(model, data.eval, tokenizer.pad_token_id, DDPStrategy(1, 0, cpu), cpu, recipe.optim.micro_batch,
                     None, False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("method, merge", [
    ({"bits": 4, "quant_type": "nf4", "double_quant": True}, False),
    ({"bits": 4, "quant_type": "nf4", "double_quant": False}, False),
    ({"bits": 4, "quant_type": "fp4", "double_quant": True}, True),
    ({"bits": 8}, False),
], ids=["nf4-dq", "nf4", "fp4-merge", "int8"])
def test_quantized_lora_learns_and_its_adapter_reloads(tmp_path: Path, tiny_model_dir: Path,
                                                       method: dict[str, Any], merge: bool) -> None:
    import bitsandbytes as bnb

    run_dir = start_run(quant_recipe(tmp_path, tiny_model_dir, method, optim={"max_steps": 6},
                                     output={"merge": merge}))
    assert run(run_dir) == 0
    evals = metrics(run_dir, "eval")
    train = [r["loss"] for r in metrics(run_dir, "train")]
    print(method, "train", [round(x, 3) for x in train], "eval", [round(e["eval_loss"], 3) for e in evals])
    # Only the LoRA matrices on quantized layers train, so gradients really flow through the 4/8-bit matmuls. The
    # random frozen lm_head of the tiny model caps how far that loss can fall (6.05 -> ~5.6).
    assert len(train) == 6 and sum(train[-2:]) < 0.97 * sum(train[:2])
    assert evals[-1]["eval_loss"] < 0.95 * evals[0]["eval_loss"]
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    # The PEFT adapter on a freshly quantized base reproduces the run's final eval loss: weights and quantization
    # are deterministic on CPU, so only summation order could differ.
    model = reload_model(run_dir, "quantized")
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    if method["bits"] == 8:
        assert isinstance(layer, bnb.nn.Linear8bitLt)
    else:
        # The recipe's 4-bit settings reached bitsandbytes. Checked before any forward: on CPUs with AVX512-BF16,
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first no-grad eval-mode forward (absmax
        # dequantized to bf16, `nested` cleared), so the state differs afterwards.
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch_dtype("uint8")
        assert (layer.weight.quant_state.quant_type, layer.weight.quant_state.nested) == (
            method["quant_type"], method["double_quant"])
    assert eval_loss_of(model, run_dir) == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    if merge:
        check_merged(run_dir, tiny_model_dir, evals[-1]["eval_loss"])


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def check_merged(run_dir: Path, base_dir: Path, final_eval_loss: float) -> None:
    """Policy: `output.merge` with a quantized base reloads the base unquantized (model dtype, CPU) and merges there.
    The merged model is a plain fp32 model (no quantization_config), equal to base + adapter unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                         run_dir / "adapter")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_merged, out_base, out_unmerged = (m(input_ids=ids).logits for m in (merged, base, unmerged))
    assert torch.allclose(out_merged, out_unmerged, atol=1e-4)
    assert not torch.allclose(out_merged, out_base, atol=1e-3)  # the adapter is really in there
    # Close to what the run evaluated on its quantized base: the two bases differ by the 4-bit rounding only.
    assert eval_loss_of(merged, run_dir) == pytest.approx(final_eval_loss, rel=0.05)


@pytest.mark.slow
def test_gradients_through_4bit_layers_survive_an_evaluation(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Regression: bitsandbytes repacks 4-bit weights for a CPU inference kernel without autograd at the first
    no-grad eval forward; build_model turns that off, so gradients after an evaluation equal those before it.
    Also: model.gradient_checkpointing is honoured as given (peft's helper would turn it on by default) and gives
    the same gradients."""
    import torch

    from launcher.train.model import build_model

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    def build(checkpointing: bool) -> torch.nn.Module:
        path = quant_recipe(tmp_path, tiny_model_dir, {"bits": 4}, model={"gradient_checkpointing": checkpointing})
        torch.manual_seed(0)  # same adapter init for both models
        model = build_model(load_recipe(path).recipe, torch.device("cpu"))
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        return model

    def lora_b_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        # lora_B of layer 0 gets its gradient through every quantized matmul above it (lora_A's is 0: B starts at 0)
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n}

    model = build(checkpointing=False)
    before = lora_b_grads(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_b_grads(model)
    checkpointed = lora_b_grads(build(checkpointing=True))
    assert before.keys() == after.keys() == checkpointed.keys() and len(before) == 14
    for name in before:
        assert torch.equal(before[name], after[name]), name
        assert torch.allclose(before[name], checkpointed[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_qlora_resume_with_8bit_optimizer_is_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Checkpoint = adapter + AdamW8bit state; 8 steps == 4 steps + resume + 4 steps. lm_head (25,600 elements) is
    trained too so that some optimizer state really is 8-bit (bitsandbytes keeps fp32 moments under 4096)."""
    import shutil

    recipe = quant_recipe(tmp_path, tiny_model_dir, {"modules_to_save": ["lm_head"]},
                          optim={"name": "adamw_8bit", "lr": 3e-3}, checkpoint={"every_steps": 4, "keep_last": 3},
                          eval={"at_start": False})
    run_dir = start_run(recipe)
    assert run(run_dir) == 0
    full = [r["loss"] for r in metrics(run_dir, "train")]
    ckpts = run_dir / "checkpoints"
    import torch

    state = torch.load(ckpts / "step-00000004" / "optimizer.pt", weights_only=True)["state"]
    # bitsandbytes nests its tensors under one key of each parameter's state
    tensors = [v for s in state.values() for v in s.get("__bnb_optimizer_quant_state__", s).values()
               if torch.is_tensor(v)]
    assert any(v.dtype == torch.uint8 for v in tensors)
    shutil.rmtree(ckpts / "step-00000008")
    (ckpts / "latest").write_text("step-00000004\n")
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train" and json.loads(line)["step"] <= 4]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert run(run_dir) == 0
    assert [r["loss"] for r in metrics(run_dir, "train")] == pytest.approx(full, rel=0, abs=1e-6)
    assert sum(full[-2:]) < sum(full[:2])


# ---------------------------------------------------------------------------------------------------- optimizers
@pytest.mark.slow
@pytest.mark.parametrize("name, state_dtype", [("adamw", "float32"), ("adamw_8bit", "uint8"),
                                               ("paged_adamw_8bit", "uint8"), ("paged_adamw_32bit", "float32")])
def test_optimizer_names_build_bitsandbytes_optimizers_on_cpu(name: str, state_dtype: str) -> None:
    import warnings

    import torch

    from launcher.config.schema import OptimConfig
    from launcher.train.trainer import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))  # 8192-element weight: 8-bit
    optimizer = make_optimizer(model, OptimConfig(name=name, weight_decay=0.1, lr=1e-3))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # decay / no-decay groups kept
    assert len(optimizer.param_groups[0]["params"]) == 1 and len(optimizer.param_groups[1]["params"]) == 3
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged on CPU: "not supported on CPU. Falling back to non-paged"
        model(torch.randn(4, 128)).square().mean().backward()
        optimizer.step()
    assert not torch.equal(before, model[0].weight)
    moments = optimizer.state[model[0].weight]
    first = moments["exp_avg"] if name == "adamw" else moments["state1"]
    assert str(first.dtype) == f"torch.{state_dtype}"


def test_paged_optimizer_on_cpu_is_a_warning_not_a_refusal(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bitsandbytes runs paged optimizers unpaged on CPU (same updates), so the plan says so and stays runnable;
    8-bit AdamW works on CPU as is; GPU plans say nothing."""
    recipe = quant_recipe(tmp_path, tiny_model_dir, {})
    paged = plan_for(recipe, overrides=["optim.name=paged_adamw_8bit"])
    assert paged.runnable and any("optim.name: paged_adamw_8bit" in w and "unpaged" in w for w in paged.warnings)
    assert not any("optim.name" in w for w in plan_for(recipe, overrides=["optim.name=adamw_8bit"]).warnings)
    gpu = plan_for(recipe, Resources(gpus_per_node=1), overrides=["optim.name=paged_adamw_32bit", "model.dtype=bfloat16"])
    assert gpu.runnable and not any("optim.name" in w for w in gpu.warnings)


def test_bitsandbytes_optimizers_are_refused_under_fsdp(tmp_path: Path, tiny_model_dir: Path) -> None:
    """FSDP2's DTensor parameters have no bitsandbytes update rule (measured); DDP and ZeRO stay allowed."""
    recipe = quant_recipe(tmp_path, tiny_model_dir, {}, model={"dtype": "bfloat16"})
    two_gpus = Resources(gpus_per_node=2, procs_per_node=2)
    with pytest.raises(RecipeError, match=r"optim.name \(override `optim.name=adamw_8bit`\): adamw_8bit "
                                          r".bitsandbytes. cannot update FSDP"):
        plan_for(recipe, two_gpus, ["strategy.name=fsdp", "optim.name=adamw_8bit"])
    # QLoRA under FSDP runs on any number of ranks (tests/integration/test_qlora_sharded.py trains it on two).
    assert plan_for(recipe, two_gpus, ["strategy.name=fsdp", "optim.name=adamw"]).runnable
    assert plan_for(recipe, Resources(gpus_per_node=1), ["strategy.name=fsdp", "optim.name=adamw"]).runnable
    assert plan_for(recipe, two_gpus, ["strategy.name=zero2", "optim.name=paged_adamw_8bit"]).runnable


# ---------------------------------------------------------------------------------------------------- planning
@pytest.mark.parametrize("strategy, dtype, expected", [
    ("ddp", "float32", "uint8"), ("zero2", "bfloat16", "uint8"),
    ("fsdp", "float32", "float32"), ("fsdp", "bfloat16", "bfloat16"), ("zero3", "bfloat16", "bfloat16"),
])
def test_quant_storage_auto_is_resolved_in_the_plan(tmp_path: Path, tiny_model_dir: Path, strategy: str, dtype: str,
                                                    expected: str) -> None:
    recipe = quant_recipe(tmp_path, tiny_model_dir, {}, strategy={"name": strategy}, model={"dtype": dtype})
    plan = plan_for(recipe, Resources(gpus_per_node=2, procs_per_node=2))
    assert plan.recipe["method"]["quant_storage"] == expected
    assert plan.typed_recipe().method.quant_storage == expected  # what every rank reads back from plan.json


def test_quant_settings_that_cannot_shard_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = quant_recipe(tmp_path, tiny_model_dir, {}, model={"dtype": "bfloat16"})
    two_gpus = Resources(gpus_per_node=2, procs_per_node=2)
    with pytest.raises(RecipeError, match="method.quant_storage"):  # the rule itself is in ds_config's checks
        plan_for(recipe, two_gpus, ["strategy.name=fsdp", "method.quant_storage=uint8"])
    with pytest.raises(RecipeError, match="method.bits.*cannot be partitioned by zero3"):
        plan_for(recipe, two_gpus, ["strategy.name=zero3", "method.bits=8"])
    with pytest.raises(RecipeError, match="quant_storage applies to packed 4-bit weights only"):
        plan_for(recipe, two_gpus, ["method.bits=8", "method.quant_storage=bfloat16"])
    int8 = plan_for(recipe, two_gpus, ["method.bits=8", "strategy.name=ddp"])
    assert int8.runnable and int8.recipe["method"]["quant_storage"] == "auto"  # no packing for 8-bit weights


def test_qlora_is_runnable_and_merge_warns_about_host_memory(tmp_path: Path, tiny_model_dir: Path) -> None:
    plan = plan_for(quant_recipe(tmp_path, tiny_model_dir, {}, output={"merge": True}))
    assert plan.runnable, plan.unsupported
    assert any("output.merge" in w and "unquantized" in w and "GiB of host RAM" in w for w in plan.warnings)


def test_llama3_70b_qlora_plan_on_one_node_of_8x80gib() -> None:
    """`launch plan --json` on the shipped 70B QLoRA recipe: a memory table, a strategy chosen by memory that fits,
    and the packed-weight dtype resolved for that strategy."""
    out = subprocess.run([sys.executable, "-m", "launcher", "plan", str(REPO / "recipes" / "llama3-70b-qlora.yaml"),
                          "--gpus-per-node", "8", "--gpu-mem", "80GiB", "--json"],
                         capture_output=True, text=True, cwd=REPO, check=True, timeout=60)
    plan = json.loads(out.stdout)
    assert plan["runnable"] and plan["world_size"] == 8
    memory = plan["memory"]
    assert memory["params_total"] == 70_553_706_496
    rows = {row["name"]: row for row in memory["strategies"]}
    assert {"ddp", "zero3", "fsdp"} <= set(rows)
    chosen = rows[memory["chosen"]]
    assert chosen["fits"] and chosen["bytes"]["total"] <= 80 * 2**30
    assert plan["strategy"] == chosen["strategy"] and plan["strategy_reason"].startswith("auto, by memory")
    method = plan["recipe"]["method"]
    assert (method["name"], method["quant_type"], method["double_quant"]) == ("qlora", "nf4", True)
    assert method["quant_storage"] == ("bfloat16" if plan["strategy"] in ("fsdp", "zero3") else "uint8")
    # A 4-bit 70B base (~35-40 GiB of weights) fits next to its adapter on one 80 GiB GPU: no sharding needed.
    assert plan["strategy"] == "ddp"


def test_llama3_70b_full_needs_sharding_on_4x8_gpus() -> None:
    loaded = load_recipe(REPO / "recipes" / "llama3-70b-full.yaml")
    plan = make_plan(loaded, Resources(nodes=4, gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=80 * 2**30),
                     Path("/nonexistent/runs/full"))
    rows = {row["name"]: row for row in plan.memory["strategies"]}
    assert not rows["ddp"]["fits"] and plan.strategy in ("fsdp", "zero3") and plan.world_size == 32
