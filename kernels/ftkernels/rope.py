"""Rotary position embedding for q and k in one Triton kernel, forward and backward.

Layout as transformers' Llama family: ``q`` is ``[bs, heads, seq, head_dim]`` (``unsqueeze_dim=1``) or
``[bs, seq, heads, head_dim]`` (``unsqueeze_dim=2``), ``cos``/``sin`` are ``[bs or 1, seq, head_dim]`` and

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

One program handles one (batch, position) pair for all heads of q and k, so cos/sin are read once per position.
Tensors are addressed through their strides: q and k arrive as transposed views and are never copied. The
backward is the transposed rotation (``-sin``, halves swapped); cos/sin get no gradient (transformers builds
them under no_grad).
"""

import torch

from ftkernels._triton import TRITON_AVAILABLE, LazyKernel, next_pow2, tl, use_triton

__all__ = ["TRITON_AVAILABLE", "RoPEFunction", "apply_rotary_pos_emb", "apply_rotary_pos_emb_reference"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager rotary embedding, identical to transformers' ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if TRITON_AVAILABLE:

    def _rope_kernel(Q, K, QO, KO, COS, SIN, seq_len, n_q, n_k,
                     sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                     sc_b, sc_s,
                     BACKWARD: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        dims = tl.arange(0, BLOCK_D)[None, :]
        dmask = dims < HALF
        # sc_b is 0 when cos/sin are shared across the batch (position_ids of batch 1)
        c_base = b * sc_b + s * sc_s + dims
        cos1 = tl.load(COS + c_base, mask=dmask, other=0.0).to(tl.float32)
        cos2 = tl.load(COS + c_base + HALF, mask=dmask, other=0.0).to(tl.float32)
        sin_a = tl.load(SIN + c_base, mask=dmask, other=0.0).to(tl.float32)
        sin_b = tl.load(SIN + c_base + HALF, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward map: dx1 = d1*cos1 + d2*sin2, dx2 = d2*cos2 - d1*sin1
            sin1 = -sin_b
            sin2 = -sin_a
        else:
            sin1 = sin_a
            sin2 = sin_b

        # q: all heads of this position as one [heads, half] tile per half (inlined rather than a helper so the
        # lazily-jitted entry point has no jitted callees)
        hq = tl.arange(0, BLOCK_HQ)[:, None]
        mq = (hq < n_q) & dmask
        src = Q + b * sq_b + s * sq_s + hq * sq_h + dims
        dst = QO + b * sqo_b + s * sqo_s + hq * sqo_h + dims
        x1 = tl.load(src, mask=mq, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mq, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * cos1 - x2 * sin1).to(QO.dtype.element_ty), mask=mq)
        tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(QO.dtype.element_ty), mask=mq)

        hk = tl.arange(0, BLOCK_HK)[:, None]
        mk = (hk < n_k) & dmask
        src = K + b * sk_b + s * sk_s + hk * sk_h + dims
        dst = KO + b * sko_b + s * sko_s + hk * sko_h + dims
        x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mk, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * cos1 - x2 * sin1).to(KO.dtype.element_ty), mask=mk)
        tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(KO.dtype.element_ty), mask=mk)

    _ROPE = LazyKernel(_rope_kernel)


def _bshd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """View as [bs, heads, seq, dim] whatever the input layout (a view: strides do the work)."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def launch_config(n_q: int, n_k: int, head_dim: int) -> dict[str, int]:
    """Constexprs and ``num_warps`` of ``_rope_kernel`` for ``n_q`` / ``n_k`` heads of ``head_dim`` (even)."""
    half = head_dim // 2
    return {"HALF": half, "BLOCK_HQ": next_pow2(n_q), "BLOCK_HK": next_pow2(n_k), "BLOCK_D": next_pow2(half),
            "num_warps": 4}  # Triton's default, which the launch used implicitly before


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    qv, kv, qov, kov = (_bshd(t, unsqueeze_dim) for t in (q, k, qo, ko))
    bs, n_q, seq, dim = qv.shape
    n_k = kv.shape[1]
    cos_e = cos.expand(bs, seq, dim)  # broadcasting a batch-1 cos gives stride 0 on the batch dim
    sin_e = sin.expand(bs, seq, dim)
    if cos_e.stride(-1) != 1 or sin_e.stride() != cos_e.stride():
        cos_e, sin_e = cos_e.contiguous(), sin_e.contiguous()
    for t in (qv, kv, qov, kov):
        assert t.stride(-1) == 1, "rope kernel needs a unit stride on head_dim"
    _ROPE[(bs * seq,)](
        qv, kv, qov, kov, cos_e, sin_e, seq, n_q, n_k,
        qv.stride(0), qv.stride(1), qv.stride(2), kv.stride(0), kv.stride(1), kv.stride(2),
        qov.stride(0), qov.stride(1), qov.stride(2), kov.stride(0), kov.stride(1), kov.stride(2),
        cos_e.stride(0), cos_e.stride(1),
        BACKWARD=backward, **launch_config(n_q, n_k, dim),
    )
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """Autograd function applying the rotation to q and k together; gradients flow to q and k only."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _launch(q, k, cos, sin, False, unsqueeze_dim)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        # the map is linear in q and k, so the gradient is its transpose: a rotation by -theta
        gq, gk = _launch(dq, dk, cos, sin, True, ctx.unsqueeze_dim)
        return gq, gk, None, None, None


def _kernel_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or unsqueeze_dim not in (1, 2):
        return False
    dim = q.shape[-1]
    qv, kv = _bshd(q, unsqueeze_dim), _bshd(k, unsqueeze_dim)
    return (dim % 2 == 0 and k.shape[-1] == dim and cos.shape[-1] == dim and cos.shape[1] == qv.shape[2]
            and kv.shape[0] == qv.shape[0] and kv.shape[2] == qv.shape[2] and cos.shape[0] in (1, qv.shape[0])
            and q.stride(-1) == 1 and k.stride(-1) == 1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb``: Triton where it applies, else the eager reference.

    Falls back to eager for shapes the kernel does not cover (partial rotary, odd head dims) and when cos/sin
    need gradients, so it is always safe to substitute.
    """
    if (use_triton(q, k, cos, sin) and not (cos.requires_grad or sin.requires_grad)
            and _kernel_fits(q, k, cos, unsqueeze_dim) and q.numel() > 0):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
    return apply_rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim)
