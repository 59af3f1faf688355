"""apply_kernels on tiny transformers models: same loss and gradients as the unpatched model."""

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ftkernels._triton import TRITON_AVAILABLE
from ftkernels.fused_ce import linear_cross_entropy_reference
from ftkernels.patch import KERNEL_NAMES, apply_kernels, set_loss_options

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
LossGrads = tuple[torch.Tensor, dict[str, torch.Tensor]]
LAUNCHED = {"rmsnorm": "_rms_fwd", "rope": "_rope_kernel", "swiglu": "_swiglu_fwd", "fused_ce": "_ce_rows"}


def tiny(family: str = "llama", **overrides: Any) -> nn.Module:
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return model_cls(config).float()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 300, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, -3:] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model: nn.Module, inputs: dict[str, torch.Tensor],
                   **kwargs: torch.Tensor) -> LossGrads:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: LossGrads, b: LossGrads) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_kernels_match_unpatched(family: str, launches: list[str]) -> None:
    model = tiny(family)
    patched = copy.deepcopy(model)
    assert apply_kernels(patched, "all") == list(KERNEL_NAMES)
    inputs = batch()
    got = loss_and_grads(patched, inputs)
    assert set(launches) >= set(LAUNCHED.values())  # every kernel really ran
    assert_same(got, loss_and_grads(model, inputs))
    assert patched(**inputs).logits is None  # the point of fused_ce: no [batch, seq, vocab] tensor


def test_tied_embeddings_and_num_items_in_batch() -> None:
    model = tiny(tie_word_embeddings=True)
    patched = copy.deepcopy(model)
    apply_kernels(patched, ["fused_ce", "rmsnorm"])
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    inputs = batch()
    n = torch.tensor(25)  # what a trainer passes with gradient accumulation: tokens over all micro-batches
    assert_same(loss_and_grads(patched, inputs, num_items_in_batch=n),
                loss_and_grads(model, inputs, num_items_in_batch=n))


def test_without_labels_is_the_original_forward() -> None:
    model = tiny()
    patched = copy.deepcopy(model)
    apply_kernels(patched, "fused_ce")
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, model(input_ids=ids).logits)
        assert patched(input_ids=ids, return_dict=False)[0].shape == (2, 11, 300)


def test_subset_and_idempotent(launches: list[str]) -> None:
    model = tiny()
    patched = copy.deepcopy(model)
    assert apply_kernels(patched, ["swiglu", "rmsnorm", "rmsnorm"]) == ["rmsnorm", "swiglu"]
    assert apply_kernels(patched, "rmsnorm") == ["rmsnorm"]  # again: must not wrap twice
    inputs = batch()
    assert_same(loss_and_grads(patched, inputs), loss_and_grads(model, inputs))
    assert set(launches) == {"_rms_fwd", "_rms_bwd", "_swiglu_fwd", "_swiglu_bwd"}
    # only this instance changed: a fresh model of the same class keeps the library forward
    assert "forward" not in tiny().model.norm.__dict__


def _with_lora(base: nn.Module) -> nn.Module:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():  # non-zero B so the adapters change the loss and get gradients through every path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("order", ["before_peft", "after_peft"])
def test_with_peft_lora(order: str) -> None:
    reference = _with_lora(tiny())
    if order == "before_peft":
        base = tiny()
        apply_kernels(base, "all")
        model = _with_lora(base)
    else:
        model = _with_lora(tiny())
        apply_kernels(model, "all")
    inputs = batch()
    got, want = loss_and_grads(model, inputs), loss_and_grads(reference, inputs)
    assert got[1] and all("lora_" in n for n in got[1])
    assert_same(got, want)


def test_loss_options_label_smoothing_and_z_loss() -> None:
    model = tiny()
    patched = copy.deepcopy(model)
    apply_kernels(patched, "fused_ce")
    set_loss_options(patched, label_smoothing=0.1, z_loss=1e-3)
    inputs = batch()
    got = patched(**inputs).loss
    with torch.no_grad():
        hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
    shifted = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    want = linear_cross_entropy_reference(hidden.reshape(-1, 64), model.lm_head.weight, shifted.reshape(-1),
                                          label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fused_ce"):
        set_loss_options(tiny(), label_smoothing=0.1)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel"):
        apply_kernels(tiny(), ["rmsnorm", "flash"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        apply_kernels(gpt2, "all")
    with pytest.raises(ValueError, match="hidden_act"):
        apply_kernels(tiny(hidden_act="gelu"), "swiglu")
