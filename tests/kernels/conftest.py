"""Kernel tests run Triton in interpreter mode on CPU tensors.

TRITON_INTERPRET is set here, before any test module imports triton; kernels.* also reads it at each launch
(LazyKernel), so the order of imports across the whole test session does not matter.
"""

import os
from collections.abc import Callable
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from ftkernels._triton import LazyKernel  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the Triton kernels launched during the test, to prove which path ran."""
    names: list[str] = []
    original = LazyKernel.__getitem__

    def spy(self: LazyKernel, grid: Any) -> Callable[..., Any]:
        names.append(self.fn.__name__)
        return original(self, grid)

    monkeypatch.setattr(LazyKernel, "__getitem__", spy)
    return names


@pytest.fixture
def eager_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors without the interpreter: every kernel must take its PyTorch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

