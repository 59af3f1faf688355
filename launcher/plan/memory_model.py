"""Per-GPU memory planner: parameter counts from a model's ``config.json``, memory per strategy.

Pure standard library on purpose: ``launch plan`` imports this on a login node with no GPU and must answer in
well under a second, so nothing here imports torch, transformers or deepspeed (a test checks it).

The figures are *estimates of the peak allocated bytes per GPU* for one training step. They follow published
accounting (each formula's docstring names its source and what was adapted) and the module layout of the installed
transformers 5.x models (module names, which weights are ``nn.Linear``, which parameters are fused).

Conventions used throughout:

* ``P``: parameters of the model (``ParamCounts.total``); ``T``: trainable parameters; ``N``: the number of ranks a
  sharded state is split over (``world_size``, or ``shard_group_size`` for hybrid sharding).
* "compute dtype" is ``param_dtype`` (bf16/fp16 = 2 bytes, fp32 = 4 bytes).
* Mixed precision keeps an fp32 master copy of every trainable parameter (Micikevicius et al. 2018, "Mixed Precision
  Training"), which is where the ZeRO paper's 2 + 2 + 12 bytes/param come from (Rajbhandari et al. 2020, §3.1).

Public API (what ``launcher/plan/memory.py`` calls)::

    read_model_config(path) -> dict
    count_parameters(config) -> ParamCounts
    lora_trainable_params(counts_or_dims, rank=..., targets=..., dora=False) -> int
    last_layers_params(counts, layers) -> int
    estimate_memory(counts, *, method=..., strategy=..., world_size=..., ...) -> MemoryEstimate
    plan_strategies(counts, *, nodes, gpus_per_node, gpu_mem_bytes, **training) -> list[StrategyRow]
    choose_strategy(rows) -> (name | None, reason)
    largest_micro_batch(counts, *, gpu_mem_bytes, **training) -> int
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

__all__ = [
    "ALLOCATOR_FRAGMENTATION_FACTOR",
    "CUDA_CONTEXT_BYTES",
    "DEEPSPEED_DEFAULT_BUCKET_ELEMENTS",
    "DEFAULT_STRATEGY_ORDER",
    "GiB",
    "LOGITS_BYTES_PER_ELEMENT",
    "LinearShape",
    "MemoryEstimate",
    "Method",
    "ModelDims",
    "NCCL_BUFFER_BYTES",
    "Optimizer",
    "ParamCounts",
    "ParamDtype",
    "Strategy",
    "StrategyRow",
    "SUPPORTED_MODEL_TYPES",
    "choose_strategy",
    "count_parameters",
    "estimate_memory",
    "largest_micro_batch",
    "last_layers_params",
    "linear_shapes",
    "lora_trainable_params",
    "model_dims",
    "plan_strategies",
    "read_model_config",
]

GiB = 1024**3
MiB = 1024**2

Method = Literal["full", "freeze", "lora", "dora", "qlora", "int8", "prompt_tuning", "prefix_tuning", "ia3", "adapter"]
Strategy = Literal["ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp_hybrid"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
ParamDtype = Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]

# ----------------------------------------------------------------------------------------------------------------
# Named constants (each one is an assumption; change it here, not inline)

CUDA_CONTEXT_BYTES: int = 768 * MiB
"""CUDA context + loaded kernel images + cuBLAS/cuDNN workspaces per process. PyTorch 2.x on Hopper/Ampere shows
0.5-1 GiB of device memory in ``nvidia-smi`` that ``torch.cuda.memory_allocated`` never reports; we take 0.75 GiB."""

NCCL_BUFFER_BYTES: int = 256 * MiB
"""NCCL communicator buffers and channels per process once ``world_size > 1`` (grows with the number of
communicators; one data-parallel group assumed)."""

ALLOCATOR_FRAGMENTATION_FACTOR: float = 1.10
"""PyTorch's caching allocator rounds and splits blocks; reserved memory typically exceeds allocated by 5-15%.
Applied to all tensor bytes (weights, grads, optimizer, activations, logits): ``framework += (factor - 1) * tensors``."""

DEEPSPEED_DEFAULT_BUCKET_ELEMENTS: int = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` and ``allgather_bucket_size`` (elements). ZeRO-1/2 hold a reduce
bucket and an all-gather bucket of this many compute-dtype elements; ZeRO-3 holds a reduce bucket plus its
prefetch bucket (``stage3_prefetch_bucket_size``, default 5e7). Plans that write smaller buckets should pass
``ds_bucket_elements``."""

DEEPSPEED_DEFAULT_PREFETCH_ELEMENTS: int = 50_000_000
"""DeepSpeed's default ``stage3_prefetch_bucket_size`` (elements)."""

LOGITS_BYTES_PER_ELEMENT: int = 10
"""Peak bytes per logit element with un-fused cross-entropy (transformers' ``ForCausalLMLoss``):
2 (compute-dtype logits kept in the model output) + 4 (``logits.float()`` then ``log_softmax``, whose fp32 output is
saved for backward; the fp32 upcast itself is freed once log_softmax returns) + 4 (the fp32 gradient of the logits
during backward). The compute-dtype gradient cast afterwards replaces the fp32 one."""

NF4_BYTES_PER_PARAM: float = 0.5
"""4-bit NormalFloat storage (Dettmers et al. 2023, "QLoRA", §3): 4 bits per weight."""

NF4_BLOCK: int = 64
"""QLoRA quantization block size for weights (§3: "blocksize of 64")."""

NF4_DOUBLE_QUANT_BLOCK: int = 256
"""QLoRA second-level block size for the quantization constants (§3, Double Quantization: "blocksize of 256")."""

ADAM_8BIT_BLOCK: int = 256
"""Block size of block-wise 8-bit optimizer states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization", §2: 2048 in the paper; bitsandbytes uses 256 for its block-wise kernels)."""

LIGER_CHUNK_RULE = "ceil(tokens / ceil(vocab / hidden))"
"""Chunk size rule of Liger-Kernel's fused linear cross-entropy: chunks are sized so that one chunk of logits has
about as many elements as the hidden states (``chunk_size = next_pow2(ceil(BT / ceil(V / H)))``)."""

DEFAULT_STRATEGY_ORDER: tuple[str, ...] = (
    "ddp",
    "zero1",
    "zero2",
    "fsdp_hybrid",
    "fsdp",
    "zero3",
    "zero3_offload_optimizer",
    "zero3_offload",
)
"""Preference order of ``choose_strategy``: least communication first. DDP, ZeRO-1 and ZeRO-2 move the same bytes
per step as an all-reduce (ZeRO paper §7.2: 2Ψ); full parameter sharding (FSDP / ZeRO-3) moves 1.5x that (3Ψ);
hybrid sharding keeps the extra all-gathers inside a node, so it precedes world-wide FSDP. CPU offload last: it adds
PCIe traffic and a CPU optimizer step."""

# ----------------------------------------------------------------------------------------------------------------
# Model dimensions and parameter counts

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt_neox",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)

# Values transformers' config classes use when a key is absent from config.json (``save_pretrained`` writes only
# the keys that differ from the class defaults). Read from transformers 5.x ``configuration_*.py``.
_DEFAULT_TIE: dict[str, bool] = {"gemma": True, "gemma2": True, "gemma3_text": True}
_DEFAULT_HEAD_DIM: dict[str, int] = {"qwen3": 128, "qwen3_moe": 128, "gemma": 256, "gemma2": 256, "gemma3_text": 256}
_DEFAULT_EXPERTS: dict[str, tuple[int, int]] = {"mixtral": (8, 2), "qwen2_moe": (60, 4), "qwen3_moe": (128, 8)}


@dataclass(frozen=True)
class ModelDims:
    """The shape of a decoder-only transformer, normalized across families from its ``config.json``."""

    model_type: str
    """transformers ``model_type`` (e.g. ``"llama"``, ``"qwen2_moe"``)."""

    hidden_size: int
    """Width of the residual stream, h."""

    num_layers: int
    """Number of decoder layers, L (``num_hidden_layers``)."""

    num_attention_heads: int
    """Query heads, a."""

    num_key_value_heads: int
    """Key/value heads (GQA); equals ``num_attention_heads`` for multi-head attention."""

    head_dim: int
    """Per-head width d; ``head_dim`` in the config overrides ``hidden_size // num_attention_heads``."""

    intermediate_size: int
    """Dense MLP width (the SwiGLU/GELU inner dimension) of non-MoE layers."""

    vocab_size: int
    """Rows of the embedding and the LM head, V."""

    tie_word_embeddings: bool
    """The LM head shares the embedding matrix (counted once)."""

    qkv_bias: bool
    """q/k/v projections carry a bias (always in Qwen2, ``attention_bias`` elsewhere, ``qkv_bias`` in Qwen2-MoE)."""

    o_bias: bool
    """The attention output projection carries a bias."""

    mlp_bias: bool
    """MLP projections carry biases (Llama ``mlp_bias``; always in GPT-NeoX)."""

    qk_norm: bool
    """RMSNorm over head_dim applied to q and k (Qwen3, Gemma 3): 2 * head_dim parameters per layer."""

    norms_per_layer: int
    """Norm modules per decoder layer (2; Gemma 2/3 have 4: pre/post attention and pre/post MLP)."""

    norm_has_bias: bool
    """LayerNorm with bias (GPT-NeoX) instead of RMSNorm: 2h parameters per norm instead of h."""

    fused_qkv: bool
    """One ``qkv_proj`` / ``query_key_value`` linear instead of three (Phi-3, GPT-NeoX)."""

    fused_gate_up: bool
    """One ``gate_up_proj`` linear instead of two (Phi-3)."""

    gated_mlp: bool
    """SwiGLU/GeGLU MLP (gate, up, down) rather than a two-matrix GELU MLP (GPT-NeoX)."""

    num_experts: int
    """Routed experts per MoE layer (0 for dense models)."""

    experts_per_token: int
    """Experts each token is routed to (top-k)."""

    moe_intermediate_size: int
    """Inner width of one routed expert."""

    shared_expert_intermediate_size: int
    """Inner width of the always-active shared expert (Qwen2-MoE); 0 when absent."""

    moe_layers: tuple[int, ...]
    """Indices of the layers whose MLP is a sparse MoE block; the others use the dense MLP."""

    @property
    def q_out(self) -> int:
        """Output features of the query projection, a * d."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        """Output features of the key (or value) projection, kv * d."""
        return self.num_key_value_heads * self.head_dim


def _get(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def _require(config: Mapping[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise KeyError(f"config.json of model_type {config.get('model_type')!r} lacks {key!r}")
    return config[key]


MAX_DIMENSION = 2**40
"""No model dimension comes near this; a config.json claiming more is broken (or hostile), not a bigger model."""


def _count(config: Mapping[str, Any], key: str, default: Any = None, *, minimum: int = 1) -> int:
    """A dimension from config.json as an int in [minimum, MAX_DIMENSION] (required when there is no default):
    a ValueError naming the key otherwise, never a ZeroDivisionError or OverflowError further down."""
    value = _require(config, key) if default is None else _get(config, key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_DIMENSION:
        raise ValueError(f"config.json: {key} is {value!r}, expected an integer from {minimum} to {MAX_DIMENSION}")
    return value


def model_dims(config: Mapping[str, Any]) -> ModelDims:
    """Normalize a ``config.json`` dict into ``ModelDims``.

    Multimodal wrappers that nest the language model under ``text_config`` are unwrapped. Keys absent from the file
    take the defaults of transformers' config classes (``save_pretrained`` omits keys equal to those defaults).
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
        model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    hidden = _count(config, "hidden_size")
    heads = _count(config, "num_attention_heads")
    kv_heads = _count(config, "num_key_value_heads", heads)
    if model_type == "gpt_neox":
        head_dim = hidden // heads  # query_key_value is always 3h wide
    else:
        head_dim = _count(config, "head_dim", _DEFAULT_HEAD_DIM.get(model_type, hidden // heads))
    num_layers = _count(config, "num_hidden_layers")

    moe = model_type in _DEFAULT_EXPERTS
    num_experts, top_k = 0, 0
    moe_inter, shared_inter = 0, 0
    moe_layers: tuple[int, ...] = ()
    if moe:
        default_e, default_k = _DEFAULT_EXPERTS[model_type]
        num_experts = _count(config, "num_local_experts", _get(config, "num_experts", default_e))
        top_k = _count(config, "num_experts_per_tok", default_k)
        if model_type == "mixtral":
            moe_inter = _count(config, "intermediate_size")
            moe_layers = tuple(range(num_layers))
        else:
            moe_inter = _count(config, "moe_intermediate_size", 1408 if model_type == "qwen2_moe" else 768)
            step = _count(config, "decoder_sparse_step", 1)
            mlp_only = set(_get(config, "mlp_only_layers", []))
            if num_experts > 0:
                moe_layers = tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
            if model_type == "qwen2_moe":
                shared_inter = _count(config, "shared_expert_intermediate_size", 5632, minimum=0)

    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(_get(config, "qkv_bias", True)), False
    elif model_type in ("mistral", "mixtral", "phi3"):
        qkv_bias = o_bias = False
    else:
        attention_bias = bool(_get(config, "attention_bias", model_type == "gpt_neox"))
        qkv_bias = o_bias = attention_bias

    return ModelDims(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if model_type == "gpt_neox" else kv_heads,
        head_dim=head_dim,
        intermediate_size=_count(config, "intermediate_size", 4 * hidden),
        vocab_size=_count(config, "vocab_size"),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", _DEFAULT_TIE.get(model_type, False))),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=True if model_type == "gpt_neox" else bool(_get(config, "mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        norm_has_bias=model_type == "gpt_neox",
        fused_qkv=model_type in ("phi3", "gpt_neox"),
        fused_gate_up=model_type == "phi3",
        gated_mlp=model_type != "gpt_neox",
        num_experts=num_experts,
        experts_per_token=top_k,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter,
        moe_layers=moe_layers,
    )


@dataclass(frozen=True)
class LinearShape:
    """One ``nn.Linear`` inside a decoder layer, as PEFT and bitsandbytes see it."""

    name: str
    """Module name (last path component), the string LoRA ``target_modules`` match."""

    in_features: int
    """Input features."""

    out_features: int
    """Output features."""

    bias: bool
    """Whether it carries a bias."""

    count: int
    """How many such modules the whole model has (layers it appears in)."""


def _layer_linears(dims: ModelDims, moe_layer: bool) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, bias) of every ``nn.Linear`` in one decoder layer (transformers 5.x module layout).

    MoE routed experts are *not* listed: transformers 5.x stores them as 3-D ``nn.Parameter`` tensors
    (``experts.gate_up_proj``, ``experts.down_proj``), so bitsandbytes does not quantize them and LoRA
    ``target_modules`` do not match them. Routers are ``nn.Parameter`` too (``MixtralTopKRouter`` etc.).
    """
    h, d = dims.hidden_size, dims
    out: list[tuple[str, int, int, bool]] = []
    if dims.model_type == "gpt_neox":
        out += [("query_key_value", h, 3 * h, d.qkv_bias), ("dense", h, h, d.o_bias)]
    elif dims.fused_qkv:
        out += [("qkv_proj", h, d.q_out + 2 * d.kv_out, d.qkv_bias), ("o_proj", d.q_out, h, d.o_bias)]
    else:
        out += [
            ("q_proj", h, d.q_out, d.qkv_bias),
            ("k_proj", h, d.kv_out, d.qkv_bias),
            ("v_proj", h, d.kv_out, d.qkv_bias),
            ("o_proj", d.q_out, h, d.o_bias),
        ]
    if moe_layer:
        if d.shared_expert_intermediate_size:
            s = d.shared_expert_intermediate_size
            out += [("gate_proj", h, s, False), ("up_proj", h, s, False), ("down_proj", s, h, False)]
            out += [("shared_expert_gate", h, 1, False)]
        return out
    i = d.intermediate_size
    if not d.gated_mlp:
        out += [("dense_h_to_4h", h, i, d.mlp_bias), ("dense_4h_to_h", i, h, d.mlp_bias)]
    elif d.fused_gate_up:
        out += [("gate_up_proj", h, 2 * i, d.mlp_bias), ("down_proj", i, h, d.mlp_bias)]
    else:
        out += [("gate_proj", h, i, d.mlp_bias), ("up_proj", h, i, d.mlp_bias), ("down_proj", i, h, d.mlp_bias)]
    return out


def linear_shapes(dims: ModelDims) -> list[LinearShape]:
    """All decoder-layer ``nn.Linear`` modules of the model, grouped by identical (name, shape)."""
    moe = set(dims.moe_layers)
    grouped: dict[tuple[str, int, int, bool], int] = {}
    for layer in range(dims.num_layers):
        for key in _layer_linears(dims, layer in moe):
            grouped[key] = grouped.get(key, 0) + 1
    return [LinearShape(n, i, o, b, c) for (n, i, o, b), c in grouped.items()]


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts derived from ``config.json`` alone; exact vs ``sum(p.numel() for p in model.parameters())``
    of the transformers 5.x ``*ForCausalLM`` (tied weights counted once)."""

    dims: ModelDims
    """The normalized dimensions the counts came from."""

    total: int
    """All parameters, P."""

    active: int
    """Parameters used per token: total minus the routed experts a token does not visit (equals ``total`` for
    dense models). Embedding and LM head included, as in Mixtral's published 12.9B."""

    embedding: int
    """Input embedding, V * h."""

    lm_head: int
    """Untied LM head, V * h; 0 when tied to the embedding."""

    decoder_layers: int
    """Sum over all decoder layers (attention, MLP/MoE, norms)."""

    largest_layer: int
    """Largest single decoder layer (an FSDP wrapping unit)."""

    layer_params: tuple[int, ...]
    """Parameters of each decoder layer in order (they differ between dense and MoE layers)."""

    largest_module: int
    """Most parameters held directly by one module (DeepSpeed's ``largest_layer_params`` in
    ``estimate_zero3_model_states_mem_needs``): the embedding, the LM head, the biggest linear, or a fused MoE
    ``experts`` module."""

    linear_weights: int
    """Weight elements of decoder-layer ``nn.Linear`` modules: what bitsandbytes quantizes for QLoRA / 8-bit
    (biases, norms, embeddings, LM head, routers and transformers-5 fused experts stay in the compute dtype)."""

    linear_rows: int
    """Sum of ``out_features`` over those linears (LLM.int8 stores one fp32 scale per output row)."""

    largest_linear: int
    """Weight elements of the biggest decoder-layer ``nn.Linear`` (dequantized transiently by bitsandbytes)."""

    @property
    def root_unit(self) -> int:
        """Parameters outside the decoder layers (embedding, LM head, final norm): FSDP's root unit."""
        return self.total - self.decoder_layers


def count_parameters(config: Mapping[str, Any]) -> ParamCounts:
    """Count parameters from a ``config.json`` dict.

    Per decoder layer (h hidden, a heads, kv key/value heads, d head_dim, I MLP width, E experts of width I_e):

    * attention: ``h*a*d`` (q) + ``2*h*kv*d`` (k, v) + ``a*d*h`` (o), plus ``a*d + 2*kv*d`` for q/k/v biases
      (Qwen2) and ``h`` for an o bias; GPT-NeoX's fused ``query_key_value`` is ``h*3h``; Phi-3's fused ``qkv_proj``
      has the same element count as three projections; q/k RMSNorm (Qwen3, Gemma 3) adds ``2*d``.
    * dense MLP: ``3*h*I`` (gate, up, down; Phi-3's ``gate_up_proj`` is ``h*2I``), or ``2*h*I`` + biases for
      GPT-NeoX's GELU MLP.
    * MoE MLP: router ``E*h`` + experts ``E*3*h*I_e`` (+ Qwen2-MoE's shared expert ``3*h*I_s`` and its ``h*1`` gate).
    * norms: ``norms_per_layer * h`` (``2h`` each for GPT-NeoX's LayerNorm with bias).

    Outside the layers: embedding ``V*h``, final norm, LM head ``V*h`` unless tied.
    """
    d = model_dims(config)
    h = d.hidden_size
    norm = 2 * h if d.norm_has_bias else h
    moe = set(d.moe_layers)

    expert = 3 * h * d.moe_intermediate_size
    decoder = 0
    largest_layer = 0
    per_layer: list[int] = []
    largest_module = 0
    inactive = 0
    for layer in range(d.num_layers):
        linears = _layer_linears(d, layer in moe)
        params = sum(i * o + (o if b else 0) for _, i, o, b in linears)
        params += d.norms_per_layer * norm + (2 * d.head_dim if d.qk_norm else 0)
        largest_module = max([largest_module] + [i * o + (o if b else 0) for _, i, o, b in linears])
        if layer in moe:
            params += d.num_experts * h + d.num_experts * expert  # router + routed experts
            largest_module = max(largest_module, d.num_experts * expert)
            inactive += (d.num_experts - d.experts_per_token) * expert
        decoder += params
        per_layer.append(params)
        largest_layer = max(largest_layer, params)

    embedding = d.vocab_size * h
    lm_head = 0 if d.tie_word_embeddings else d.vocab_size * h
    total = embedding + decoder + norm + lm_head
    shapes = linear_shapes(d)
    return ParamCounts(
        dims=d,
        total=total,
        active=total - inactive,
        embedding=embedding,
        lm_head=lm_head,
        decoder_layers=decoder,
        largest_layer=largest_layer,
        layer_params=tuple(per_layer),
        largest_module=max(largest_module, embedding),
        linear_weights=sum(s.in_features * s.out_features * s.count for s in shapes),
        linear_rows=sum(s.out_features * s.count for s in shapes),
        largest_linear=max((s.in_features * s.out_features for s in shapes), default=0),
    )


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``config.json`` from a file path or a model directory (an HF checkpoint or ``recipes/models/<name>``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def last_layers_params(counts: ParamCounts, layers: int) -> int:
    """Parameters of the last ``layers`` decoder layers: ``trainable_params`` for ``method="freeze"`` when only the
    top layers train (add ``counts.lm_head`` or the final norm if the recipe also trains those)."""
    if layers < 0:
        raise ValueError("layers must be >= 0")
    return sum(counts.layer_params[len(counts.layer_params) - min(layers, len(counts.layer_params)):])


ALL_LINEAR = "all-linear"
"""LoRA target meaning every ``nn.Linear`` in the decoder layers (PEFT's ``"all-linear"`` excludes only the LM head)."""


def _targeted(dims: ModelDims, targets: str | Sequence[str]) -> list[LinearShape]:
    shapes = linear_shapes(dims)
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            targets = [targets]
        else:
            return shapes
    wanted = set(targets)
    return [s for s in shapes if s.name in wanted]


def lora_trainable_params(
    counts_or_dims: ParamCounts | ModelDims,
    *,
    rank: int,
    targets: str | Sequence[str] = ALL_LINEAR,
    dora: bool = False,
) -> int:
    """Trainable parameters added by LoRA (Hu et al. 2021): ``A`` is ``r x in`` and ``B`` is ``out x r``, so each
    targeted linear adds ``r * (in + out)``; DoRA (Liu et al. 2024) adds a magnitude vector of ``out`` per linear.

    ``targets`` are module names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
    ``down_proj``; Phi-3: ``qkv_proj``, ``gate_up_proj``; GPT-NeoX: ``query_key_value``, ``dense``,
    ``dense_h_to_4h``, ``dense_4h_to_h``) or ``"all-linear"``. Names are matched like PEFT does (a module whose last
    path component equals the name), so ``gate_proj`` also hits Qwen2-MoE's shared expert; MoE routed experts are
    not ``nn.Linear`` in transformers 5.x and are never targeted.
    """
    dims = counts_or_dims.dims if isinstance(counts_or_dims, ParamCounts) else counts_or_dims
    if rank <= 0:
        raise ValueError("LoRA rank must be positive")
    per_linear = (
        (rank * (s.in_features + s.out_features) + (s.out_features if dora else 0)) * s.count
        for s in _targeted(dims, targets)
    )
    return sum(per_linear)


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes on one GPU for one training step, by category."""

    weights: int
    """Model parameters resident on the GPU: frozen/quantized base, trainable weights in their storage dtype,
    and (FSDP/ZeRO-3) the gathered unsharded units in flight."""

    grads: int
    """Gradient buffers: compute-dtype grads (full or partitioned), DeepSpeed's fp32 gradient partition, gathered
    unsharded unit grads (FSDP/ZeRO-3)."""

    optimizer: int
    """Optimizer states (Adam m and v) plus fp32 master weights when training in bf16/fp16."""

    activations: int
    """Tensors saved for backward across all layers, plus transients (recompute of one layer with checkpointing,
    dequantized weights for QLoRA/8-bit, DoRA's weight norm)."""

    logits: int
    """LM-head output and cross-entropy buffers (full logits, or one chunk with a fused/chunked loss)."""

    framework: int
    """CUDA context, NCCL buffers, DeepSpeed communication buckets and allocator fragmentation."""

    total: int
    """Sum of the fields above: the number compared with the GPU's memory."""

    host: int
    """Host (CPU) RAM used by this rank for offloaded states (multiply by GPUs per node for the node's need)."""

    pageable: int
    """Part of ``optimizer`` that paged optimizers can evict to host memory under pressure (already in ``total``)."""

    notes: tuple[str, ...] = ()
    """Assumptions that applied to this estimate (one short sentence each)."""

    @property
    def model_states(self) -> int:
        """Weights + grads + optimizer: what the ZeRO paper and DeepSpeed's estimators call model states."""
        return self.weights + self.grads + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bytes as ints) for plan.json."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        out["model_states"] = self.model_states
        return out

    def gib(self) -> dict[str, float]:
        """The byte fields in GiB, rounded to 0.01, for display."""
        keys = ("weights", "grads", "optimizer", "activations", "logits", "framework", "total", "host")
        return {k: round(getattr(self, k) / GiB, 2) for k in keys}


_DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
_ADAPTER_METHODS = ("lora", "dora", "qlora", "int8")
_OTHER_ADAPTER_METHODS = ("prompt_tuning", "prefix_tuning", "ia3", "adapter")
"""Frozen-base methods whose trainable count and saved activations the caller passes (launcher/plan/method_params.py):
``trainable_params`` and ``extra_activation_per_token``."""
_DEEPSPEED = ("zero1", "zero2", "zero3")


def optimizer_state_bytes_per_param(optimizer: Optimizer) -> float:
    """Adam's two moments per trainable parameter.

    * ``adamw`` / ``paged_adamw_32bit``: m and v in fp32 = 8 bytes (ZeRO paper §3.1, the "K = 12" minus the master).
    * ``adamw_8bit`` / ``paged_adamw_8bit``: m and v in 8 bits = 2 bytes, plus one fp32 absmax per block of 256 per
      state = 2 * 4 / 256 bytes (Dettmers et al. 2022, block-wise quantization; bitsandbytes keeps 32-bit states for
      tensors under 4096 elements, which we ignore).
    * ``paged_*``: the same states allocated in CUDA unified memory, which the driver may evict to host RAM under
      pressure (reported in ``MemoryEstimate.pageable``).
    """
    if optimizer in ("adamw", "paged_adamw_32bit"):
        return 8.0
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2.0 + 2 * 4 / ADAM_8BIT_BLOCK
    raise ValueError(f"unknown optimizer {optimizer!r}")


def quantized_bytes_per_weight(method: Literal["qlora", "int8"], *, double_quant: bool) -> float:
    """Storage bytes per quantized linear weight element (per-row int8 scales are added separately).

    * ``qlora``: NF4 = 4 bits, plus the block absmax constants (Dettmers et al. 2023, §3): fp32 per 64 weights =
      32/64 = 0.5 bits/param; with double quantization the constants become 8-bit (8/64 = 0.125 bits) plus an fp32
      second-level constant per 256 blocks (32/(64*256) ≈ 0.002 bits), ≈ 0.127 bits/param. So 0.5625 bytes/param
      without, ≈ 0.5159 bytes/param with double quantization.
    * ``int8``: LLM.int8() (Dettmers et al. 2022) stores 1 byte per weight plus one fp32 scale per output row.
    """
    if method == "int8":
        return 1.0
    constants_bits = (8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK)) if double_quant else 32 / NF4_BLOCK
    return NF4_BYTES_PER_PARAM + constants_bits / 8


def activation_bytes_per_token_per_layer(
    dims: ModelDims,
    *,
    moe_layer: bool,
    seq_len: int,
    act_bytes: int,
    flash_attention: bool = True,
) -> int:
    """Bytes saved for backward by one decoder layer, per token, without recomputation.

    Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.1, which
    gives ``s*b*h*(34 + 5*a*s/h)`` bytes per layer for a GPT layer in fp16 (attention 11sbh + 5as²b, MLP 19sbh,
    two LayerNorms 4sbh; dropout masks 1 byte/element). Adapted to Llama-style layers (per token, ``e`` = bytes of
    the compute dtype):

    * no dropout (fine-tuning recipes and HF defaults use 0), so no masks: Korthikanti's ``sbh`` mask terms go;
    * attention through SDPA / FlashAttention: the ``a*s`` score matrix is never stored (``5as/h`` term gone);
      saved are the norm input ``h``, the q/k/v input ``h``, Q ``a*d``, K and V ``kv*d`` each (GQA: not expanded to
      ``a`` heads), the output O ``a*d`` (also the o_proj input) → ``e*(2h + 2*a*d + 2*kv*d)``, plus the fp32
      log-sum-exp ``4*a``. q/k norms (Qwen3, Gemma 3) add their inputs ``e*(a*d + kv*d)``.
      ``flash_attention=False`` (eager) adds the fp32 softmax output and its compute-dtype copy: ``(4 + e)*a*s``.
    * SwiGLU MLP: norm input ``h``, gate/up input ``h``, gate output ``I``, up output ``I``, SiLU output ``I``, down
      input ``I`` → ``e*(2h + 4I)`` (Korthikanti's GELU MLP is ``2h + 4h + 4h`` bytes at e=2 with I=4h);
      GPT-NeoX's GELU MLP: ``e*(2h + 2I)``.
    * MoE MLP: norm input ``h``, router logits fp32 ``4E``, and per routed copy of a token (top-k) its gathered
      input ``h`` and the expert's SwiGLU terms ``4*I_e``; a shared expert adds ``4*I_s``.
    * Gemma 2/3's extra pre/post norms add ``e*h`` each.
    """
    d = dims
    e = act_bytes
    h = d.hidden_size
    attention = e * (2 * h + 2 * d.q_out + 2 * d.kv_out) + 4 * d.num_attention_heads
    if d.qk_norm:
        attention += e * (d.q_out + d.kv_out)
    if not flash_attention:
        attention += (4 + e) * d.num_attention_heads * seq_len
    if moe_layer:
        k = d.experts_per_token
        mlp = e * h + 4 * d.num_experts + k * e * (h + 4 * d.moe_intermediate_size)
        mlp += e * 4 * d.shared_expert_intermediate_size
    elif d.gated_mlp:
        mlp = e * (2 * h + 4 * d.intermediate_size)
    else:
        mlp = e * (2 * h + 2 * d.intermediate_size)
    extra_norms = e * h * (d.norms_per_layer - 2)
    return attention + mlp + extra_norms


def _lora_activation_bytes_per_token(
    dims: ModelDims, targets: str | Sequence[str], rank: int, e: int, *, dropout: bool, dora: bool,
    adapter_bytes: int = 4,
) -> int:
    """Extra saved bytes per token for all targeted linears, read from PEFT 0.21's ``lora.Linear.forward``.

    Adapters hold ``adapter_bytes`` per element (4: PEFT upcasts them to fp32 on a 16-bit base,
    ``autocast_adapter_dtype=True``; DeepSpeed casts them back to the compute dtype). Per targeted linear:

    * PEFT casts the layer input to the adapters' dtype before ``lora_A`` (``_cast_input_dtype``); when that is a new
      dtype, ``lora_A`` saves the cast copy for its weight gradient: ``adapter_bytes * in`` (each linear casts its
      own copy, q/k/v included). Measured on an H200 (1B Llama, bf16, r16 all-linear): without this term the plan
      was 28% under the device's peak (ddp: 26.7 GiB planned, 37.4 measured); with it 37.8 GiB, +1% (fsdp: 38.8
      GiB vs 38.1, +2%; bench/results/gpu-h200-20261126).
    * ``lora_dropout > 0``: dropout applied to that input separately per adapter, a dropped copy and its 1-byte mask.
    * the ``A x`` output, saved by ``lora_B``: ``adapter_bytes * r``.
    * DoRA keeps the base layer's output for its magnitude rescaling: ``adapter_bytes * out``.
    """
    cast = adapter_bytes != e
    total = 0
    for s in _targeted(dims, targets):
        per = adapter_bytes * rank
        per += adapter_bytes * s.in_features if cast else 0
        per += (adapter_bytes + 1) * s.in_features if dropout else 0
        per += adapter_bytes * s.out_features if dora else 0
        total += per * s.count
    return total


def logits_bytes(dims: ModelDims, *, tokens: int, fused_ce: bool, act_bytes: int) -> int:
    """Memory of the LM head output and the loss.

    * Un-fused (transformers' loss): ``tokens * V * LOGITS_BYTES_PER_ELEMENT`` (compute-dtype logits, fp32
      log-softmax saved for backward, fp32 gradient; the brief "4 bytes x b x s x V for the fp32 upcast plus its
      gradient" plus the 2-byte logits themselves).
    * Fused / chunked (Liger's fused linear cross-entropy, Cut Cross-Entropy): logits exist one chunk at a time;
      chunks follow ``LIGER_CHUNK_RULE`` so a chunk holds ``ceil(tokens / ceil(V/h))`` tokens, stored in fp32 with
      the gradient written in place (4 bytes per element), plus the gradient w.r.t. the hidden states computed
      during the forward (``tokens * h`` in the compute dtype).
    """
    v, h = dims.vocab_size, dims.hidden_size
    if not fused_ce:
        return tokens * v * LOGITS_BYTES_PER_ELEMENT
    chunk_tokens = math.ceil(tokens / math.ceil(v / h))
    return chunk_tokens * v * 4 + tokens * h * act_bytes


def estimate_memory(
    counts: ParamCounts,
    *,
    method: Method = "full",
    strategy: Strategy = "ddp",
    world_size: int = 1,
    shard_group_size: int | None = None,
    trainable_params: int | None = None,
    lora_rank: int = 16,
    lora_targets: str | Sequence[str] = ALL_LINEAR,
    lora_dropout: float = 0.0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    optimizer: Optimizer = "adamw",
    param_dtype: ParamDtype = "bf16",
    micro_batch: int = 1,
    seq_len: int = 2048,
    activation_checkpointing: bool = True,
    fused_ce: bool = False,
    flash_attention: bool = True,
    double_quant: bool = True,
    ds_bucket_elements: int = DEEPSPEED_DEFAULT_BUCKET_ELEMENTS,
    gpus_per_node: int | None = None,
    master_weights: bool = True,
    extra_activation_per_token: int = 0,
) -> MemoryEstimate:
    """Estimate peak memory per GPU for one training step.

    Arguments: ``method`` (full fine-tune, partial ``freeze`` with ``trainable_params`` given, LoRA/DoRA on a
    compute-dtype base, QLoRA on an NF4 base, LoRA on an LLM.int8 base), ``strategy`` with ``world_size`` ranks
    (``fsdp_hybrid`` shards over ``shard_group_size``, default ``gpus_per_node``, and replicates across groups),
    ``trainable_params`` (default: all for ``full``; the LoRA count from ``lora_rank`` / ``lora_targets`` for
    adapter methods), CPU offload flags (ZeRO: optimizer states, fp32 master and fp32 gradient partition; with
    ``offload_params`` on ZeRO-3 also the parameter partition; FSDP: ``CPUOffloadPolicy`` moves sharded parameters,
    gradients and optimizer states together, so either flag offloads all three). The other adapter methods
    (``prompt_tuning``, ``prefix_tuning``, ``ia3``, ``adapter``: a frozen base and fp32 trainable modules, like LoRA)
    need ``trainable_params`` and take what their modules save for backward, bytes per token over all layers, as
    ``extra_activation_per_token`` (launcher/plan/method_params.py; prompt tuning's virtual tokens are in
    ``seq_len``).

    Model states (weights/grads/optimizer), per trainable parameter, following the ZeRO paper (Rajbhandari et al.
    2020, §3.1 and §5): mixed-precision Adam holds 2 (fp16/bf16 weight) + 2 (gradient) + 12 (fp32 master 4, m 4,
    v 4) = 16 bytes. ZeRO-1 divides the 12 by N, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    Implementation details counted on top, read from DeepSpeed 0.19 ``stage_1_and_2.py`` / ``stage3.py``:

    * ZeRO-1/2/3 upcast the gradient partition to fp32 for the optimizer step (``single_partition_of_fp32_groups
      [i].grad``, ``fp32_partitioned_groups_flat[i].grad``): +4 bytes/param / N. That makes ZeRO-2 ``2P + 18P/N``,
      exactly DeepSpeed's ``estimate_zero2_model_states_mem_needs``.
    * ZeRO-3 keeps its reduced 16-bit gradient partition in ``grad_partitions_flat_buffer`` (+2 bytes/param / N,
      which DeepSpeed's own estimator leaves out), and gathers one module at a time: DeepSpeed's estimator charges
      ``4 * largest_layer_params`` (its 16-bit weight and gradient); we do the same (grad half only when the
      module trains). The fp32 gradient is materialized per ``sub_group_size`` (1e9) chunk; we count the whole
      partition, like DeepSpeed's estimator (conservative beyond 1e9 params per rank).
    * DeepSpeed with ``bf16``/``fp16`` casts the whole module, LoRA adapters included, to the compute dtype and
      keeps fp32 masters of the trainable part.
    * FSDP2 (``fully_shard`` per decoder layer and the root, ``MixedPrecisionPolicy(param_dtype=bf16,
      reduce_dtype=fp32)``): sharded parameters stay in fp32 and double as the master (4), sharded fp32 gradients
      (4), Adam (8) → 16 bytes/param / N; in flight: two units of compute-dtype parameters (the current one and the
      prefetched next) and, when training full weights, one unit's compute-dtype gradient plus its fp32
      reduce-scatter copy. Frozen weights stay in the compute dtype (2 bytes / N).
    * DDP: full replicas, 2 + 2 + 12 (with ``gradient_as_bucket_view=True``; otherwise the reducer's buckets add a
      second 2 bytes/param of gradients).
    * PEFT adapters are fp32 outside DeepSpeed (``autocast_adapter_dtype=True``): 4 + 4 + 8, no separate master.
    * ``master_weights=False`` (``model.master_weights: false``): DDP and FSDP train the 16-bit weights themselves,
      and torch's AdamW keeps its moments in the weights' dtype: 2 + 2 + 4 bytes per trainable parameter.
    * Quantized bases (``qlora``, ``int8``): decoder-layer ``nn.Linear`` weights at
      ``quantized_bytes_per_weight``; everything else (embedding, LM head, norms, biases, routers, transformers-5
      fused MoE experts) in the compute dtype.

    Activations: ``activation_bytes_per_token_per_layer`` for each layer times ``micro_batch * seq_len`` tokens on
    this rank, plus the final norm and LM-head inputs (``2h``). With full activation checkpointing (Korthikanti et al.
    2022, §4.2: "only the input to each transformer layer" is stored, ``2sbh`` per layer in fp16) the stored part is
    ``e*h`` per token per layer and the peak adds one layer's full activations while it is recomputed, or the logits,
    whichever is larger: the logits are freed by the LM head's backward before the first layer is recomputed.
    Logits: see ``logits_bytes``. Framework: ``CUDA_CONTEXT_BYTES`` + ``NCCL_BUFFER_BYTES`` (world_size > 1) +
    DeepSpeed buckets + ``(ALLOCATOR_FRAGMENTATION_FACTOR - 1)`` times all tensor bytes.
    """
    if world_size < 1 or micro_batch < 0 or seq_len < 1:
        raise ValueError("world_size >= 1, micro_batch >= 0 and seq_len >= 1 are required")
    if method not in ("full", "freeze", *_ADAPTER_METHODS, *_OTHER_ADAPTER_METHODS):
        raise ValueError(f"unknown method {method!r}")
    if strategy not in ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp_hybrid"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if param_dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown param_dtype {param_dtype!r}")
    sharded_strategy = strategy in ("zero3", "fsdp", "fsdp_hybrid")
    if offload_params and not sharded_strategy:
        raise ValueError(f"offload_params needs parameter sharding (zero3/fsdp), not {strategy}")
    if (offload_optimizer or offload_params) and strategy == "ddp":
        raise ValueError("CPU offload needs a ZeRO or FSDP strategy, not ddp")
    if (offload_optimizer or offload_params) and optimizer != "adamw":
        raise ValueError("CPU offload runs an fp32 AdamW on the host (DeepSpeedCPUAdam / torch); use optimizer='adamw'")

    d = counts.dims
    e = _DTYPE_BYTES[param_dtype]
    half = e == 2
    notes: list[str] = []

    # --- who trains, and what the frozen base costs to store (whole model, before sharding)
    if method == "full":
        trainable = counts.total if trainable_params is None else trainable_params
    elif method in ("freeze", *_OTHER_ADAPTER_METHODS):
        if trainable_params is None:
            raise ValueError(f"method={method!r} needs trainable_params")
        trainable = trainable_params
    else:
        trainable = (
            lora_trainable_params(d, rank=lora_rank, targets=lora_targets, dora=method == "dora")
            if trainable_params is None
            else trainable_params
        )
    adapters = method in _ADAPTER_METHODS or method in _OTHER_ADAPTER_METHODS
    frozen_params = counts.total if adapters else counts.total - trainable
    # peft's prepare_model_for_kbit_training upcasts what bitsandbytes left unquantized (embedding, LM head, norms)
    # to fp32, so the residual stream and the logits are fp32 too. The launcher runs it on unsharded quantized bases
    # (DDP; under ZeRO-1/2 DeepSpeed casts the module back to the compute dtype; sharded QLoRA skips it). Measured on
    # an H200 (Llama-3.1-8B shape, nf4, micro batch 4 x 1024, checkpointing): 18.5 GiB device peak; planned without
    # these terms 14.4 GiB (-22%); with them, and with the logits and the recomputed layer not both counted under
    # checkpointing (below), 18.1 GiB (-2%; tensors 15.8 GiB planned, 15.5 allocated) (bench/results/gpu-h200-20261126).
    kbit_upcast = method in ("qlora", "int8") and strategy == "ddp"
    stream = 4 if kbit_upcast else e  # bytes of the hidden states between layers
    if method in ("qlora", "int8"):
        q = quantized_bytes_per_weight(method, double_quant=double_quant)
        frozen_bytes = counts.linear_weights * q + (counts.total - counts.linear_weights) * stream
        if method == "int8":
            frozen_bytes += 4 * counts.linear_rows
        if d.num_experts:
            notes.append("MoE experts are 3-D parameters in transformers 5.x; bitsandbytes leaves them unquantized")
    else:
        frozen_bytes = frozen_params * e

    # --- model states per GPU
    n = world_size
    if strategy == "fsdp_hybrid":
        n = shard_group_size or gpus_per_node or world_size
        if world_size % n:
            raise ValueError(f"shard_group_size {n} must divide world_size {world_size}")
    opt_state = optimizer_state_bytes_per_param(optimizer)
    pure_16bit = half and not master_weights and not adapters and strategy not in _DEEPSPEED
    if pure_16bit and optimizer == "adamw":
        opt_state = 2 * e  # torch's AdamW allocates exp_avg / exp_avg_sq like the parameter
    host = 0.0
    weights: float
    grads: float
    optim: float
    trains_base = not adapters  # the base model's own weights receive gradients
    if strategy in ("ddp", "zero1", "zero2", "zero3"):
        if strategy in _DEEPSPEED:
            # DeepSpeed casts the module (adapters too) to the compute dtype and keeps fp32 master partitions,
            # even for an fp32 model (``single_partition_of_fp32_groups`` is a copy), plus an fp32 grad partition.
            w_t, g_t, master, fp32_grad = e, e, 4, 4
        elif adapters:  # DDP with fp32 PEFT adapters
            w_t, g_t, master, fp32_grad = 4, 4, 0, 0
        else:  # DDP, mixed precision with fp32 master weights (or plain fp32, or pure 16-bit)
            w_t, g_t, master, fp32_grad = e, e, (4 if half and not pure_16bit else 0), 0
        optim_bytes = trainable * (master + opt_state) / n
        if strategy == "ddp":
            weights, grads, optim = frozen_bytes + trainable * w_t, trainable * g_t, trainable * (master + opt_state)
        elif strategy in ("zero1", "zero2"):
            weights = frozen_bytes + trainable * w_t
            grads = trainable * g_t if strategy == "zero1" else trainable * g_t / n
            if offload_optimizer:
                host += optim_bytes + trainable * fp32_grad / n
                optim = 0
                if strategy == "zero2":
                    grads = 0  # reduced partitions are accumulated straight into pinned host memory
            else:
                optim = optim_bytes
                grads += trainable * fp32_grad / n
        else:  # zero3
            gathered = counts.largest_module * e
            gathered_grad = counts.largest_module * e if trains_base else 0
            partition = (frozen_bytes + trainable * w_t) / n
            if offload_params:
                host += partition
                weights = gathered
            else:
                weights = partition + gathered
            grads = gathered_grad
            if offload_optimizer:
                host += optim_bytes + trainable * (fp32_grad + g_t) / n
                optim = 0
            else:
                optim = optim_bytes
                grads += trainable * (g_t + fp32_grad) / n
    else:  # fsdp, fsdp_hybrid
        unit = max(counts.largest_layer, counts.root_unit)
        in_flight_params = 2 * unit * e
        in_flight_grads = unit * (e + 4) if trains_base else 0
        master_bytes = e if pure_16bit else 4
        w_sharded = (frozen_bytes + trainable * master_bytes) / n
        g_sharded = trainable * master_bytes / n
        o_sharded = trainable * opt_state / n
        if offload_optimizer or offload_params:
            host += w_sharded + g_sharded + o_sharded
            weights, grads, optim = in_flight_params, in_flight_grads, 0
        else:
            weights, grads, optim = w_sharded + in_flight_params, g_sharded + in_flight_grads, o_sharded
        if not adapters and half and not pure_16bit:
            notes.append("FSDP keeps fp32 sharded parameters as the master copy (MixedPrecisionPolicy)")
    pageable = optim if optimizer.startswith("paged_") else 0

    # --- activations
    tokens = micro_batch * seq_len
    moe = set(d.moe_layers)
    per_layer = [
        activation_bytes_per_token_per_layer(
            d, moe_layer=i in moe, seq_len=seq_len, act_bytes=e, flash_attention=flash_attention
        )
        for i in range(d.num_layers)
    ]
    lora_all_layers = extra_activation_per_token  # the other adapter methods' modules, like LoRA's below
    if method in _ADAPTER_METHODS:
        lora_all_layers = _lora_activation_bytes_per_token(
            d, lora_targets, lora_rank, e, dropout=lora_dropout > 0, dora=method == "dora",
            adapter_bytes=e if strategy in _DEEPSPEED else 4,
        )
    recomputed_per_token = 0
    if activation_checkpointing:
        # stored: each layer's input; plus one layer (and its adapters) recomputed during its backward, which
        # starts after the LM head's backward has freed the logits: the two never coexist (max, below)
        activation_per_token = d.num_layers * stream * d.hidden_size
        recomputed_per_token = max(per_layer, default=0) + lora_all_layers // max(d.num_layers, 1)
    else:
        # an fp32 stream makes each layer's two norm inputs fp32
        activation_per_token = sum(per_layer) + lora_all_layers + d.num_layers * 2 * (stream - e) * d.hidden_size
    activation_per_token += 2 * stream * d.hidden_size  # final norm input and LM-head input
    activations = tokens * activation_per_token
    if method in ("qlora", "int8"):
        activations += counts.largest_linear * e  # bitsandbytes dequantizes one weight at a time for matmul
    if method == "dora":
        largest_target = max((s.in_features * s.out_features for s in _targeted(d, lora_targets)), default=0)
        activations += 2 * largest_target * 4  # W + s*BA materialized for the column norm (fp32), then the norm
    logits = logits_bytes(d, tokens=tokens, fused_ce=fused_ce, act_bytes=e) if tokens else 0
    if kbit_upcast and not fused_ce:
        logits += tokens * d.vocab_size * (4 - e)  # an fp32 LM head gives fp32 logits, not 16-bit ones
    activations += max(0, tokens * recomputed_per_token - logits)

    # --- framework
    tensors = weights + grads + optim + activations + logits
    framework = CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if world_size > 1 else 0)
    if strategy in ("zero1", "zero2"):
        framework += 2 * ds_bucket_elements * e
    elif strategy == "zero3":
        framework += (ds_bucket_elements + DEEPSPEED_DEFAULT_PREFETCH_ELEMENTS) * e
    framework += (ALLOCATOR_FRAGMENTATION_FACTOR - 1) * tensors

    parts = [int(math.ceil(x)) for x in (weights, grads, optim, activations, logits, framework)]
    return MemoryEstimate(
        weights=parts[0],
        grads=parts[1],
        optimizer=parts[2],
        activations=parts[3],
        logits=parts[4],
        framework=parts[5],
        total=sum(parts),
        host=int(math.ceil(host)),
        pageable=int(math.ceil(pageable)),
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------------------------
# Strategy planning


@dataclass(frozen=True)
class StrategyRow:
    """One candidate strategy evaluated for the given resources."""

    name: str
    """Row label used by ``choose_strategy``: a strategy name, or ``zero3_offload_optimizer`` / ``zero3_offload``."""

    strategy: Strategy
    """Underlying strategy."""

    offload_optimizer: bool
    """Optimizer states (and fp32 master / gradient partitions) live in host RAM."""

    offload_params: bool
    """The parameter partition lives in host RAM."""

    shard_group_size: int | None
    """Ranks a state is sharded over for ``fsdp_hybrid``; None otherwise."""

    estimate: MemoryEstimate
    """The per-GPU breakdown."""

    host_per_node: int
    """Host RAM the offloaded states need on one node (``estimate.host * gpus_per_node``)."""

    fits: bool
    """``estimate.total <= gpu_mem_bytes``, and ``host_per_node <= host_mem_bytes`` when that was given."""

    headroom: int
    """``gpu_mem_bytes - estimate.total`` (negative when it does not fit)."""


def _candidates(nodes: int, gpus_per_node: int, optimizer: str) -> list[tuple[str, Strategy, bool, bool, int | None]]:
    rows: list[tuple[str, Strategy, bool, bool, int | None]] = [
        ("ddp", "ddp", False, False, None),
        ("zero1", "zero1", False, False, None),
        ("zero2", "zero2", False, False, None),
    ]
    if nodes > 1:
        rows.append(("fsdp_hybrid", "fsdp_hybrid", False, False, gpus_per_node))
    rows += [("fsdp", "fsdp", False, False, None), ("zero3", "zero3", False, False, None)]
    if optimizer == "adamw":
        rows += [
            ("zero3_offload_optimizer", "zero3", True, False, None),
            ("zero3_offload", "zero3", True, True, None),
        ]
    return rows


def plan_strategies(
    counts: ParamCounts,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_bytes: int,
    host_mem_bytes: int | None = None,
    **training: Any,
) -> list[StrategyRow]:
    """Evaluate every strategy for ``nodes x gpus_per_node`` GPUs of ``gpu_mem_bytes`` each.

    ``training`` takes the keyword arguments of ``estimate_memory`` other than ``strategy``, ``world_size``,
    ``shard_group_size``, ``offload_optimizer``, ``offload_params`` and ``gpus_per_node``. Rows come in
    ``DEFAULT_STRATEGY_ORDER``; offload rows are skipped for 8-bit/paged optimizers (offload runs fp32 AdamW on the
    host); ``fsdp_hybrid`` appears only for more than one node. With ``host_mem_bytes`` (RAM per node) an
    offload row fits only if the node can hold what its GPUs offload (ZeRO-Infinity-style offload of a 405B model
    needs terabytes of host RAM).
    """
    reserved = {"strategy", "world_size", "shard_group_size", "offload_optimizer", "offload_params", "gpus_per_node"}
    clash = reserved & training.keys()
    if clash:
        raise TypeError(f"plan_strategies sets {sorted(clash)} itself")
    world = nodes * gpus_per_node
    rows = []
    for name, strategy, off_opt, off_par, group in _candidates(nodes, gpus_per_node, training.get("optimizer", "adamw")):
        est = estimate_memory(
            counts,
            strategy=strategy,
            world_size=world,
            shard_group_size=group,
            offload_optimizer=off_opt,
            offload_params=off_par,
            gpus_per_node=gpus_per_node,
            **training,
        )
        host_per_node = est.host * gpus_per_node
        fits = est.total <= gpu_mem_bytes and (host_mem_bytes is None or host_per_node <= host_mem_bytes)
        rows.append(StrategyRow(name, strategy, off_opt, off_par, group, est, host_per_node, fits,
                                gpu_mem_bytes - est.total))
    return rows


def choose_strategy(
    rows: Sequence[StrategyRow], *, order: Sequence[str] = DEFAULT_STRATEGY_ORDER,
    incompatible: dict[str, str] | None = None,
) -> tuple[str | None, str]:
    """Pick the first row in ``order`` that fits; return ``(name, reason)``, or ``(None, reason)`` if none fits.

    ``incompatible`` maps a row name to why the rest of the recipe rules it out (an optimizer it cannot step, a
    setting it cannot shard); its rows are passed over even when they fit, and when only such rows fit the reason
    names the change that would make one usable. The reason names the estimate and the GPU budget, and the cheaper
    strategies that were passed over."""
    by_name = {r.name: r for r in rows}
    ranked = [by_name[n] for n in order if n in by_name]
    incompatible = incompatible or {}
    skipped: list[str] = []
    ruled_out: list[str] = []
    blocked: list[str] = []
    for row in ranked:
        budget = row.estimate.total + row.headroom
        why_not = incompatible.get(row.name)
        if why_not is not None:
            if row.fits:
                blocked.append(f"{row.name} ({row.estimate.total / GiB:.1f} GiB) would fit but {why_not}")
            ruled_out.append(f"{row.name} ({why_not.split(':', 1)[0]})")
            continue
        if row.fits:
            reason = f"{row.name}: {row.estimate.total / GiB:.1f} GiB of {budget / GiB:.1f} GiB per GPU"
            if skipped:
                reason += "; does not fit: " + ", ".join(skipped)
            if ruled_out:
                reason += "; ruled out by the recipe: " + ", ".join(ruled_out)
            return row.name, reason
        if row.headroom < 0:
            skipped.append(f"{row.name} ({row.estimate.total / GiB:.1f} GiB)")
        else:
            skipped.append(f"{row.name} (host RAM {row.host_per_node / GiB:.0f} GiB per node)")
    if not ranked:
        return None, "no strategies evaluated"
    if blocked:
        return None, "nothing compatible with the recipe fits; " + blocked[0]
    smallest = min(ranked, key=lambda r: r.estimate.total)
    budget = smallest.estimate.total + smallest.headroom
    return None, (
        f"nothing fits in {budget / GiB:.1f} GiB per GPU; does not fit: {', '.join(skipped)} "
        f"(more GPUs, LoRA/QLoRA, a shorter seq_len or checkpointing help; smallest GPU need: {smallest.name})"
    )


def largest_micro_batch(
    counts: ParamCounts,
    *,
    gpu_mem_bytes: int,
    max_micro_batch: int = 1024,
    power_of_two: bool = True,
    **training: Any,
) -> int:
    """Largest micro batch (a power of two, or any integer) whose ``estimate_memory(...).total`` fits in
    ``gpu_mem_bytes``; 0 when even 1 does not fit. ``training`` takes ``estimate_memory``'s keyword arguments except
    ``micro_batch``. Memory grows monotonically with the batch, so this doubles, then bisects."""
    if "micro_batch" in training:
        raise TypeError("largest_micro_batch chooses micro_batch itself")

    def fits(batch: int) -> bool:
        return estimate_memory(counts, micro_batch=batch, **training).total <= gpu_mem_bytes

    if not fits(1):
        return 0
    best = 1
    while best * 2 <= max_micro_batch and fits(best * 2):
        best *= 2
    if power_of_two:
        return best
    low, high = best, min(best * 2, max_micro_batch + 1)  # fits(low), not fits(high) or out of range
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
