"""Trainable parameters and saved activations of the methods beside LoRA: prompt tuning, prefix tuning, (IA)^3 and
bottleneck adapters, from a model's dimensions alone (`memory_model.ModelDims`).

Stdlib only (planning side). The counts are exact against the real PEFT 0.21 / launcher.train.adapters models
(tests/train/test_methods.py compares them on the tiny Llama). The per-architecture (IA)^3 defaults live here because
both sides need them: the planner to count, the rank side to build the PEFT config.
"""

from __future__ import annotations

from typing import Sequence

from launcher.plan.memory_model import ModelDims, linear_shapes

IA3_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    # Not in PEFT's table (or wrong for transformers 5): Phi-3 fuses q/k/v; Mixtral's and Qwen2-MoE's routed experts
    # are 3-D parameters in transformers 5.x, not Linear modules (PEFT's Mixtral default `w2` matches nothing), so
    # Mixtral rescales attention only and Qwen2-MoE its shared expert's down projection.
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj"), ()),
    "qwen2_moe": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}
"""model_type -> ((IA)^3 target modules), (feedforward modules among them)). PEFT 0.21's defaults
(TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING) where it has the architecture."""


def ia3_modules(model_type: str, targets: Sequence[str] | None,
                feedforward: Sequence[str] | None) -> tuple[list[str], list[str]] | None:
    """The (target, feedforward) module names for a recipe's `ia3` method, or None when the recipe leaves them to
    defaults this table does not have (PEFT's own table then decides, on the rank side).

    Targets left null take the architecture's default pair; feedforward modules left null are the default
    feedforward modules among the targets."""
    default = IA3_DEFAULTS.get(model_type)
    if targets is None:
        return (list(default[0]), list(default[1])) if default is not None else None
    if feedforward is None:
        feedforward = [m for m in (default[1] if default is not None else ()) if m in targets]
    return list(targets), list(feedforward)


def prompt_tuning_params(dims: ModelDims, num_virtual_tokens: int) -> int:
    """PEFT's PromptEmbedding: one embedding row of width hidden_size per virtual token, ``n * h`` (a causal LM has
    one transformer submodule; an encoder-decoder would have two)."""
    return num_virtual_tokens * dims.hidden_size


def prefix_kv_width(dims: ModelDims) -> int:
    """Width of one layer's key (or value) prefix: PEFT sizes it for grouped-query attention as
    ``num_key_value_heads * head_dim`` (peft.utils.other._prepare_prompt_learning_config; PEFT issue #1901)."""
    return dims.kv_out


def prefix_tuning_params(dims: ModelDims, num_virtual_tokens: int, projection: bool,
                         encoder_hidden_size: int | None) -> int:
    """PEFT's PrefixEncoder, with ``n`` virtual tokens, ``L`` layers and ``k`` = `prefix_kv_width`:

    * without projection, an embedding of ``n`` rows of ``L * 2 * k`` (a key and a value per layer): ``2nLk``;
    * with projection, an embedding ``n x k``, then Linear(k, E) with bias, tanh, Linear(E, 2Lk) with bias:
      ``n*k + (k*E + E) + (E*2Lk + 2Lk)``, E = `encoder_hidden_size` (default k). Only the projected ``2nLk`` table
      is saved in the adapter; the MLP exists while training.
    """
    k, layers = prefix_kv_width(dims), dims.num_layers
    if not projection:
        return num_virtual_tokens * layers * 2 * k
    hidden = encoder_hidden_size or k
    return num_virtual_tokens * k + (k * hidden + hidden) + (hidden * 2 * layers * k + 2 * layers * k)


def ia3_params(dims: ModelDims, targets: Sequence[str], feedforward: Sequence[str]) -> int:
    """(IA)^3 learns one vector per targeted linear (Liu et al. 2022, §3.3): it scales the input of a feedforward
    module (``in_features`` entries, PEFT's ``ia3_l`` of shape 1 x in) and the output of any other (``out_features``,
    shape out x 1). Names match a module's last path component, as for LoRA."""
    wanted, ff = set(targets), set(feedforward)
    return sum((s.in_features if s.name in ff else s.out_features) * s.count
               for s in linear_shapes(dims) if s.name in wanted)


def modules_to_save_params(dims: ModelDims, names: Sequence[str]) -> int:
    """Parameters of the modules PEFT trains in full beside an adapter (`modules_to_save`): PEFT wraps each in a
    trainable copy, so ``lm_head`` and ``embed_tokens`` add ``V * h`` each, tied or not. Other names (norms, a
    classifier head) are not counted here."""
    return sum(dims.vocab_size * dims.hidden_size for name in names if name in ("lm_head", "embed_tokens"))


def adapter_bottleneck(hidden_size: int, bottleneck: int | None, reduction_factor: int) -> int:
    """The bottleneck width: as given, else ``hidden_size // reduction_factor`` (at least 1)."""
    return bottleneck if bottleneck is not None else max(1, hidden_size // reduction_factor)


def adapter_params(dims: ModelDims, bottleneck: int, placements: int) -> int:
    """Bottleneck adapters (Houlsby et al. 2019): per placement and layer a down-projection Linear(h, b) and an
    up-projection Linear(b, h), both with bias: ``h*b + b + b*h + h = 2hb + b + h``; times the layers and the
    placements (attention, MLP)."""
    h = dims.hidden_size
    return (2 * h * bottleneck + bottleneck + h) * dims.num_layers * placements


def ia3_activation_bytes_per_token(dims: ModelDims, targets: Sequence[str], feedforward: Sequence[str],
                                   adapter_bytes: int = 4) -> int:
    """Bytes per token saved for backward by (IA)^3, over all layers: each scaling's gradient needs the tensor it
    multiplies, which PEFT casts to the vector's dtype (fp32): the input of a feedforward module, the output of any
    other. Equal to `ia3_params` times the bytes per element."""
    return adapter_bytes * ia3_params(dims, targets, feedforward)


def adapter_activation_bytes_per_token(dims: ModelDims, bottleneck: int, placements: int,
                                       adapter_bytes: int = 4) -> int:
    """Bytes per token saved for backward by bottleneck adapters, over all layers: per placement the block output
    cast to the adapter's dtype (saved by the down-projection), the down-projection output (saved by the
    nonlinearity) and the nonlinearity's output (saved by the up-projection): ``adapter_bytes * (h + 2b)``."""
    return adapter_bytes * (dims.hidden_size + 2 * bottleneck) * dims.num_layers * placements
