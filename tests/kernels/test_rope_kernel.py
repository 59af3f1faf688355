"""Rotary embedding kernel vs transformers' apply_rotary_pos_emb, values and gradients for q and k."""

from collections.abc import Callable

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from ftkernels._triton import TRITON_AVAILABLE
from ftkernels.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_reference

requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")


def _cos_sin(bs: int, seq: int, dim: int, hf_style: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if hf_style:  # what LlamaRotaryEmbedding produces: both halves equal
        freqs = torch.arange(seq)[None, :, None].float() / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        emb = torch.cat((freqs, freqs), -1).expand(bs, seq, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return torch.randn(bs, seq, dim, dtype=dtype), torch.randn(bs, seq, dim, dtype=dtype)


def _apply(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor,
           dq: torch.Tensor, dk: torch.Tensor, unsqueeze_dim: int) -> tuple[torch.Tensor, ...]:
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    # transformers hands over transposed views of [bs, seq, heads, dim] projections: keep those strides
    qv, kv = (q.transpose(1, 2), k.transpose(1, 2)) if unsqueeze_dim == 1 else (q, k)
    qo, ko = fn(qv, kv, cos, sin, unsqueeze_dim=unsqueeze_dim)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    return qo.detach(), ko.detach(), q.grad, k.grad


@requires_triton
@pytest.mark.parametrize("bs,n_q,n_k,seq,dim", [(1, 4, 4, 1, 16), (2, 6, 2, 7, 24), (3, 3, 1, 9, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("cos_batch", ["shared", "per_sample"])
@pytest.mark.parametrize("hf_style", [True, False])
def test_matches_transformers(bs: int, n_q: int, n_k: int, seq: int, dim: int, dtype: torch.dtype,
                              unsqueeze_dim: int, cos_batch: str, hf_style: bool, launches: list[str]) -> None:
    cos, sin = _cos_sin(1 if cos_batch == "shared" else bs, seq, dim, hf_style, dtype)
    q, k = torch.randn(bs, seq, n_q, dim, dtype=dtype), torch.randn(bs, seq, n_k, dim, dtype=dtype)
    out_shape = (lambda h: (bs, h, seq, dim)) if unsqueeze_dim == 1 else (lambda h: (bs, seq, h, dim))
    dq, dk = torch.randn(out_shape(n_q), dtype=dtype), torch.randn(out_shape(n_k), dtype=dtype)
    got = _apply(apply_rotary_pos_emb, q, k, cos, sin, dq, dk, unsqueeze_dim)
    want = _apply(hf_apply_rotary_pos_emb, q, k, cos, sin, dq, dk, unsqueeze_dim)
    assert launches == ["_rope_kernel", "_rope_kernel"]
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 2e-2}
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol)


def test_reference_is_transformers() -> None:
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for g, r in zip(apply_rotary_pos_emb_reference(q, k, cos, sin), hf_apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


@requires_triton
def test_falls_back_when_kernel_does_not_fit(launches: list[str]) -> None:
    # partial rotary (cos narrower than head_dim) is not the kernel's case: eager must handle it, or raise as eager
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    cos, sin = torch.randn(1, 3, 16, requires_grad=True), torch.randn(1, 3, 16)
    got = apply_rotary_pos_emb(q, k, cos, sin)  # cos needs a gradient: eager path
    for g, r in zip(got, apply_rotary_pos_emb_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, r)
    assert launches == []


def test_eager_path_without_interpreter(eager_only: None, launches: list[str]) -> None:
    q, k, cos, sin = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    for g, r in zip(apply_rotary_pos_emb(q, k, cos, sin), apply_rotary_pos_emb_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, r)
    assert launches == []
