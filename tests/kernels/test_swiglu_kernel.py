"""SwiGLU kernel vs eager silu(gate) * up, values and gradients."""

import pytest
import torch

from ftkernels._triton import TRITON_AVAILABLE
from ftkernels.swiglu import swiglu, swiglu_reference

requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")


@requires_triton
@pytest.mark.parametrize("shape", [(1, 1, 200), (2, 7, 96), (3000,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, launches: list[str]) -> None:
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    a, b, dc = (torch.randn(shape, dtype=dtype) * 3 for _ in range(3))
    results = []
    for fn in (swiglu, swiglu_reference):
        ga, gb = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = fn(ga, gb)
        out.backward(dc)
        results.append((out.detach(), ga.grad, gb.grad))
    assert launches == ["_swiglu_fwd", "_swiglu_bwd"]
    for g, r in zip(*results):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol)


@requires_triton
def test_non_contiguous_inputs() -> None:
    gate_up = torch.randn(5, 2 * 96)
    gate, up = gate_up[:, :96], gate_up[:, 96:]  # views with a row stride of 192
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), atol=1e-5, rtol=1e-5)


def test_eager_path_without_interpreter(eager_only: None, launches: list[str]) -> None:
    a, b = torch.randn(4, 96), torch.randn(4, 96)
    torch.testing.assert_close(swiglu(a, b), swiglu_reference(a, b))
    assert launches == []
