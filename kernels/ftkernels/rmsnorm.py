"""RMSNorm, forward and backward (input and weight gradients) in one Triton kernel each.

    y = cast(x * rsqrt(mean(x^2) + eps)) * (offset + weight)

Statistics are computed in fp32. ``casting="llama"`` casts the normalised row back to the input dtype *before*
multiplying by the weight, as Llama/Mistral/Qwen do; ``casting="gemma"`` multiplies in fp32 and casts last, with
``offset=1.0`` giving Gemma's ``(1 + weight)``. The backward kernel keeps per-program partial sums of the weight
gradient in registers and the host adds the few partials up, so no atomics are needed; for rows wider than
``BWD_HOLD_W_MAX`` it re-reads the weight for each row instead of holding it, so that its registers do not spill.
"""

from typing import Literal

import torch

from ftkernels._triton import TRITON_AVAILABLE, LazyKernel, next_pow2, num_warps, tl, use_triton

Casting = Literal["llama", "gemma"]

__all__ = ["TRITON_AVAILABLE", "RMSNormFunction", "rms_norm", "rms_norm_reference"]


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting: Casting = "llama"
) -> torch.Tensor:
    """Eager PyTorch RMSNorm with the same semantics as the kernel (and as the transformers modules)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        return (weight + offset) * normed.to(x.dtype) if offset else weight * normed.to(x.dtype)
    return (normed * (weight.float() + offset)).to(x.dtype)


if TRITON_AVAILABLE:

    def _rms_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset,
                 CAST_FIRST: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x_raw = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = x * rstd
        if CAST_FIRST:  # Llama: round to the input dtype before the weight multiply, as eager does
            normed = normed.to(x_raw.dtype).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    def _rms_bwd(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, rows_per_prog,
                 CAST_FIRST: tl.constexpr, BLOCK: tl.constexpr, RELOAD_W: tl.constexpr, RELOAD_X: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if not RELOAD_W:  # the weight stays in registers across rows
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_prog  # int64 start gives an int64 loop index: no offset overflow
        for row in range(start, tl.minimum(start + rows_per_prog, n_rows)):
            x_raw = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            x = x_raw.to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            if RELOAD_W:  # wide rows: read the weight again for each row (from L1/L2) instead of holding it
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
            rstd = tl.load(RSTD + row)
            normed = x * rstd
            if CAST_FIRST:  # the weight saw the rounded row in the forward pass
                dw += dy * normed.to(x_raw.dtype).to(tl.float32)
            else:
                dw += dy * normed
            g = dy * w
            # d/dx of x*rstd: rstd * (g - normed * mean(g * normed))
            if RELOAD_X:  # read the row again (from L1) after the reduction instead of keeping it live across it
                mean = tl.sum(g * normed, axis=0) / n_cols
                normed = tl.load(X + row * stride_x + cols, mask=mask, other=0.0,
                                 eviction_policy="evict_first").to(tl.float32) * rstd
                dx = rstd * (g - normed * mean)
            else:
                dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW + pid * n_cols + cols, dw, mask=mask)

    _RMS_FWD = LazyKernel(_rms_fwd)
    _RMS_BWD = LazyKernel(_rms_bwd)


# Widest row whose backward keeps the weight in registers. The backward holds its row (x, dy), the weight and its
# weight-gradient partials in registers: at 8192 columns and 16 warps that fits, at 16384 (Llama-3.1-405B) it spilled
# 32-120 bytes per thread on sm_80/sm_90 in every dtype (tests/kernels/test_aot_compile.py: 128 registers, the most
# a thread gets at 512 threads). Wider rows re-read the weight for each row (it stays hot in L1/L2) and run 32 warps:
# 64 registers, no stack. Of the spill-free variants tried during development (two programs per row, each
# re-reading the row for the dot product; a second pass over the row in one program) this one was the fastest in a
# one-off H200 timing, which bench/kernel_speed.py does not repeat yet (its sweep stops at hidden 8192). Rows of 8192 and
# below keep the kernel as it was. With an fp32 dy under bf16/fp16 x (fp32 norm weights,
# prepare_model_for_kbit_training) 32 warps still spilled 48-56 bytes; re-reading x after the row reduction too
# (RELOAD_X) removes that.
BWD_HOLD_W_MAX = 8192


def launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the forward kernel for rows of ``n_cols``: the whole row in one block."""
    block = next_pow2(n_cols)
    return block, num_warps(block)


def bwd_launch_config(n_cols: int, wide_dy: bool = False) -> dict[str, object]:
    """Constexprs and ``num_warps`` of the backward kernel for rows of ``n_cols``.

    ``wide_dy``: the incoming gradient has a wider dtype than ``x`` (fp32 weight under bf16/fp16 activations).
    """
    block = next_pow2(n_cols)
    if block <= BWD_HOLD_W_MAX:
        return {"BLOCK": block, "RELOAD_W": False, "RELOAD_X": False, "num_warps": num_warps(block)}
    return {"BLOCK": block, "RELOAD_W": True, "RELOAD_X": wide_dy, "num_warps": 32}


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, casting: Casting) -> torch.dtype:
    # Llama multiplies a weight tensor by an x-dtype tensor, so ordinary type promotion decides the output dtype.
    return torch.result_type(weight, x) if casting == "llama" else x.dtype


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)  # the interpreter runs programs one after another: few programs, long loops


class RMSNormFunction(torch.autograd.Function):
    """Autograd function for the Triton RMSNorm; inputs of any leading shape, normalised over the last dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: Casting):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, weight, casting), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, warps = launch_config(n_cols)
        _RMS_FWD[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, offset,
                            CAST_FIRST=casting == "llama", BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.meta = (shape, offset, casting)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        shape, offset, casting = ctx.meta
        dy2 = dy.reshape(-1, shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        n_rows, n_cols = x2.shape
        n_prog = _num_programs(n_rows, x2.device)
        rows_per_prog = -(-n_rows // n_prog)
        dx = torch.empty_like(x2)
        dw_partial = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x2.device)
        _RMS_BWD[(n_prog,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                            n_rows, n_cols, offset, rows_per_prog, CAST_FIRST=casting == "llama",
                            **bwd_launch_config(n_cols, dy2.element_size() > x2.element_size()))
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting: Casting = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dim: Triton on CUDA or under ``TRITON_INTERPRET=1``, else the eager reference."""
    if casting not in ("llama", "gemma"):
        raise ValueError(f"casting must be 'llama' or 'gemma', got {casting!r}")
    if use_triton(x, weight) and x.numel() > 0:
        return RMSNormFunction.apply(x, weight, eps, float(offset), casting)
    return rms_norm_reference(x, weight, eps, offset, casting)
