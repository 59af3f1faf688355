"""Model FLOPs of one training token, from `config.json` alone (no torch), for MFU.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, "PaLM", appendix B) = model FLOPs per second / peak FLOP/s of
the hardware. Model FLOPs count what the method needs, not what the implementation does: recomputation under
gradient checkpointing is not counted (that would be hardware FLOPs utilisation, HFU).

Derivation, per token of a sequence of length T (multiply-accumulate = 2 FLOPs):

* a linear layer y = x W (W: in x out) costs 2*in*out in the forward pass; in the backward pass 2*in*out for the
  input gradient (dL/dx = dL/dy W^T) and 2*in*out for the weight gradient (dL/dW = x^T dL/dy). Full training: 6 per
  weight element (the "6N" of Kaplan et al. 2020, §2.1).
* a frozen linear still needs its input gradient whenever something trainable lies below it, but no weight
  gradient: 4 per weight element. LoRA freezes every base weight and trains adapters everywhere (layer 0 included),
  so the base costs 4N and each adapter (A: in x r, B: r x out) 6*r*(in+out). (When the embedding output needs no
  gradient, autograd also skips the input gradient of layer 0's q/k/v projections: 4N over-counts by that, about
  1/(3L) of the attention projections' share; with gradient checkpointing the launcher makes the embedding output
  require grad, and the count is exact.)
* attention scores and the weighted sum, per layer and token: Q K^T is 2*T*a*d and P V is 2*T*a*d in the forward
  pass (a query heads of width d); their backward is twice that, and needs no weight gradient, so the same factor 3
  applies with or without trainable weights: 12*L*a*d*T per token (PaLM's 12*L*H*Q*T). Like PaLM and nanochat we
  count the full T x T product, not the causal half that flash attention actually computes.
* the LM head is a linear of h x V (counted once even when tied to the embedding); the embedding lookup is free.
* prompt tuning, prefix tuning, IA3 and bottleneck adapters also freeze every base weight, and their trainable parts
  lie in (or below) every layer, so the base costs 4N as under LoRA. Their own FLOPs are left out: IA3 scales
  activations (no matmul); a bottleneck adapter of width b adds 2*h*b per position against the layer's ~12*h^2;
  virtual tokens add positions the count of input tokens does not include (n_virtual / T of the work).
* MoE: a token visits `experts_per_token` routed experts; their SwiGLU linears count as three h x I_e matrices each.
* norms, activations, softmax, RoPE and the loss are O(h) or O(V) per token and left out (under 1% at these sizes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from launcher.plan import memory_model as mem


@dataclass(frozen=True)
class TokenFlops:
    """Training FLOPs of one token, split into where they come from."""

    linear: float
    """Forward + backward of the model's own weights (decoder linears, routed experts, LM head)."""

    adapters: float
    """Forward + backward of LoRA adapters (0 for other methods)."""

    attention: float
    """Scores and weighted sums, forward + backward."""

    @property
    def total(self) -> float:
        return self.linear + self.adapters + self.attention


def matmul_weights(dims: mem.ModelDims) -> int:
    """Weight elements a token multiplies with in the forward pass: decoder linears, its routed experts, LM head."""
    dense = sum(s.in_features * s.out_features * s.count for s in mem.linear_shapes(dims))
    experts = 3 * dims.hidden_size * dims.moe_intermediate_size * dims.experts_per_token * len(dims.moe_layers)
    return dense + experts + dims.hidden_size * dims.vocab_size


LORA_METHODS = ("lora", "dora", "qlora", "int8")
"""Methods that train LoRA adapters on a frozen base."""
FROZEN_BASE_METHODS = (*LORA_METHODS, "prompt_tuning", "prefix_tuning", "ia3", "adapter")
"""Methods that train no base weight (4 FLOPs per base weight element)."""


def training_flops_per_token(config: Mapping[str, Any], *, seq_len: int, method: str = "full",
                             lora_rank: int = 16, lora_targets: str | Sequence[str] = mem.ALL_LINEAR) -> TokenFlops:
    """Model FLOPs of one training token (forward + backward) for `method` (a recipe's `method.name`).

    Frozen-base methods (FROZEN_BASE_METHODS): 4 FLOPs per base weight element; LoRA's adapters 6 per adapter element
    (DoRA's magnitude vector is O(out) and ignored). `full` and `freeze` count 6 per weight element: for `freeze`
    that is an upper bound (frozen bottom layers need neither gradient).
    """
    dims = mem.count_parameters(config).dims
    weights = matmul_weights(dims)
    attention = 12.0 * dims.num_layers * dims.num_attention_heads * dims.head_dim * seq_len
    if method in LORA_METHODS:
        adapter_elements = sum(lora_rank * (s.in_features + s.out_features) * s.count
                               for s in mem._targeted(dims, lora_targets))
        return TokenFlops(linear=4.0 * weights, adapters=6.0 * adapter_elements, attention=attention)
    if method in FROZEN_BASE_METHODS:
        return TokenFlops(linear=4.0 * weights, adapters=0.0, attention=attention)
    return TokenFlops(linear=6.0 * weights, adapters=0.0, attention=attention)


def method_flops_per_token(config: Mapping[str, Any], *, seq_len: int, method: Any, task: str) -> float | None:
    """`training_flops_per_token` of a recipe's method (`recipe.method`) on a causal LM, for the MFU of a run; None
    for the other tasks (their heads are not the h x V LM head this model counts) or a config it cannot read.
    `seq_len` is `data.max_length`: exact for packed rows, an upper bound on the attention term for shorter ones."""
    if task != "causal_lm":
        return None
    try:
        return training_flops_per_token(config, seq_len=seq_len, method=method.name, lora_rank=getattr(method, "r", 16),
                                        lora_targets=getattr(method, "target_modules", mem.ALL_LINEAR)).total
    except (KeyError, TypeError, ValueError):
        return None


PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H200": 989.4e12,
    "A100": 312.0e12,
}
"""Dense bf16 tensor-core peaks without sparsity, from NVIDIA's data sheets (H100/H200: 989.4 TFLOP/s SXM; H100
PCIe 756; A100 312). The H200 has the H100 SXM's compute and more, faster memory."""


def peak_bf16_flops(device_name: str) -> float | None:
    """The data-sheet bf16 peak of a GPU named like `torch.cuda.get_device_name()`, or None when unknown."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        return PEAK_BF16_FLOPS["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    if "A100" in name:
        return PEAK_BF16_FLOPS["A100"]
    return None
