"""Model and tokenizer: load (HF directory or GGUF), patch kernels, apply the method (full, freeze, LoRA, DoRA,
QLoRA: LoRA on a bitsandbytes 4/8-bit base, quantized while loading; prompt/prefix tuning, IA3 and bottleneck
adapters: launcher/train/peft_methods.py).

The model class follows `task.type` (TASK_MODEL_CLASSES); a classification task's head (`score` on decoder models,
`classifier` on encoders) is new, built with the run's labels (`head_config`, launcher/train/tasks.py), and trained
in full by every method: PEFT's SEQ_CLS / TOKEN_CLS task types put it in `modules_to_save`, freeze leaves it
trainable.

Order matters and is fixed here: load -> kernels (they patch the base modules, which PEFT then wraps) ->
gradient checkpointing -> method.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

import torch
import transformers
from transformers import PreTrainedModel

from launcher.config.schema import FreezeMethod, LoraFields, ModelConfig, QLoraMethod, Recipe
from launcher.common.model_files import model_dir, tokenizer_source

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TASK_MODEL_CLASSES = {"causal_lm": "AutoModelForCausalLM",
                      "sequence_classification": "AutoModelForSequenceClassification",
                      "token_classification": "AutoModelForTokenClassification",
                      "seq2seq": "AutoModelForSeq2SeqLM"}
"""The transformers auto class of each `task.type`."""

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
                   "token_classification": "TOKEN_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
"""PEFT's task type of each `task.type`: it picks the PeftModel subclass (forward arguments, generation) and, for
SEQ_CLS / TOKEN_CLS, adds the classification head to modules_to_save."""

HEAD_NAMES = ("score", "classifier")
"""Attribute names of the classification head in transformers' models (PEFT's SEQ_CLS_HEAD_NAMES)."""


def peft_task_type(recipe: Recipe) -> str:
    """The PEFT task type of a recipe: the one place PEFT configs (LoRA here, the other adapter methods) take it."""
    return PEFT_TASK_TYPES[recipe.task.type]


def model_class(task_type: str) -> Any:
    """The transformers auto class that builds a model for `task_type`."""
    return getattr(transformers, TASK_MODEL_CLASSES[task_type])


def load_base_model(cfg: ModelConfig, device: torch.device, quantization: Any = None,
                    meta: bool = False, dtype: str | None = None, task_type: str = "causal_lm",
                    head: dict[str, Any] | None = None) -> PreTrainedModel:
    """The pretrained model on `device`, in `dtype` (default cfg.dtype), of `task_type`'s class with the config
    overrides `head` (num_labels, id2label, ...: launcher/train/tasks.head_config). With `meta`, its architecture only
    (no weights read or allocated): a sharded strategy fills it from rank 0, so N ranks do not need N copies of the
    weights in CPU memory."""
    dtype = dtype or cfg.dtype
    auto_class = model_class(task_type)
    head = head or {}
    if meta:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir(cfg), trust_remote_code=cfg.trust_remote_code, **head)
        with torch.device("meta"):
            return auto_class.from_config(config, dtype=TORCH_DTYPES[dtype],
                                          attn_implementation=cfg.attn_implementation,
                                          trust_remote_code=cfg.trust_remote_code)
    model = auto_class.from_pretrained(
        model_dir(cfg),
        dtype=TORCH_DTYPES[dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        **head,
        **_quantized_load_kwargs(quantization, device),
    )
    return model.to(device)


def apply_method(model: PreTrainedModel, recipe: Recipe) -> torch.nn.Module:
    """Make exactly the parameters the method trains require grad; wrap with PEFT for adapters."""
    method = recipe.method
    if method.name == "full":
        model.requires_grad_(True)
        return model
    if isinstance(method, FreezeMethod):
        _freeze(model, method)
        _train_new_head(model)
        return model
    if method.name in ("lora", "dora"):
        assert isinstance(method, LoraFields)
        return _lora(model, method, use_dora=method.name == "dora", task_type=peft_task_type(recipe))
    if isinstance(method, QLoraMethod):
        _prepare_quantized(model, recipe)
        return _lora(model, method, use_dora=False, task_type=peft_task_type(recipe))
    from launcher.train.peft_methods import OTHER_METHODS, apply_other_method

    if isinstance(method, OTHER_METHODS):  # prompt_tuning, prefix_tuning, ia3, adapter
        return apply_other_method(model, method, peft_task_type(recipe), tokenizer_source(recipe.model))
    raise ValueError(f"method {method.name!r} cannot be trained in this version")


def _freeze(model: PreTrainedModel, method: FreezeMethod) -> None:
    model.requires_grad_(False)
    layers = _decoder_layers(model)
    if method.trainable_layers:
        if method.trainable_layers > len(layers):
            raise ValueError(f"method.trainable_layers({method.trainable_layers}) > layers in the model({len(layers)})")
        for layer in layers[len(layers) - method.trainable_layers:]:
            layer.requires_grad_(True)
    patterns = [re.compile(p) for p in method.trainable_patterns]
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method.trainable_patterns {method.trainable_patterns} match no parameter")


def _train_new_head(model: PreTrainedModel) -> None:
    """A classification head starts random: a method that freezes the base still trains it."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            head.requires_grad_(True)


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == getattr(model.config, "num_hidden_layers", -1):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to freeze")


def _lora(model: PreTrainedModel, method: LoraFields, use_dora: bool, task_type: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        # A classification head is trained whole (PEFT adds it to modules_to_save for SEQ_CLS / TOKEN_CLS), never
        # given a LoRA of its own: `all-linear` leaves it out for SEQ_CLS only; with TOKEN_CLS peft 0.21.2 wraps it
        # in LoRA and then fails ("modules_to_save cannot be applied to modules of type lora.Linear").
        exclude_modules=heads if task_type in ("SEQ_CLS", "TOKEN_CLS") and heads else None,
        modules_to_save=list(method.modules_to_save) or None,
        use_dora=use_dora,
        task_type=task_type,
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------- quantization
def resolved_quant_storage(method: QLoraMethod) -> str:
    """The packed 4-bit storage dtype to use; `auto` (a recipe that did not go through a plan) means uint8."""
    return "uint8" if method.quant_storage == "auto" else method.quant_storage


def quantization_config(recipe: Recipe) -> Any:
    """The BitsAndBytesConfig for a qlora recipe (None for every other method), passed to `from_pretrained`.

    The storage dtype is the plan's resolution of `quant_storage: auto` (see `launcher.plan.build.resolve_quant_storage`).
    """
    method = recipe.method
    if not isinstance(method, QLoraMethod):
        return None
    from transformers import BitsAndBytesConfig

    if method.bits == 8:
        # LLM.int8 casts fp32/bf16 inputs to fp16 in every matmul and logs it each time (a line per layer per
        # step); the cast is how it works, not news. Only that message is dropped from bitsandbytes' logger.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = resolved_quant_storage(method)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[method.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8 if storage == "uint8" else TORCH_DTYPES[storage],
    )


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    """Logging filter: False (drop) for bitsandbytes' per-matmul "inputs will be cast to float16" notice."""
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quantized_load_kwargs(quantization: Any, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` arguments for a quantized load: weights are quantized as they land on `device`, so the
    full-precision model never has to fit there (a later `.to(device)` would be too late for that)."""
    if quantization is None:
        return {}
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # ZeRO-3 partitions each weight as it is loaded (HfDeepSpeedConfig) and refuses a device_map.
        return {"quantization_config": quantization}
    return {"quantization_config": quantization, "device_map": {"": device}}


def _prepare_quantized(model: PreTrainedModel, recipe: Recipe) -> None:
    """Freeze the quantized base and make it trainable through adapters.

    peft's `prepare_model_for_kbit_training` also upcasts the remaining 16-bit weights (norms, embeddings, lm_head)
    to fp32 for stability. Its `use_gradient_checkpointing` defaults to True with reentrant checkpointing, so the
    recipe's choice is passed explicitly (build_model already enabled non-reentrant checkpointing when asked).
    Sharded QLoRA (float quant storage under fsdp/zero3) skips the upcast: those strategies need every parameter
    in one dtype to flatten and shard them.
    """
    method = recipe.method
    assert isinstance(method, QLoraMethod)
    _keep_4bit_layout_differentiable(model)
    storage = resolved_quant_storage(method)
    if method.bits == 4 and storage != "uint8":
        model.requires_grad_(False)
        return
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.model.gradient_checkpointing,
                                    gradient_checkpointing_kwargs={"use_reentrant": False})


def _keep_4bit_layout_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (0.50.2) converts a Linear4bit's weight, in place and for good, the first
    time it runs in eval mode without grad (our evaluations). Later training forwards then go through its
    `gemv_4bit` op, which has no autograd formula: the gradient stops at every quantized matmul, and adapters below
    it get wrong gradients silently (measured: layer-0 LoRA gradients off by ~70% after one evaluation). Keeping
    the training layout costs only eval speed on CPU; GPUs never repack.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the (possibly PEFT-wrapped) model holds bitsandbytes-quantized weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def build_model(recipe: Recipe, device: torch.device, meta: bool = False, dtype: str | None = None,
                share_quantized: Callable[[torch.nn.Module], None] | None = None,
                head: dict[str, Any] | None = None) -> torch.nn.Module:
    """Base model + kernels + checkpointing + method, on `device`, in `dtype` (default the recipe's; a strategy's
    `weights_dtype` under mixed precision), `meta`: no weights. `share_quantized` (a strategy's
    `share_quantized_layout`, collective) runs on a quantized base before anything else touches it. `head`: the
    config overrides of a classification task (launcher/train/tasks.head_config: labels, pad token), required then."""
    quantization = quantization_config(recipe)
    if recipe.task.type in ("sequence_classification", "token_classification") and not head:
        raise ValueError(f"task {recipe.task.type}: the model needs its labels (launcher/train/tasks.head_config)")
    model = load_base_model(recipe.model, device, quantization, meta=meta, dtype=dtype, task_type=recipe.task.type,
                            head=head)
    if head:
        model.config.use_cache = False  # a classifier never generates: no KV cache built in its forward passes
    if quantization is not None and share_quantized is not None:
        share_quantized(model)
    if recipe.kernels:
        from ftkernels.patch import apply_kernels

        applied = apply_kernels(model, recipe.kernels)
        log.info("kernels patched: %s", ", ".join(applied))
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if recipe.method.name not in ("full", "freeze"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad input
    return apply_method(model, recipe)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. ZeRO-3 leaves each rank an empty placeholder per parameter and keeps the
    full size in `ds_numel`."""

    def numel(param: torch.nn.Parameter) -> int:
        return int(getattr(param, "ds_numel", param.numel()))

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters), packed 4-bit weights counted as
    stored. FSDP's DTensors hold a local shard; ZeRO-3 a flat partition in `ds_tensor` (full size in `ds_numel`)."""
    local = full = 0
    for param in model.parameters():
        size = param.element_size()
        if hasattr(param, "ds_tensor"):
            local += param.ds_tensor.numel() * size
            full += int(param.ds_numel) * size
        elif hasattr(param, "to_local"):
            local += param.to_local().numel() * size
            full += param.numel() * size
        else:
            local += param.numel() * size
            full += param.numel() * size
    return local, full


def unwrap(model: Any) -> Any:
    """The module under DDP/other wrappers."""
    return getattr(model, "module", model)
