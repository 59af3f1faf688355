"""RMSNorm kernel vs its eager reference (and the transformers module), values and gradients."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ftkernels._triton import TRITON_AVAILABLE
from ftkernels.rmsnorm import rms_norm, rms_norm_reference

requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 2e-2}


def _run(fn: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor,
         **kw: Any) -> tuple[torch.Tensor, ...]:
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, **kw)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@requires_triton
# (3, 16384) and (2, 10000): rows wider than BWD_HOLD_W_MAX, the backward re-reads the weight per row
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 5, 200), (7, 64), (2, 1000), (3, 16384), (2, 10000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, casting: str, offset: float,
                           launches: list[str]) -> None:
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape, dtype=dtype)
    kw = {"eps": 1e-6, "offset": offset, "casting": casting}
    got, want = _run(rms_norm, x, w, dy, **kw), _run(rms_norm_reference, x, w, dy, **kw)
    assert launches == ["_rms_fwd", "_rms_bwd"]
    assert got[0].dtype == want[0].dtype
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **_tol(dtype))


@requires_triton
@pytest.mark.parametrize("n", [96, 16384])  # 16384: the wide-row backward that also re-reads x (RELOAD_X)
def test_fp32_weight_bf16_input_promotes_like_eager(n: int) -> None:
    # prepare_model_for_kbit_training leaves norms in fp32 while activations are bf16
    x, w = torch.randn(4, n, dtype=torch.bfloat16), torch.randn(n)
    dy = torch.randn(4, n)
    got, want = _run(rms_norm, x, w, dy), _run(rms_norm_reference, x, w, dy)
    assert got[0].dtype == torch.float32
    # a wide row has more elements whose bf16 rounding of the normalised row flips with the order of the sum of
    # squares (the kernel's and eager's differ): the bf16 tolerance of test_matches_reference
    tol = {"atol": 1e-2, "rtol": 1e-2} if n < 1000 else _tol(torch.bfloat16)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **tol)


@requires_triton
def test_matches_transformers_llama_rmsnorm() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(200, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 200)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), atol=1e-5, rtol=1e-5)


def test_eager_path_without_interpreter(eager_only: None, launches: list[str]) -> None:
    x, w = torch.randn(3, 96), torch.randn(96)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w))
    assert launches == []


def test_rejects_unknown_casting() -> None:
    with pytest.raises(ValueError, match="casting"):
        rms_norm(torch.randn(2, 8), torch.ones(8), casting="t5")  # type: ignore[arg-type]
