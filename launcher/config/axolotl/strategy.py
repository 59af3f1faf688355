"""A deepspeed JSON or fsdp / fsdp_config -> `strategy:` (ZeRO stage and offload, FSDP2 settings)."""

from __future__ import annotations

import json
from typing import Any

from launcher.config.axolotl.builder import Builder, EMPTY


def strategy_section(b: Builder) -> None:
    uses_fsdp = bool(b.get("fsdp")) or bool(b.get("fsdp_config"))
    if b.get("deepspeed") and uses_fsdp:
        b.conflict("deepspeed", "fsdp_config" if b.get("fsdp_config") else "fsdp", "keep deepspeed or fsdp")
    if b.get("deepspeed"):
        _deepspeed(b, _deepspeed_json(b))
    if uses_fsdp:
        _fsdp(b)
    else:
        for key in ("fsdp", "fsdp_config", "fsdp_version", "fsdp_final_state_dict_type"):
            if b.config.get(key) is not None and key not in b.handled:
                b.skip(key, "FSDP is not turned on (no fsdp / fsdp_config)" if b.get(key) else EMPTY)


def _deepspeed_json(b: Builder) -> dict[str, Any]:
    value = b.get("deepspeed")
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        b.fail("deepspeed", "expected the path of a DeepSpeed JSON file (or its content as a mapping)")
    path = b.paths.locate(value)
    if path is None or not path.is_file():
        looked = ", ".join(dict.fromkeys(str(d) for d in b.paths.search))
        b.fail("deepspeed", f"{value}: file not found (looked in {looked})",
               "give the path of the JSON (`axolotl fetch deepspeed_configs` writes axolotl's)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        b.fail("deepspeed", f"{path}: not a readable JSON file ({err})", "fix the JSON")
    if not isinstance(data, dict):
        b.fail("deepspeed", f"{path}: expected a JSON object, got {type(data).__name__}")
    b.note(f"deepspeed: read {path}")
    return data


ZERO_OPTIONS = {"overlap_comm": bool, "contiguous_gradients": bool, "reduce_bucket_size": int,
                "allgather_bucket_size": int, "stage3_prefetch_bucket_size": int,
                "stage3_param_persistence_threshold": int, "stage3_gather_16bit_weights_on_model_save": bool,
                "gather_16bit_weights_on_model_save": bool}
"""zero_optimization keys that are strategy.deepspeed options of the same name (the last one is the old name)."""
DS_FROM_RECIPE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def _deepspeed(b: Builder, ds: dict[str, Any]) -> None:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        b.fail("deepspeed", "zero_optimization: expected a JSON object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        b.fail("deepspeed", f"zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    b.put("deepspeed.zero_optimization.stage", "strategy.name", f"zero{stage}" if stage else "ddp")
    for name, value in zero.items():
        key = f"deepspeed.zero_optimization.{name}"
        if name == "stage":
            continue
        if not stage:
            b.skip(key, "ZeRO stage 0 is plain data parallelism: translated as ddp, which has no such option")
        elif name in ("offload_optimizer", "offload_param"):
            _offload(b, key, name, value, stage)
        elif name in ZERO_OPTIONS:
            _zero_option(b, key, name, value)
        else:
            b.skip(key, "no ftlaunch option: ftlaunch writes the rest of RUN_DIR/ds_config.json itself")
    for name, value in ds.items():
        if name == "zero_optimization":
            continue
        why = ("ftlaunch fills it from the recipe (optim.*, model.dtype)" if name in DS_FROM_RECIPE
               else "no ftlaunch option: ftlaunch writes the rest of RUN_DIR/ds_config.json itself")
        b.skip(f"deepspeed.{name}", why)


def _offload(b: Builder, key: str, name: str, value: Any, stage: int) -> None:
    if not isinstance(value, dict):
        b.fail(key, "expected a JSON object with a device")
    device = str(value.get("device", "none"))
    if device not in ("none", "cpu", "nvme"):
        b.fail(key, f"device {device!r}: expected none, cpu or nvme")
    target = "offload_optimizer" if name == "offload_optimizer" else "offload_params"
    if device != "none" and name == "offload_param" and stage < 3:
        b.skip(key, f"ZeRO-{stage} keeps whole weights on every rank: DeepSpeed ignores offload_param below stage 3")
        return
    if device == "nvme" and stage < 3:
        b.skip(key, f"NVMe optimizer offload needs ZeRO-3 (ZeRO-{stage} would use CPU memory): not translated")
        return
    b.put(f"{key}.device", f"strategy.deepspeed.{target}", device)
    if value.get("nvme_path") and device == "nvme":
        b.put(f"{key}.nvme_path", "strategy.deepspeed.nvme_path", str(value["nvme_path"]))
    for sub in value:
        if sub == "pin_memory":
            b.skip(f"{key}.pin_memory", "ftlaunch pins CPU offload memory itself")
        elif sub not in ("device", "nvme_path"):
            b.skip(f"{key}.{sub}", "no ftlaunch option: DeepSpeed's default is used")


def _zero_option(b: Builder, key: str, name: str, value: Any) -> None:
    target = "stage3_gather_16bit_weights_on_model_save" if name == "gather_16bit_weights_on_model_save" else name
    if value == "auto":
        b.skip(key, "ftlaunch default already: derived from the model's hidden size as DeepSpeed's Hugging Face "
               "integration does")
    elif ZERO_OPTIONS[name] is bool:
        b.put(key, f"strategy.deepspeed.{target}", bool(value))
    else:
        b.put(key, f"strategy.deepspeed.{target}", b.number(key, value, int))


FSDP1_ONLY = ("use_orig_params", "sync_module_states", "backward_prefetch", "backward_prefetch_policy",
              "forward_prefetch", "limit_all_gathers")
FSDP_REASONS = {
    "state_dict_type": "ftlaunch checkpoints are always sharded (torch.distributed.checkpoint); `launch export` "
                       "writes a whole model",
    "final_state_dict_type": "ftlaunch writes a whole model at the end and on `launch export`",
    "cpu_ram_efficient_loading": "no ftlaunch option",
    "cpu_offload_pin_memory": "no ftlaunch option: offloaded state is pinned",
    "mixed_precision_policy": "ftlaunch gathers parameters in model.dtype (strategy.fsdp.param_dtype)",
    "min_num_params": "ftlaunch wraps each decoder layer, not by size",
    "transformer_layer_cls_to_wrap": "ftlaunch default already: it wraps each decoder layer",
}
SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "1": True, "2": False}


def _fsdp(b: Builder) -> None:
    source = "fsdp_config" if b.get("fsdp_config") else "fsdp"
    b.put(source, "strategy.name", "fsdp")
    words = b.get("fsdp") or []
    # transformers also takes the words as one string (`fsdp: "full_shard auto_wrap"`)
    for j, word in enumerate(words.split() if isinstance(words, str) else b.names("fsdp", words)):
        _fsdp_word(b, f"fsdp.{j}", word)
    config = b.get("fsdp_config", {})
    if not isinstance(config, dict):
        b.fail("fsdp_config", "expected a mapping of FSDP settings")
    for name, value in config.items():
        _fsdp_setting(b, f"fsdp_config.{name}", name.removeprefix("fsdp_"), value)
    for key in ("fsdp_version", "fsdp_final_state_dict_type"):
        if b.config.get(key) is not None:
            _fsdp_setting(b, key, key.removeprefix("fsdp_"), b.config[key])


def _fsdp_word(b: Builder, key: str, word: str) -> None:
    """One entry of axolotl's older `fsdp:` list (full_shard, shard_grad_op, offload, auto_wrap, ...)."""
    if word in ("full_shard", "shard_grad_op"):
        b.put(key, "strategy.fsdp.reshard_after_forward", word == "full_shard")
    elif word == "offload":
        b.put(key, "strategy.fsdp.cpu_offload", True)
    elif word == "auto_wrap":
        b.skip(key, "ftlaunch default already: it wraps each decoder layer")
    elif word.startswith("hybrid_shard"):
        b.skip(key, "set strategy.fsdp.hybrid_shard_size to the GPUs per node (ftlaunch needs the group size)")
    else:
        b.skip(key, f"{word}: no ftlaunch FSDP option")


def _fsdp_setting(b: Builder, key: str, name: str, value: Any) -> None:
    if value is None:
        b.skip(key, EMPTY)
    elif name == "version":
        b.skip(key, "ftlaunch's fsdp is FSDP2 (fully_shard) already" if str(value) == "2" else
               "FSDP1: ftlaunch runs FSDP2 (fully_shard); the settings were mapped as axolotl's FSDP1 -> FSDP2 "
               "table maps them")
    elif name in ("offload_params", "activation_checkpointing", "reshard_after_forward"):
        target = "cpu_offload" if name == "offload_params" else name
        b.put(key, f"strategy.fsdp.{target}", bool(value))
    elif name == "sharding_strategy":
        if str(value).upper() in SHARDING:
            b.put(key, "strategy.fsdp.reshard_after_forward", SHARDING[str(value).upper()])
        else:
            b.skip(key, f"{value}: set strategy.fsdp.hybrid_shard_size for hybrid sharding, or strategy.name: ddp "
                   "for none")
    elif name == "auto_wrap_policy":
        b.skip(key, "ftlaunch default already: it wraps each decoder layer" if value == "TRANSFORMER_BASED_WRAP"
               else f"{value}: ftlaunch wraps each decoder layer, not by size")
    elif name in FSDP1_ONLY:
        b.skip(key, "an FSDP1 setting: FSDP2 has none")
    else:
        b.skip(key, FSDP_REASONS.get(name, "no ftlaunch FSDP option"))
