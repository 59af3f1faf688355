"""launcher/plan/flops.py against torch's own FLOP counter on a real forward + backward, and against the 6N rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.plan.flops import peak_bf16_flops, training_flops_per_token

MODELS = Path(__file__).resolve().parents[2] / "recipes" / "models"

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400, "max_position_embeddings": 128,
        "tie_word_embeddings": False}


def measured_flops(method: str, seq: int, batch: int = 2) -> float:
    """FLOPs torch counts (every matmul, attention included) for one forward + backward of the tiny Llama on batch x seq tokens."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}, attn_implementation="eager")  # CPU SDPA is not in the counter
    model = LlamaForCausalLM(config)
    if method in ("lora", "ia3"):
        from peft import IA3Config, LoraConfig, get_peft_model

        config = (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0) if method == "lora"
                  else IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
        model = get_peft_model(model, config)
        # Without it the embedding output needs no gradient, and autograd skips layer 0's q/k/v input gradients
        # (2 * 8192 FLOPs of 583680 here; launcher/plan/flops.py counts them, as gradient checkpointing does).
        model.enable_input_require_grads()
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().sum().backward()
    return float(counter.get_total_flops()) / (batch * seq)


@pytest.mark.parametrize("method", ["full", "lora", "ia3"])
def test_matches_torch_flop_counter(method: str) -> None:
    """Exact up to what the formula leaves out on purpose (nothing else on a Llama: norms and RoPE are not matmuls)."""
    seq = 32
    predicted = training_flops_per_token(TINY, seq_len=seq, method=method, lora_rank=8).total
    assert predicted == pytest.approx(measured_flops(method, seq), rel=1e-9)


def test_lora_costs_two_thirds_of_full_on_a_large_model() -> None:
    """Frozen weights skip their weight gradient: 4N instead of 6N, plus small adapters."""
    config = json.loads((MODELS / "llama-3.1-8b" / "config.json").read_text())
    full = training_flops_per_token(config, seq_len=2048, method="full")
    lora = training_flops_per_token(config, seq_len=2048, method="lora", lora_rank=16)
    assert lora.linear / full.linear == pytest.approx(2 / 3)
    assert 0 < lora.adapters < 0.01 * lora.linear
    # 6N with N = 8.03B parameters minus the embedding (a lookup, no FLOPs) plus the untied LM head it still counts
    assert full.linear == pytest.approx(6 * (8.03e9 - 128256 * 4096), rel=0.01)


def test_peaks() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_bf16_flops("Tesla T4") is None


def test_a_recipe_method_on_a_loaded_config() -> None:
    """What the trainer's MFU uses: the method section of a recipe and the loaded model's `config.to_dict()`."""
    from transformers import LlamaConfig

    from launcher.config.schema import IA3Method, LoraMethod
    from launcher.plan.flops import method_flops_per_token

    loaded = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}).to_dict()
    lora = LoraMethod(name="lora", r=8)
    assert method_flops_per_token(loaded, seq_len=32, method=lora, task="causal_lm") == pytest.approx(
        training_flops_per_token(TINY, seq_len=32, method="lora", lora_rank=8).total)
    ia3 = method_flops_per_token(loaded, seq_len=32, method=IA3Method(name="ia3"), task="causal_lm")
    assert ia3 == pytest.approx(training_flops_per_token(TINY, seq_len=32, method="full").total
                                - 2 * training_flops_per_token(TINY, seq_len=0, method="full").linear / 6)
    assert method_flops_per_token(loaded, seq_len=32, method=lora, task="sequence_classification") is None
