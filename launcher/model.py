"""Model and tokenizer: load (HF directory or GGUF), patch kernels, apply the method (full, freeze, LoRA, DoRA).

Order matters and is fixed here: load -> kernels (they patch the base modules, which PEFT then wraps) ->
gradient checkpointing -> method.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from launcher.schema import FreezeMethod, LoraFields, ModelConfig, Recipe

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(cfg: ModelConfig) -> Path:
    """The HF directory to load: the configured path, or the cached conversion of the GGUF file."""
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {path} has no config.json (expected a Hugging Face model directory)")
        return path
    from launcher.gguf_cache import convert_gguf_to_hf, resolve_gguf

    assert cfg.gguf is not None  # the schema guarantees one source
    return convert_gguf_to_hf(resolve_gguf(cfg.gguf))


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = Path(cfg.tokenizer) if cfg.tokenizer else model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions carry no labels and are masked out of attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir(cfg),
        dtype=TORCH_DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
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
        return model
    if method.name in ("lora", "dora"):
        assert isinstance(method, LoraFields)
        return _lora(model, method, use_dora=method.name == "dora")
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


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == getattr(model.config, "num_hidden_layers", -1):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to freeze")


def _lora(model: PreTrainedModel, method: LoraFields, use_dora: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        modules_to_save=list(method.modules_to_save) or None,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_model(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """Base model + kernels + checkpointing + method, on `device`, in the recipe's dtype."""
    model = load_base_model(recipe.model, device)
    if recipe.kernels:
        from kernels.patch import apply_kernels

        applied = apply_kernels(model, recipe.kernels)
        log.info("kernels patched: %s", ", ".join(applied))
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if recipe.method.name in ("lora", "dora"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad input
    return apply_method(model, recipe)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def unwrap(model: Any) -> Any:
    """The module under DDP/other wrappers."""
    return getattr(model, "module", model)
