"""Chunked linear + cross-entropy vs F.cross_entropy on full logits: loss and gradients, both paths."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ftkernels.fused_ce as fused_ce
from ftkernels._triton import TRITON_AVAILABLE
from ftkernels.fused_ce import fused_linear_cross_entropy, linear_cross_entropy_reference

requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
PATHS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=requires_triton)]


@pytest.fixture
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


def _loss_and_grads(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, labels: torch.Tensor,
                    **kw: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(params[0], params[1], labels, params[2] if bias is not None else None, **kw)
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def _compare(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             atol: float = 1e-5, rtol: float = 1e-5, chunk_size: int | None = None, **kw: Any) -> None:
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, bias, labels,
                                  chunk_size=chunk_size, **kw)
    ref_loss, ref_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, bias, labels, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_full_logits(path: str, reduction: str, smoothing: float, z_loss: float, bias: bool,
                             launches: list[str]) -> None:
    n, h, v = 37, 24, 301
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.5
    labels = torch.randint(0, v, (n,))
    labels[5:20] = -100  # with chunk_size 5, chunk 2 is ignored rows only
    _compare(hidden, weight, torch.randn(v) if bias else None, labels, chunk_size=5, reduction=reduction,
             label_smoothing=smoothing, z_loss=z_loss)
    assert (len(launches) == 8) == (path == "triton")  # one launch per chunk on the Triton path, none otherwise


def test_reference_is_f_cross_entropy() -> None:
    hidden, weight, labels = torch.randn(9, 16), torch.randn(50, 16), torch.randint(0, 50, (9,))
    labels[2] = -100
    want = F.cross_entropy(hidden @ weight.T, labels, label_smoothing=0.1)
    torch.testing.assert_close(linear_cross_entropy_reference(hidden, weight, labels, label_smoothing=0.1), want)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("n,chunk_size", [(1, None), (16, 1), (16, None), (16, 1000)])
def test_chunkings_and_batch_one(path: str, n: int, chunk_size: int | None) -> None:
    labels = torch.randint(0, 200, (n,))
    _compare(torch.randn(n, 40), torch.randn(200, 40), None, labels, chunk_size=chunk_size)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_long_rows_over_several_blocks(path: str) -> None:
    # vocab > the Triton block (1024 on CPU): the online softmax crosses block boundaries
    _compare(torch.randn(6, 32), torch.randn(2500, 32), None, torch.randint(0, 2500, (6,)), chunk_size=4,
             label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(path: str, reduction: str) -> None:
    hidden, weight = torch.randn(4, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction=reduction)
    loss.backward()
    assert torch.isnan(loss) == torch.isnan(ref)  # mean over no tokens is nan, as in torch; sum is 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bf16(path: str) -> None:
    hidden, weight = torch.randn(20, 48, dtype=torch.bfloat16), (torch.randn(120, 48) * 0.3).to(torch.bfloat16)
    labels = torch.randint(0, 120, (20,))
    labels[:3] = -100
    _compare(hidden, weight, None, labels, atol=2e-2, rtol=2e-2, chunk_size=6, label_smoothing=0.1)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_frozen_head_and_no_grad(path: str) -> None:
    hidden, weight = torch.randn(10, 16, requires_grad=True), torch.randn(60, 16)
    labels = torch.randint(0, 60, (10,))
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    loss.backward()
    assert weight.grad is None
    ref_hidden = hidden.detach().clone().requires_grad_()
    linear_cross_entropy_reference(ref_hidden, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels), loss.detach())


def test_logits_never_exceed_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    linear = F.linear

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = linear(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(fused_ce.F, "linear", spy)
    hidden = torch.randn(64, 16, requires_grad=True)
    fused_linear_cross_entropy(hidden, torch.randn(100, 16), torch.randint(0, 100, (64,))).backward()
    chunk = fused_ce.default_chunk_size(64, 16, 100)
    assert chunk < 64 and shapes and all(s[0] <= chunk for s in shapes)


def test_grad_output_scaling() -> None:
    hidden, weight = torch.randn(8, 16, requires_grad=True), torch.randn(40, 16)
    labels = torch.randint(0, 40, (8,))
    (3.0 * fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3)).backward()
    ref = hidden.detach().clone().requires_grad_()
    (3.0 * linear_cross_entropy_reference(ref, weight, labels)).backward()
    torch.testing.assert_close(hidden.grad, ref.grad)


def test_argument_checks() -> None:
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, y, chunk_size=0)
