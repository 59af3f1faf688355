"""Guarded Triton import, dispatch rule and a lazily-compiled kernel wrapper shared by the kernel modules."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

try:  # Triton is optional: every kernel has a PyTorch path, so importing kernels.* never needs it.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    TRITON_AVAILABLE = False


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton then runs kernels in its NumPy interpreter, CPU tensors included."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule: Triton for CUDA tensors, or for any tensor under the interpreter; PyTorch otherwise."""
    if not TRITON_AVAILABLE:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpret_mode() and all(t.device.type in ("cpu", "cuda") for t in tensors)


class LazyKernel:
    """A Triton kernel compiled on first launch, separately for compiled and interpreter mode.

    ``triton.jit`` picks the interpreter at decoration time from the environment; deferring it lets a process that
    imported ``kernels`` before setting ``TRITON_INTERPRET`` (a test session, a notebook) still use either mode.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        mode = interpret_mode()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode][grid]


def num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: about 256 elements per warp, 1 to 16 (ignored by the interpreter)."""
    return min(16, max(1, block // 256))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (n - 1).bit_length())
