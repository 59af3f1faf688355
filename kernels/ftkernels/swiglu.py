"""SwiGLU activation ``silu(gate) * up``, forward and backward as elementwise Triton kernels.

Eager PyTorch keeps ``gate``, ``up`` and ``silu(gate)`` for the backward pass; the fused version keeps only
``gate`` and ``up`` and recomputes the sigmoid, saving one intermediate-sized activation per MLP. Math is in fp32,
results are cast to the input dtype.
"""

import torch
import torch.nn.functional as F

from ftkernels._triton import TRITON_AVAILABLE, LazyKernel, tl, use_triton

__all__ = ["TRITON_AVAILABLE", "SwiGLUFunction", "swiglu", "swiglu_reference"]

_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager ``silu(gate) * up``, as the transformers Llama-family MLP computes it."""
    return F.silu(gate) * up


if TRITON_AVAILABLE:

    def _swiglu_fwd(A, B, C, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(C + offs, (a * tl.sigmoid(a) * b).to(C.dtype.element_ty), mask=mask)

    def _swiglu_bwd(DC, A, B, DA, DB, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        # d silu(a)/da = sig * (1 + a * (1 - sig))
        tl.store(DA + offs, (dc * b * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + offs, (dc * silu).to(DB.dtype.element_ty), mask=mask)

    _FWD = LazyKernel(_swiglu_fwd)
    _BWD = LazyKernel(_swiglu_bwd)


def launch_config() -> dict[str, int]:
    """Constexprs and ``num_warps`` of both kernels: fixed 1024-element blocks, whatever the tensor size."""
    return {"BLOCK": _BLOCK, "num_warps": 4}  # Triton's default, which the launch used implicitly before


def _grid(n: int) -> tuple[int]:
    return (-(-n // _BLOCK),)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd function for ``silu(gate) * up`` on same-shaped, same-dtype tensors."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _FWD[_grid(n)](gate, up, out, n, **launch_config())
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _BWD[_grid(n)](dout, gate, up, dgate, dup, n, **launch_config())
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: Triton on CUDA or under ``TRITON_INTERPRET=1``, else eager."""
    if (use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype and gate.numel() > 0):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
