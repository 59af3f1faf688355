"""Resolved strategy settings: the complete DeepSpeed JSON, the FSDP and DDP settings (their checks: checks.py).

Planning side: no torch, no deepspeed. Every value is resolved here, never `"auto"`, so that what a rank runs is
exactly what `launch plan` printed and what RUN_DIR/ds_config.json holds. The ranks re-derive only the batch fields,
and only when they run on another world size than planned (a resume on fewer ranks), with `for_world_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config.schema import DeepSpeedOptions, Recipe
from launcher.strategies import spec as strategy_spec

if TYPE_CHECKING:
    from launcher.plan.resources import Resources

DS_CONFIG_FILE = "ds_config.json"

# The memory planner's rows that imply options (the registry's memory_rows, launcher/strategies): `auto` may pick them.
_ROW_OFFLOAD = {"zero3_offload_optimizer": ("cpu", "none"), "zero3_offload": ("cpu", "cpu")}


def model_hidden_size(recipe: Recipe) -> int | None:
    """`hidden_size` from the model's config.json when it is readable here (None for an unconverted GGUF)."""
    from launcher.plan import memory_model
    from launcher.plan.memory import UNREADABLE_CONFIG, model_config_dir

    directory = model_config_dir(recipe)
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:  # the same reading the memory planner did (it reported any problem with the file already)
        return memory_model.model_dims(memory_model.read_model_config(directory)).hidden_size
    except UNREADABLE_CONFIG:
        return None


# ------------------------------------------------------------------------------------------------------ deepspeed
def _offload(target: str, nvme_path: str | None) -> dict[str, Any]:
    if target == "nvme":
        return {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}
    return {"device": target, "pin_memory": target == "cpu"}


def deepspeed_config(recipe: Recipe, strategy: str, world_size: int, hidden_size: int | None,
                     memory_row: str | None = None) -> dict[str, Any]:
    """The complete DeepSpeed JSON for a ZeRO strategy, every value resolved.

    Bucket sizes follow transformers' `HfTrainerDeepSpeedConfig` (reduce h*h, stage-3 prefetch 0.9*h*h, persistence
    10*h); without a readable config.json they fall back to DeepSpeed's own defaults (5e8 / 5e7 / 1e5 elements).
    """
    opts: DeepSpeedOptions = recipe.strategy.deepspeed
    stage = strategy_spec(strategy).zero_stage
    assert stage is not None, f"{strategy} is not a DeepSpeed strategy"
    optim = recipe.optim
    micro = int(optim.micro_batch)  # `auto` was resolved by the planner before this is called
    offload_optimizer, offload_params = opts.offload_optimizer, opts.offload_params
    if memory_row in _ROW_OFFLOAD and "offload_optimizer" not in opts.model_fields_set:
        offload_optimizer, offload_params = _ROW_OFFLOAD[memory_row]
    h = hidden_size
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": opts.overlap_comm,
        "contiguous_gradients": opts.contiguous_gradients,
        "reduce_bucket_size": opts.reduce_bucket_size or (h * h if h else 500_000_000),
    }
    if stage < 3:
        zero["allgather_bucket_size"] = opts.allgather_bucket_size or (h * h if h else 500_000_000)
    else:
        zero["stage3_prefetch_bucket_size"] = opts.stage3_prefetch_bucket_size or (int(0.9 * h * h) if h else 50_000_000)
        zero["stage3_param_persistence_threshold"] = (opts.stage3_param_persistence_threshold
                                                      if opts.stage3_param_persistence_threshold is not None
                                                      else (10 * h if h else 100_000))
        zero["stage3_gather_16bit_weights_on_model_save"] = opts.stage3_gather_16bit_weights_on_model_save
        if offload_params != "none":
            zero["offload_param"] = _offload(offload_params, opts.nvme_path)
    if offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(offload_optimizer, opts.nvme_path)
    dtype = recipe.model.dtype
    extra: dict[str, Any] = {}
    if offload_optimizer != "none":
        # DeepSpeed insists on its DeepSpeedCPUAdam with offload; the trainer passes a torch AdamW, which steps the
        # offloaded fp32 partitions on the CPU correctly (slower than the compiled CPU Adam, but no op build).
        extra["zero_force_ds_cpu_optimizer"] = False
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro * optim.grad_accum * world_size,
        # DeepSpeed clips at the accumulation boundary; 0 disables it (our max_grad_norm: null).
        "gradient_clipping": optim.max_grad_norm or 0.0,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # Our optimizer is a torch AdamW built by the trainer (DeepSpeed's own would compile fused_adam): say so.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step prints would only add noise
        "wall_clock_breakdown": False,
        **extra,
    }


def for_world_size(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The same config on another world size (resume on fewer/more ranks): only train_batch_size changes."""
    return {**config, "train_batch_size": (config["train_micro_batch_size_per_gpu"]
                                           * config["gradient_accumulation_steps"] * world_size)}


# ----------------------------------------------------------------------------------------------------------- fsdp
def fsdp_config(recipe: Recipe, resources: "Resources", memory_row: str | None = None) -> dict[str, Any]:
    """FSDP2 settings with defaults resolved: mesh shape, mixed-precision dtypes, offload, checkpointing."""
    opts = recipe.strategy.fsdp
    shard = opts.hybrid_shard_size
    if shard is None and memory_row == "fsdp_hybrid" and resources.gpus_per_node:
        shard = resources.gpus_per_node
    shard = shard or resources.world_size
    return {
        "mesh": {"replicate": resources.world_size // shard, "shard": shard},
        "reshard_after_forward": opts.reshard_after_forward,
        "param_dtype": opts.param_dtype or recipe.model.dtype,
        # fp32 master shards, gathered in param_dtype for compute (MixedPrecisionPolicy)
        "weights_dtype": "float32" if needs_master_weights(recipe) else recipe.model.dtype,
        "reduce_dtype": opts.reduce_dtype,
        "cpu_offload": opts.cpu_offload,
        "activation_checkpointing": opts.activation_checkpointing,
        "wrap": "one unit per decoder layer, plus the root (embeddings, final norm, lm_head)",
    }


def needs_master_weights(recipe: Recipe) -> bool:
    """16-bit base weights train (full, freeze) and the recipe keeps `model.master_weights`: the strategy must keep
    float32 masters. DeepSpeed always does; DDP keeps them in its optimizer; FSDP shards them (`weights_dtype`)."""
    trains_base = recipe.method.name in ("full", "freeze")
    return trains_base and recipe.model.master_weights and recipe.model.dtype != "float32"


def ddp_config(recipe: Recipe) -> dict[str, Any]:
    """DDP: whether the optimizer steps float32 master copies of the 16-bit trainable weights; under gradual
    unfreezing, `find_unused_parameters`."""
    config: dict[str, Any] = {"master_weights": needs_master_weights(recipe)}
    if getattr(recipe.method, "unfreeze", None) is not None:
        # Frozen groups get no gradient: DDP must look for them each step instead of waiting for their buckets.
        config["find_unused_parameters"] = True
    return config


def strategy_config(recipe: Recipe, resources: "Resources", strategy: str,
                    memory_row: str | None = None) -> dict[str, Any] | None:
    """What goes into plan.json's `strategy_config`: the DeepSpeed JSON, the FSDP or the DDP settings."""
    options = strategy_spec(strategy).options
    if options == "deepspeed":
        return deepspeed_config(recipe, strategy, resources.world_size, model_hidden_size(recipe), memory_row)
    if options == "fsdp":
        return fsdp_config(recipe, resources, memory_row)
    return ddp_config(recipe)


def write_strategy_files(run_dir: Path, plan_json: dict[str, Any]) -> Path | None:
    """Write RUN_DIR/ds_config.json next to plan.json where DeepSpeed is used (the run directory contract)."""
    from launcher.common.rundir import write_json_atomic

    if strategy_spec(plan_json["strategy"]).zero_stage is None or not plan_json.get("strategy_config"):
        return None
    path = run_dir / DS_CONFIG_FILE
    write_json_atomic(path, plan_json["strategy_config"])
    return path


