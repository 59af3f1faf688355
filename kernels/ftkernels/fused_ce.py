"""Fused linear + cross-entropy: the lm_head projection and the loss, in row chunks, never holding [N, vocab].

    loss_i = (1 - s) * (lse_i - x_i[y_i]) + s * (lse_i - mean_j x_ij) + z * lse_i^2,   x_i = h_i @ W^T (+ b)

over rows whose label is not ``ignore_index``; ``reduction="mean"`` divides the sum by the number of such rows
(as ``F.cross_entropy`` does, label smoothing included), ``"sum"`` does not. ``z`` is the PaLM z-loss coefficient.

The gradients are computed during the forward pass, chunk by chunk, while each chunk's logits are at hand:
``dx = softmax(x) * (1 + 2 z lse) - (1 - s) * onehot(y) - s / V`` (zero on ignored rows), then
``dh = dx @ W``, ``dW += dx^T @ h``, ``db += sum(dx)``. The backward pass only scales them by the incoming
gradient, so the logits are never recomputed. Nothing is computed for inputs that do not require grad: with a
frozen lm_head (LoRA) there is no ``dW`` buffer at all. Under ``torch.no_grad`` only the loss is computed.

Memory, with N rows, hidden H, vocab V, chunk C rows and b bytes per element of the model dtype:

    eager (logits, fp32 upcast, fp32 softmax grad):   about N * V * (b + 8)       bytes at the loss' peak
    fused, PyTorch path (chunk logits + fp32 copy):   C * V * (b + 4) + N * H * b
    fused, Triton path (softmax grad written in place): C * V * b + N * H * b
    plus, only when W / b are trainable:              V * H * 4 + V * 4           (fp32 accumulators)

The default C makes a chunk of logits about as large as the hidden states (C = ceil(N / ceil(V / H))), e.g.
N = 16k, H = 4096, V = 128k: eager ~ 20 GiB in bf16, fused ~ 0.37 GiB (PyTorch path) + 128 MiB for dh.
Labels must already be shifted (one label per row of ``hidden``); labels outside [0, V) other than
``ignore_index`` are not checked on the Triton path.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ftkernels._triton import TRITON_AVAILABLE, LazyKernel, next_pow2, num_warps, tl, use_triton

Reduction = Literal["mean", "sum"]

__all__ = [
    "TRITON_AVAILABLE",
    "FusedLinearCrossEntropyFunction",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
]


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: Reduction = "mean", z_loss: float = 0.0,
) -> torch.Tensor:
    """Eager reference: full fp32 logits, ``F.cross_entropy`` plus the z-loss term, in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    if z_loss:
        valid = labels != ignore_index
        z = torch.where(valid, torch.logsumexp(logits, -1).pow(2), 0.0).sum() * z_loss
        loss = loss + (z / valid.sum() if reduction == "mean" else z)
    return loss


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that a chunk of logits holds about as many elements as the hidden states."""
    return max(1, math.ceil(n_rows / max(1, math.ceil(vocab / hidden))))


if TRITON_AVAILABLE:

    def _ce_rows(X, stride, LABELS, LOSS, n_cols, ignore_index, smoothing, z_coef,
                 GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = X + row * stride
        y = tl.load(LABELS + row).to(tl.int64)
        valid = y != ignore_index
        y_safe = tl.where(valid, y, 0)
        # pass 1: online max / sum-exp over the row in blocks (the vocab does not fit in one block)
        m = float("-inf")
        d = 0.0
        sum_x = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(d)
        x_y = tl.load(ptr + y_safe).to(tl.float32)
        loss = (1.0 - smoothing) * (lse - x_y) + smoothing * (lse - sum_x / n_cols) + z_coef * lse * lse
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        if GRAD:
            # pass 2: overwrite the logits with d loss_i / d logits (unscaled by the reduction)
            scale = tl.where(valid, 1.0, 0.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * (1.0 + 2.0 * z_coef * lse) - smoothing / n_cols
                g = tl.where(cols == y_safe, g - (1.0 - smoothing), g) * scale
                tl.store(ptr + cols, g.to(X.dtype.element_ty), mask=mask)

    _CE_ROWS = LazyKernel(_ce_rows)


def launch_config(vocab: int, cuda: bool = True) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of ``_ce_rows`` for rows of ``vocab`` logits; the interpreter gets smaller blocks."""
    block = min(next_pow2(vocab), 4096 if cuda else 1024)
    return block, num_warps(block)


def _chunk_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float, z: float,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses of one chunk and, if asked, d loss_i / d logits (fp32, unscaled by the reduction)."""
    x = logits.float()
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(x, -1)
    loss = (1.0 - smoothing) * (lse - x.gather(1, y).squeeze(1))
    if smoothing:
        loss = loss + smoothing * (lse - x.mean(-1))
    if z:
        loss = loss + z * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if not grad:
        return loss, None
    g = x.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: x is a private fp32 copy (or a temporary)
    if z:
        g.mul_((1.0 + 2.0 * z * lse).unsqueeze(1))
    if smoothing:
        g.sub_(smoothing / g.shape[1])
    g.scatter_add_(1, y, torch.full_like(y, -(1.0 - smoothing), dtype=g.dtype))
    return loss, g.mul_(valid.unsqueeze(1))


def _chunk_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float, z: float,
                  grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``_chunk_torch``; the gradient overwrites ``logits`` in its own dtype."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block, warps = launch_config(vocab, logits.is_cuda)
    _CE_ROWS[(rows,)](logits, logits.stride(0), labels, loss, vocab, ignore_index, float(smoothing), float(z),
                      GRAD=grad, BLOCK=block, num_warps=warps)
    return loss, (logits if grad else None)


def _run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
         ignore_index: int, smoothing: float, z: float, chunk_size: int | None, needs: tuple[bool, bool, bool]
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunk loop: summed loss and the unscaled gradients that ``needs`` (hidden, weight, bias) asks for."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, h, vocab)
    want = any(needs)
    triton_path = use_triton(hidden, weight)
    per_chunk = _chunk_triton if triton_path else _chunk_torch
    d_hidden = torch.empty_like(hidden) if needs[0] else None
    # The weight gradient accumulates over chunks with addmm in the matmul dtype when the weight has it (as Liger
    # does): each chunk's product is rounded to that dtype either way, and a float32 accumulator would add a
    # [vocab, hidden] product tensor plus a float32 read-modify-write per chunk. On an H200 that traffic made this
    # kernel 0.42x eager's speed at 2048 x 4096 x 32k (bench/results/gpu-h200-20261126), with 1282 MiB against
    # eager's 751. A float32 weight under 16-bit activations keeps a float32 accumulator.
    same_dtype = weight.dtype == hidden.dtype
    d_weight = (torch.zeros(weight.shape, dtype=weight.dtype if same_dtype else torch.float32, device=weight.device)
                if needs[1] else None)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if needs[2] else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk):
        h_c, y_c = hidden[start:start + chunk], labels[start:start + chunk]
        logits = F.linear(h_c, weight, bias)
        loss_rows, g = per_chunk(logits, y_c, ignore_index, smoothing, z, want)
        total += loss_rows.sum()
        if not want:
            continue
        g = g.to(hidden.dtype)  # the matmuls run in the model dtype, as eager autograd's would
        if d_hidden is not None:
            torch.mm(g, weight.to(hidden.dtype), out=d_hidden[start:start + chunk])
        if d_weight is not None:
            if same_dtype:
                d_weight.addmm_(g.t(), h_c)
            else:
                d_weight.add_(g.t() @ h_c)
        if d_bias is not None:
            d_bias.add_(g.sum(0, dtype=torch.float32))
    return total, d_hidden, d_weight, d_bias


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd function: gradients are built in ``forward`` and scaled by the incoming gradient in ``backward``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                ignore_index: int, smoothing: float, z: float, reduction: Reduction, chunk_size: int | None
                ) -> torch.Tensor:
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        total, d_h, d_w, d_b = _run(hidden, weight, bias, labels, ignore_index, smoothing, z, chunk_size, needs)
        if reduction == "mean":
            # tensors, not .item(): no host sync. With no valid row the loss is nan and the gradients are zero,
            # as with F.cross_entropy (the clamp only keeps 0 * inf out of the all-zero gradients).
            count = (labels != ignore_index).sum().to(torch.float32)
            loss, scale = total / count, 1.0 / count.clamp(min=1.0)
        else:
            loss, scale = total, torch.ones((), dtype=torch.float32, device=hidden.device)
        ctx.save_for_backward(scale, *(t for t in (d_h, d_w, d_b) if t is not None))
        ctx.present = tuple(t is not None for t in (d_h, d_w, d_b))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        scale, *saved = ctx.saved_tensors
        factor = grad_out.to(torch.float32) * scale
        it = iter(saved)
        grads = [next(it) if p else None for p in ctx.present]
        grads = [None if g is None else (g * factor.to(g.dtype)).to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None, *,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: Reduction = "mean", z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising all logits.

    ``hidden`` is ``[..., H]`` and ``labels`` has its leading shape (already shifted for causal LM). Returns an
    fp32 scalar. Uses the Triton per-chunk kernel on CUDA or under ``TRITON_INTERPRET=1``, PyTorch otherwise;
    both chunk the rows, so the memory saving holds on every device.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1).to(device=h2.device).contiguous()
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {h2.shape[0]} rows of hidden states")
    params = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return FusedLinearCrossEntropyFunction.apply(h2, weight, bias, y, ignore_index, float(label_smoothing),
                                                     float(z_loss), reduction, chunk_size)
    total = _run(h2, weight, bias, y, ignore_index, label_smoothing, z_loss, chunk_size, (False, False, False))[0]
    return total / (y != ignore_index).sum() if reduction == "mean" else total
