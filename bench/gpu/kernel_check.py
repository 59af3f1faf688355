"""Kernel correctness on the device (forward and backward, bf16), then `bench/kernel_speed.py --quick` timings.

    python bench/gpu/kernel_check.py RESULTS.jsonl [--cpu-dry-run]

Tolerance, derived rather than picked. Each kernel and its eager PyTorch reference get the same bf16 inputs; both
are compared with a gold result computed in float64 from those inputs. bf16 keeps 8 significant bits, so rounding one
output costs up to 2^-9 relative, and eager bf16 code rounds after every op. A kernel is correct when its error
against the gold result is at most twice the eager reference's own error plus one bf16 rounding of the output's
scale: `err(kernel) <= 2 * err(eager) + 2^-8 * max|gold|` (max-abs errors, per output and gradient). So a kernel may
be as inexact as what transformers runs today, never clearly worse. On the CPU dry run (Triton interpreter, float32)
the same rule applies with float32 inputs.

Timings: one row per (kernel, shape, provider) with provider ftlaunch, torch (eager) and liger (when Liger-Kernel
imports), median ms of forward + backward and peak memory above the inputs (bench/kernel_speed.py). CUDA only.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import ROOT, append

Outputs = list[torch.Tensor]


def _grads(fn: Callable[..., Any], inputs: list[torch.Tensor], upstream_seed: int = 1) -> Outputs:
    """Outputs of fn(*inputs) and the gradients of every input that requires grad, for a fixed random upstream."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    generator = torch.Generator(device="cpu").manual_seed(upstream_seed)
    upstream = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]


def _gold(fn: Callable[..., Any], inputs: list[torch.Tensor]) -> Outputs:
    """The reference in float64 from the same (rounded) inputs, on the CPU (constant inputs: cos/sin, labels too)."""
    return _grads(fn, [t.detach().double().cpu().requires_grad_(t.requires_grad) if t.is_floating_point()
                       else t.cpu() for t in inputs])


def _max_err(a: torch.Tensor, gold: torch.Tensor) -> float:
    return float((a.double().cpu() - gold).abs().max())


def compare(name: str, shape: dict[str, int], kernel: Callable[..., Any], reference: Callable[..., Any],
            inputs: list[torch.Tensor]) -> dict[str, Any]:
    got, eager, gold = _grads(kernel, inputs), _grads(reference, inputs), _gold(reference, inputs)
    parts = []
    ok = True
    for index, (g, e, r) in enumerate(zip(got, eager, gold)):
        scale = float(r.abs().max()) or 1.0
        bound = 2 * _max_err(e, r) + 2.0 ** -8 * scale
        err = _max_err(g, r)
        ok &= err <= bound
        parts.append({"tensor": index, "err_kernel": err, "err_eager": _max_err(e, r), "bound": bound,
                      "scale": scale})
    return {"kind": "kernel_check", "kernel": name, **shape, "dtype": str(inputs[0].dtype).removeprefix("torch."),
            "status": "ok" if ok else "failed: error above bound", "tensors": parts}


def cases(device: str, dtype: torch.dtype, dry: bool) -> list[tuple[str, dict[str, int], Callable[..., Any],
                                                                         Callable[..., Any], list[torch.Tensor]]]:
    from ftkernels.fused_ce import fused_linear_cross_entropy, linear_cross_entropy_reference
    from ftkernels.rmsnorm import rms_norm, rms_norm_reference
    from ftkernels.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_reference
    from ftkernels.swiglu import swiglu, swiglu_reference

    torch.manual_seed(0)

    def t(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        return (torch.randn(*shape, dtype=torch.float32) * scale).to(device, dtype).requires_grad_(grad)

    out = []
    # hidden sizes: SmolLM2 (576), Llama-3.2-1B (2048), 8B (4096), 405B (16384); tokens kept small for the gold pass
    hiddens = (96, 576) if dry else (576, 2048, 4096, 16384)
    for hidden in hiddens:
        tokens = 8 if dry else 256
        weight = (1 + 0.1 * torch.randn(hidden)).to(device, dtype).requires_grad_()
        out.append(("rmsnorm", {"tokens": tokens, "hidden": hidden},
                    lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_reference(x, w, 1e-6),
                    [t(tokens, hidden), weight]))
    for inter in ((64,) if dry else (8192, 14336)):
        tokens = 8 if dry else 256
        out.append(("swiglu", {"tokens": tokens, "intermediate": inter}, swiglu, swiglu_reference,
                    [t(tokens, inter), t(tokens, inter)]))
    heads, kv_heads, dim, seq = (4, 2, 16, 8) if dry else (32, 8, 128, 512)
    angle = torch.arange(seq)[None, :, None] * torch.rand(dim // 2)
    emb = torch.cat((angle, angle), -1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    out.append(("rope", {"tokens": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim},
                apply_rotary_pos_emb, apply_rotary_pos_emb_reference,
                [t(1, heads, seq, dim), t(1, kv_heads, seq, dim), cos, sin]))
    hidden, vocab, tokens = (32, 100, 16) if dry else (2048, 128256, 64)  # the float64 gold pass runs on the CPU
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[::7] = -100
    out.append(("fused_ce", {"tokens": tokens, "hidden": hidden, "vocab": vocab},
                fused_linear_cross_entropy, linear_cross_entropy_reference,
                [t(tokens, hidden), t(vocab, hidden, scale=0.02), labels]))
    return out


def main(argv: list[str]) -> int:
    results = Path(argv[0])
    dry = "--cpu-dry-run" in argv
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    failures = 0
    rows: list[dict[str, Any]] = []
    for name, shape, kernel, reference, inputs in cases(device, dtype, dry):
        started = time.perf_counter()
        try:
            row = compare(name, shape, kernel, reference, inputs)
        except Exception as err:  # noqa: BLE001 - record and go on with the next kernel
            row = {"kind": "kernel_check", "kernel": name, **shape, "status": f"failed: {type(err).__name__}: {err}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
        row["seconds"] = round(time.perf_counter() - started, 2)
        failures += row["status"] != "ok"
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("kernel", "hidden", "status", "seconds")}), flush=True)
    if dry:
        append(results, {"kind": "kernel_timing", "status": "skipped: timings need CUDA (bench/kernel_speed.py)"})
    else:
        import importlib.util  # bench/ is not a package on the path: load bench/kernel_speed.py by its file

        spec = importlib.util.spec_from_file_location("kernel_speed", ROOT / "bench" / "kernel_speed.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        for timing in bench.run_kernels(list(bench.CASES), quick=True):
            rows.append({"kind": "kernel_timing", **timing})
    for row in rows:
        append(results, row)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
