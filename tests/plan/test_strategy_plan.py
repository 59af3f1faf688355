"""Planning of distributed strategies: the resolved DeepSpeed JSON (checked by DeepSpeed's own parser), the FSDP
settings, ds_config.json in the run directory, and every strategy compatibility check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.cli.main import main
from launcher.plan.build import Plan, Resources, make_plan
from launcher.config.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
LLAMA_70B = REPO / "recipes" / "models" / "llama-3.1-70b"
GPU_4x8 = Resources(nodes=4, gpus_per_node=8, procs_per_node=8)


def plan_for(tmp_path: Path, resources: Resources = Resources(), **sections: Any) -> Plan:
    data: dict[str, Any] = {"name": "t", "model": {"path": str(LLAMA_70B), "dtype": "bfloat16"},
                            "data": {"train": [{"path": "t.jsonl"}]}, "output": {"root": str(tmp_path / "runs")}}
    data.update(sections)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return make_plan(load_recipe(path), resources, tmp_path / "runs" / "t")


def refused(tmp_path: Path, resources: Resources = Resources(), **sections: Any) -> str:
    with pytest.raises(RecipeError) as err:
        plan_for(tmp_path, resources, **sections)
    return str(err.value)


def deepspeed_parse(config: dict[str, Any], world_size: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeed's own config parser, as an engine on `world_size` data-parallel ranks would run it.

    DeepSpeedConfig asks `deepspeed.comm` for the rank and, given an mpu, the data-parallel world size from it; without
    an initialised process group it falls back to world size 1, so the rank query is stubbed and an mpu supplies the
    plan's world size.
    """
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import config as ds_config_module

    class DataParallelOnly:
        def get_data_parallel_world_size(self) -> int:
            return world_size

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)
    parsed = ds_config_module.DeepSpeedConfig(json.loads(json.dumps(config)), mpu=DataParallelOnly())
    assert parsed.world_size == world_size
    return parsed


@pytest.mark.parametrize("strategy, method, deepspeed", [
    ("zero1", {"name": "lora"}, {}),
    ("zero2", {"name": "full"}, {"offload_optimizer": "cpu"}),
    ("zero3", {"name": "full"}, {}),
    ("zero3", {"name": "full"}, {"offload_optimizer": "cpu", "offload_params": "cpu"}),
    ("zero3", {"name": "lora"}, {"offload_optimizer": "nvme", "offload_params": "nvme", "nvme_path": "/local/nvme"}),
])
def test_70b_deepspeed_json_is_accepted_by_deepspeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str,
                                                     method: dict, deepspeed: dict) -> None:
    plan = plan_for(tmp_path, GPU_4x8, method=method, optim={"micro_batch": 2, "grad_accum": 4},
                    strategy={"name": strategy, "deepspeed": deepspeed})
    config = plan.strategy_config
    assert config is not None and "auto" not in json.dumps(config)
    h = 8192  # llama-3.1-70b hidden size: buckets as DeepSpeed's HF integration derives them
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == h * h
    if strategy == "zero3":
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
        assert zero["stage3_param_persistence_threshold"] == 10 * h
    parsed = deepspeed_parse(config, plan.world_size, monkeypatch)
    assert parsed.train_batch_size == 2 * 4 * 32 and parsed.gradient_accumulation_steps == 4
    assert parsed.zero_optimization_stage == int(strategy[-1])
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.gradient_clipping == 1.0
    for key in ("offload_optimizer", "offload_param"):
        requested = deepspeed.get(key.replace("param", "params"), "none")
        got = getattr(parsed.zero_config, key)
        assert (str(getattr(got.device, "value", got.device)) if got is not None else "none") == requested


def test_tiny_cpu_plans_parse_with_their_world_size(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for strategy in ("zero1", "zero2", "zero3"):
        plan = plan_for(tmp_path, Resources(procs_per_node=2), model={"path": str(tiny_model_dir), "dtype": "float32"},
                        strategy={"name": strategy}, optim={"micro_batch": 2, "max_grad_norm": None})
        config = plan.strategy_config or {}
        assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
        assert config["gradient_clipping"] == 0.0 and not config["bf16"]["enabled"]
        assert deepspeed_parse(config, 2, monkeypatch).train_batch_size == 4


def test_auto_picks_offload_rows_into_the_config(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, Resources(nodes=1, gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=24 * 2**30),
                    method={"name": "full"}, strategy={"name": "auto"})
    row = (plan.memory or {})["chosen"]
    if plan.strategy == "zero3" and row in ("zero3_offload_optimizer", "zero3_offload"):
        assert plan.strategy_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert plan.strategy_config is not None or plan.strategy == "ddp"


def test_fsdp_settings_are_resolved(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, GPU_4x8, method={"name": "full"},
                    strategy={"name": "fsdp", "fsdp": {"hybrid_shard_size": 8, "param_dtype": "bfloat16"}})
    assert plan.strategy_config["mesh"] == {"replicate": 4, "shard": 8}
    assert plan.strategy_config["param_dtype"] == "bfloat16" and plan.strategy_config["reduce_dtype"] == "float32"


def test_launch_plan_writes_and_prints_ds_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "model": {"path": str(LLAMA_70B)},
                                      "data": {"train": [{"path": "t.jsonl"}]}, "strategy": {"name": "zero2"},
                                      "output": {"root": str(tmp_path / "runs")}}))
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    # One node: several nodes make a Slurm plan, whose preflight depends on the cluster this test runs next to.
    assert main(["plan", str(recipe), "--gpus-per-node", "8", "--json", "--out", str(tmp_path / "planned")]) == 0
    plan = json.loads(capsys.readouterr().out)
    written = json.loads((Path(plan["run_dir"]) / "ds_config.json").read_text())
    assert written == plan["strategy_config"] and written["train_batch_size"] == 8
    assert main(["plan", str(recipe), "--gpus-per-node", "8"]) == 0
    assert "zero_optimization" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- the checks
def test_param_offload_needs_zero3(tmp_path: Path) -> None:
    text = refused(tmp_path, GPU_4x8, strategy={"name": "zero2", "deepspeed": {"offload_params": "cpu"}})
    assert "strategy.deepspeed.offload_params" in text and "set strategy.name: zero3" in text


def test_nvme_optimizer_offload_needs_zero3_and_a_path(tmp_path: Path) -> None:
    text = refused(tmp_path, GPU_4x8, strategy={"name": "zero1", "deepspeed": {"offload_optimizer": "nvme"}})
    assert "ZeRO-Infinity" in text and "nvme_path" in text


def test_offload_on_cpu_is_refused(tmp_path: Path) -> None:
    text = refused(tmp_path, Resources(procs_per_node=2),
                   strategy={"name": "zero3", "deepspeed": {"offload_optimizer": "cpu"}})
    assert "needs GPUs" in text


def test_global_batch_mismatch_names_the_fix(tmp_path: Path) -> None:
    text = refused(tmp_path, GPU_4x8, optim={"micro_batch": 2, "grad_accum": 1, "global_batch": 256},
                   strategy={"name": "zero3"})
    assert "optim.global_batch" in text and "grad_accum=4" in text


def test_eight_bit_weights_cannot_be_sharded_by_fsdp(tmp_path: Path) -> None:
    text = refused(tmp_path, GPU_4x8, method={"name": "qlora", "bits": 8}, strategy={"name": "fsdp"})
    assert "method.bits" in text and "strategy.name: ddp" in text


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_qlora_sharding_needs_matching_quant_storage(tmp_path: Path, strategy: str) -> None:
    text = refused(tmp_path, GPU_4x8, method={"name": "qlora", "quant_storage": "uint8"},
                   strategy={"name": strategy})
    assert "method.quant_storage" in text and "quant_storage: bfloat16" in text
    plan_for(tmp_path, GPU_4x8, method={"name": "qlora", "quant_storage": "bfloat16"}, strategy={"name": strategy})
    plan_for(tmp_path, GPU_4x8, method={"name": "qlora", "quant_storage": "uint8"}, strategy={"name": "zero2"})


def test_fused_ce_with_zero3_is_refused_but_fine_with_fsdp(tmp_path: Path) -> None:
    text = refused(tmp_path, GPU_4x8, kernels=["fused_ce"], strategy={"name": "zero3"})
    assert "kernels" in text and "lm_head.weight" in text
    plan_for(tmp_path, GPU_4x8, kernels=["fused_ce"], strategy={"name": "fsdp"})  # lm_head is in the root unit
    plan_for(tmp_path, GPU_4x8, kernels="all", strategy={"name": "zero2"})


def test_options_of_another_strategy_are_refused(tmp_path: Path) -> None:
    assert "strategy.deepspeed" in refused(tmp_path, GPU_4x8, strategy={"name": "fsdp",
                                                                        "deepspeed": {"overlap_comm": False}})
    assert "strategy.fsdp" in refused(tmp_path, GPU_4x8, strategy={"name": "zero2",
                                                                   "fsdp": {"reshard_after_forward": False}})


def test_fsdp_option_checks(tmp_path: Path) -> None:
    assert "must divide" in refused(tmp_path, GPU_4x8, strategy={"name": "fsdp", "fsdp": {"hybrid_shard_size": 3}})
    assert "cpu_offload needs GPUs" in refused(tmp_path, Resources(procs_per_node=2),
                                               strategy={"name": "fsdp", "fsdp": {"cpu_offload": True}})
    assert "use bfloat16" in refused(tmp_path, GPU_4x8, strategy={"name": "fsdp", "fsdp": {"param_dtype": "float16"}})


# ------------------------------------------------------------------------------------------ resume elsewhere
def test_resume_on_other_resources_keeps_global_batch_and_strategy(tmp_path: Path) -> None:
    """4 nodes x 8 GPUs -> 2 x 8: grad_accum doubles, the ZeRO-3 JSON follows, `auto` stays what it resolved to."""
    from launcher.plan.build import replan_for_resume

    before = plan_for(tmp_path, GPU_4x8, method={"name": "full"}, strategy={"name": "zero3"},
                      optim={"micro_batch": 1, "grad_accum": 2, "global_batch": 64})
    after = replan_for_resume(before, Resources(nodes=2, gpus_per_node=8, procs_per_node=8))
    assert (after.world_size, after.strategy, after.typed_recipe().optim.grad_accum) == (16, "zero3", 4)
    assert after.strategy_config["train_batch_size"] == 64 and after.strategy_config["gradient_accumulation_steps"] == 4
    assert after.warnings[0] == "resume: 32 -> 16 ranks; grad_accum 2 -> 4 keeps the global batch 64"
    # auto resolved to fsdp on 4x8 stays fsdp on one node, although auto could pick otherwise there
    auto = plan_for(tmp_path, GPU_4x8, method={"name": "full"}, strategy={"name": "fsdp"})
    assert replan_for_resume(auto, Resources(gpus_per_node=8, procs_per_node=8)).strategy == "fsdp"


def test_resume_on_a_world_size_that_breaks_the_global_batch_is_refused(tmp_path: Path) -> None:
    from launcher.plan.build import replan_for_resume

    before = plan_for(tmp_path, Resources(gpus_per_node=4, procs_per_node=4), method={"name": "lora"},
                      optim={"micro_batch": 2, "grad_accum": 3})
    with pytest.raises(RecipeError) as err:
        replan_for_resume(before, Resources(gpus_per_node=8, procs_per_node=8))
    text = " ".join(str(err.value).split())
    assert "global batch 24 (micro_batch(2) * grad_accum(3) * world_size(4)) is not a multiple of" in text
    assert "resume on a world size that divides 12: 1, 2, 3, 4, 6, 12" in text


def test_launch_resume_needs_a_recipe_or_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--resume"]) == 2
    assert "--resume without a run directory needs the recipe" in capsys.readouterr().err
    assert main([]) == 2
    assert "launch needs a recipe" in capsys.readouterr().err


def test_help_lists_every_command_with_an_example_and_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli.main import COMMANDS

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[1] for line in out.splitlines() if line.startswith("  launch ")}
    assert set(COMMANDS) <= listed, set(COMMANDS) - listed
    assert "--nodes" in out and "--resume" in out  # the training flags follow the overview
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("ftlaunch ")
    assert main(["plan"]) == 2
    assert "launch plan needs a recipe" in capsys.readouterr().err
