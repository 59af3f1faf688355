"""base_model, precision, attention, gradient checkpointing -> `model:`; adapter, quantization, LoRA -> `method:`."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from launcher.config.axolotl.builder import Builder, OFF, REMOTE, is_hub_like
from launcher.config.schema import LORA_TARGET_ALL


# --------------------------------------------------------------------------------------------------------- model
ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager"}
OTHER_ATTENTION = ("xformers_attention", "flex_attention", "s2_attention")


def model_section(b: Builder) -> str | None:
    """model.*; returns the training dtype when a key decides it (QLoRA's compute dtype follows it)."""
    _base_model(b)
    tokenizer = b.get("tokenizer_config")
    if tokenizer is not None and not isinstance(tokenizer, str):
        b.fail("tokenizer_config", "expected a tokenizer directory")
    if tokenizer is not None:
        local = b.paths.locate(tokenizer)
        if local is not None:
            b.put("tokenizer_config", "model.tokenizer", b.paths.for_recipe(local))
        else:
            b.skip("tokenizer_config", f"{tokenizer} is not a local directory: ftlaunch works offline; download it "
                   "and set model.tokenizer")
    if b.get("trust_remote_code") is not None:
        b.put("trust_remote_code", "model.trust_remote_code", bool(b.get("trust_remote_code")))
    _gradient_checkpointing(b)
    _attention(b)
    return _precision(b)


def _base_model(b: Builder) -> None:
    base = b.get("base_model")
    if not isinstance(base, str) or not base.strip():
        b.fail("base_model", "required: the model to fine-tune (a string)",
               "set base_model to a local Hugging Face model directory")
    local = b.paths.locate(base)
    if local is not None:
        b.put("base_model", "model.path", b.paths.for_recipe(local))
        return
    if is_hub_like(base) or base.startswith(REMOTE):
        target = b.paths.recipe_dir / "models" / PurePosixPath(base.rstrip("/")).name
        b.put("base_model", "model.path", b.paths.for_recipe(target))
        fetch = (f"`huggingface-cli download {base} --local-dir {target}`" if is_hub_like(base)
                 else f"copy it to {target}")
        b.note(f"base_model {base} is not a local directory (a Hugging Face Hub id or a URL), and ftlaunch trains "
               f"offline from local directories: download it first ({fetch}), or set model.path to a copy you have")
        return
    missing = b.paths.missing(base)
    b.put("base_model", "model.path", b.paths.for_recipe(missing))
    b.note(f"base_model {base}: {missing} does not exist here; put the model directory there or change model.path")


def _gradient_checkpointing(b: Builder) -> None:
    value = b.config.get("gradient_checkpointing")
    if value is None:
        return
    b.put("gradient_checkpointing", "model.gradient_checkpointing", bool(value))
    if isinstance(value, str):  # `offload` / `offload_disk`: recomputation plus moving activations off the GPU
        b.note(f"gradient_checkpointing: {value}: ftlaunch recomputes activations but does not offload them")
    if b.get("gradient_checkpointing_kwargs"):
        b.skip("gradient_checkpointing_kwargs", "no ftlaunch equivalent: ftlaunch checkpoints each decoder layer "
               "with its own settings")


def _attention(b: Builder) -> None:
    chosen = [key for key in (*ATTENTION, *OTHER_ATTENTION) if b.get(key)]
    if len(chosen) > 1:
        b.conflict(chosen[0], chosen[1], "keep one attention implementation")
    for key in (*ATTENTION, *OTHER_ATTENTION):
        value = b.config.get(key)
        if value is None:
            continue
        if not value:
            b.skip(key, OFF)
        elif key in ATTENTION:
            b.put(key, "model.attn_implementation", ATTENTION[key])
        else:
            b.skip(key, "no ftlaunch equivalent: model.attn_implementation is eager, sdpa (default) or "
                   "flash_attention_2")


def _precision(b: Builder) -> str | None:
    bf16, fp16 = b.config.get("bf16"), b.config.get("fp16")
    if bf16 in (True, "full") and fp16:
        b.conflict("bf16", "fp16", "keep bf16 (Ampere GPUs and later) or fp16")
    if fp16:
        b.put("fp16", "model.dtype", "float16")
        if bf16 is not None:
            b.skip("bf16", "fp16 decides the dtype")
        return "float16"
    if fp16 is not None:
        b.skip("fp16", OFF)
    if bf16 is None:
        return None  # axolotl's default `auto` is bf16 on every GPU ftlaunch targets: ftlaunch's default too
    if bf16 is False:
        b.put("bf16", "model.dtype", "float32")
        return "float32"
    b.put("bf16", "model.dtype", "bfloat16")
    if bf16 == "auto":
        b.note("bf16: auto trains in bf16 where the GPU has it; ftlaunch trains in model.dtype (bfloat16 here; "
               "set model.dtype: float32 for CPU runs)")
    return "bfloat16"

# -------------------------------------------------------------------------------------------------------- method
QUANT_KWARGS = {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
                "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage"}
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
             "lora_modules_to_save", "lora_model_dir", "lora_fan_in_fan_out", "peft_use_dora", "peft_use_rslora",
             "bnb_config_kwargs")


def method_section(b: Builder, dtype: str | None) -> None:
    adapter, q4, q8 = b.get("adapter"), bool(b.get("load_in_4bit")), bool(b.get("load_in_8bit"))
    if q4 and q8:
        b.conflict("load_in_4bit", "load_in_8bit", "keep load_in_4bit (QLoRA) or load_in_8bit")
    for key, on in (("load_in_4bit", q4), ("load_in_8bit", q8)):
        if b.config.get(key) is not None and not on:
            b.skip(key, OFF)
    if adapter is None:
        _full_method(b, q4, q8)
        return
    if adapter not in ("lora", "qlora"):
        b.fail("adapter", f"adapter {adapter!r} has no ftlaunch method", "use adapter: lora or qlora, or leave it "
               "out for full fine-tuning")
    if adapter == "qlora" and q8:
        b.conflict("adapter", "load_in_8bit", "qlora quantizes the base to 4 bits: use adapter: lora with "
                   "load_in_8bit, or load_in_4bit")
    bits = 8 if q8 else 4 if (q4 or adapter == "qlora") else None
    _adapter_name(b, adapter, bits)
    _lora_fields(b)
    if bits is not None:
        _quant_fields(b, bits, dtype)
    elif b.get("bnb_config_kwargs"):
        b.skip("bnb_config_kwargs", "the base is not quantized (no load_in_4bit / load_in_8bit)")
    if b.get("unfrozen_parameters"):
        b.skip("unfrozen_parameters", "an adapter trains its own weights: ftlaunch's freeze method is for full "
               "fine-tuning")


def _full_method(b: Builder, q4: bool, q8: bool) -> None:
    if q4 or q8:
        key = "load_in_4bit" if q4 else "load_in_8bit"
        b.fail(key, "a quantized base trains adapters only, and no adapter is set",
               "set adapter: qlora (with load_in_4bit) or adapter: lora, or drop the quantization")
    patterns = b.get("unfrozen_parameters")
    if patterns:
        b.put("unfrozen_parameters", "method.name", "freeze")
        b.put("unfrozen_parameters", "method.trainable_patterns", b.names("unfrozen_parameters", patterns))
    else:
        b.put("adapter (not set)", "method.name", "full")  # ftlaunch's default method is lora: say full
    for key in LORA_ONLY:
        if b.config.get(key) is not None:
            b.skip(key, "no adapter is set: axolotl ignores it as well")


def _adapter_name(b: Builder, adapter: str, bits: int | None) -> None:
    dora = b.get("peft_use_dora")
    if dora and bits is not None:
        b.conflict("load_in_4bit" if bits == 4 else "load_in_8bit", "peft_use_dora",
                   "ftlaunch's dora trains on an unquantized base: drop peft_use_dora or the quantization")
    if dora:  # both keys decide it: adapter: lora plus peft_use_dora
        b.put("adapter", "method.name", "dora")
        b.put("peft_use_dora", "method.name", "dora")
    else:
        b.put("adapter", "method.name", "qlora" if bits is not None else "lora")
        if b.config.get("peft_use_dora") is not None:
            b.skip("peft_use_dora", OFF)
    if bits is not None:
        source = f"load_in_{bits}bit" if b.get(f"load_in_{bits}bit") else "adapter"
        b.put(source, "method.bits", bits)
        if source == "adapter":
            b.note("adapter: qlora without load_in_4bit (axolotl refuses that): translated as a 4-bit base")


def _lora_fields(b: Builder) -> None:
    if b.config.get("lora_r") is not None:
        b.put("lora_r", "method.r", b.number("lora_r", b.config["lora_r"], int))
    if b.config.get("lora_alpha") is not None:
        b.put("lora_alpha", "method.alpha", b.number("lora_alpha", b.config["lora_alpha"]))
    dropout = b.config.get("lora_dropout")
    # axolotl's default dropout is 0 and ftlaunch's 0.05: write it either way.
    b.put("lora_dropout" if dropout is not None else "lora_dropout (axolotl default)", "method.dropout",
          0.0 if dropout is None else b.number("lora_dropout", dropout))
    _lora_targets(b)
    if b.get("lora_modules_to_save"):
        b.put("lora_modules_to_save", "method.modules_to_save", b.names("lora_modules_to_save",
                                                                        b.get("lora_modules_to_save")))
    reasons = {"lora_model_dir": "no ftlaunch equivalent: training starts from new adapters",
               "lora_fan_in_fan_out": "no ftlaunch equivalent (PEFT detects Conv1D layers itself)",
               "peft_use_rslora": "no ftlaunch equivalent: updates are scaled by alpha / r"}
    for key, reason in reasons.items():
        value = b.config.get(key)
        if value is not None:
            b.skip(key, reason if value else OFF)


def _lora_targets(b: Builder) -> None:
    modules, linear = b.config.get("lora_target_modules"), b.get("lora_target_linear")
    if linear:
        b.put("lora_target_linear", "method.target_modules", LORA_TARGET_ALL)
        if modules:
            b.skip("lora_target_modules", "covered: lora_target_linear adapts every linear layer, these included")
        return
    if b.config.get("lora_target_linear") is not None:
        b.skip("lora_target_linear", OFF)
    if not modules:
        b.note("neither lora_target_modules nor lora_target_linear is set: ftlaunch adapts every linear layer "
               "(method.target_modules: all-linear)")
        return
    if isinstance(modules, str):
        if modules.replace("_", "-") == LORA_TARGET_ALL:
            b.put("lora_target_modules", "method.target_modules", LORA_TARGET_ALL)
            return
        if not re.fullmatch(r"\w+", modules):
            b.fail("lora_target_modules", f"{modules!r} is a regular expression; ftlaunch takes module names",
                   "list the module names (q_proj, v_proj, ...) or set lora_target_linear: true")
    b.put("lora_target_modules", "method.target_modules", b.names("lora_target_modules", modules))


def _quant_fields(b: Builder, bits: int, dtype: str | None) -> None:
    kwargs = b.get("bnb_config_kwargs", {})
    if not isinstance(kwargs, dict):
        b.fail("bnb_config_kwargs", "expected a mapping of BitsAndBytesConfig arguments")
    for name, value in kwargs.items():
        key = f"bnb_config_kwargs.{name}"
        if name in QUANT_KWARGS and bits == 4:
            text = str(value).removeprefix("torch.")
            b.put(key, f"method.{QUANT_KWARGS[name]}", value if isinstance(value, bool) else text)
        else:
            b.skip(key, "no ftlaunch equivalent" if bits == 4 else "8-bit bases take no quantization options")
    if bits == 4 and dtype is not None and "bnb_4bit_compute_dtype" not in kwargs:
        # axolotl computes the 4-bit matmuls in the training dtype.
        b.put("bf16" if dtype != "float16" else "fp16", "method.compute_dtype", dtype)
