"""Benchmark the fused kernels on CUDA: ours vs eager PyTorch vs Liger-Kernel (when importable).

    python bench/kernel_speed.py                  # per-kernel sweep -> bench/results/kernels-<gpu>.csv
    python bench/kernel_speed.py --quick          # one shape per kernel (8192 tokens)
    python bench/kernel_speed.py --e2e            # LoRA SFT of a random ~1B Llama, with and without kernels

Each row: median forward+backward time (``triton.testing.do_bench``) and peak memory above the inputs
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), tagged with machine, date and git commit.
The providers of one shape are timed in ROUNDS interleaved rounds, each starting with another provider, and the row
holds the median of the rounds' medians and their spread: two H200 runs that timed the providers one after the other
at 2048 tokens disagreed by up to 3x on an unchanged kernel (0.2-0.5 ms per call, where host overhead and a GPU just
out of idle weigh as much as the kernel). The quick shape is 8192 tokens for the same reason.
Shapes follow Liger's benchmarks: hidden 4096-8192, sequence 2k-16k tokens, vocab 32k-128k, bf16.
Without CUDA (or Triton) it prints why and exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # importable without installing ftlaunch

import torch  # noqa: E402

Row = dict[str, Any]
Case = tuple[str, dict[str, int], Callable[[], tuple[Callable[[], Any], list[torch.Tensor]]]]
DTYPE = torch.bfloat16
QUICK_TOKENS = 8192
ROUNDS = 5


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict[str, str]:
    gpu = torch.cuda.get_device_name()
    return {"gpu": gpu, "host": platform.node(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(), "torch": torch.__version__, "triton": _triton_version()}


def _triton_version() -> str:
    import triton

    return triton.__version__


def _prepare(make: Callable[[], tuple[Callable[[], Any], list[torch.Tensor]]]
             ) -> tuple[Callable[[], Any], list[torch.Tensor], float]:
    """(fwd+bwd closure, tensors whose .grad is reset between calls, peak MiB above what the inputs hold)."""
    fn, grads_to_none = make()
    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    for t in grads_to_none:
        t.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return fn, grads_to_none, (torch.cuda.max_memory_allocated() - base) / 2**20


def _interleaved_medians(fns: list[tuple[Callable[[], Any], list[torch.Tensor]]], rounds: int) -> list[list[float]]:
    """Per provider, the median ms of each round; round r starts with provider r mod P, so that no provider is always
    the one timed first (on a GPU still raising its clocks) or right after another's allocations."""
    from triton.testing import do_bench

    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            fn, grads = fns[i]
            times[i].append(float(do_bench(fn, grad_to_none=grads, return_mode="median")))
    return times


def _fwd_bwd(forward: Callable[..., Any], inputs: list[torch.Tensor], *args: Any) -> Callable[[], None]:
    def run() -> None:
        out = forward(*inputs, *args)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def _leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda", dtype=DTYPE) * scale).requires_grad_()


# ---------------------------------------------------------------- cases: one generator per kernel, shapes x providers
def _rmsnorm_cases(quick: bool) -> Iterator[Case]:
    from ftkernels.rmsnorm import rms_norm, rms_norm_reference

    for hidden in (4096,) if quick else (4096, 8192):
        for tokens in (QUICK_TOKENS,) if quick else (2048, 4096, 8192, 16384):
            shape = {"tokens": tokens, "hidden": hidden}

            def make(fn: Callable[..., Any], h: int = hidden, n: int = tokens) -> Any:
                return lambda: (lambda x, w: (_fwd_bwd(fn, [x, w], 1e-6), [x, w]))(_leaf(n, h), _leaf(h))

            yield "ftlaunch", shape, make(rms_norm)
            yield "torch", shape, make(rms_norm_reference)
            liger = _liger("LigerRMSNorm")
            if liger is not None:
                def make_liger(h: int = hidden, n: int = tokens) -> Any:
                    norm = liger(h, eps=1e-6).to("cuda", DTYPE)
                    x = _leaf(n, h)
                    return _fwd_bwd(norm, [x]), [x, norm.weight]
                yield "liger", shape, make_liger


def _swiglu_cases(quick: bool) -> Iterator[Case]:
    from ftkernels.swiglu import swiglu, swiglu_reference

    for inter in (14336,) if quick else (14336, 28672):
        for tokens in (QUICK_TOKENS,) if quick else (2048, 4096, 8192, 16384):
            shape = {"tokens": tokens, "intermediate": inter}

            def make(fn: Callable[..., Any], i: int = inter, n: int = tokens) -> Any:
                return lambda: (lambda a, b: (_fwd_bwd(fn, [a, b]), [a, b]))(_leaf(n, i), _leaf(n, i))

            yield "ftlaunch", shape, make(swiglu)
            yield "torch", shape, make(swiglu_reference)
            liger = _liger("functional.liger_swiglu")
            if liger is not None:
                yield "liger", shape, make(liger)


def _rope_cases(quick: bool) -> Iterator[Case]:
    from ftkernels.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_reference

    heads, kv_heads, dim = 32, 8, 128
    for seq in (QUICK_TOKENS,) if quick else (2048, 4096, 8192, 16384):
        shape = {"tokens": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim}

        def make(fn: Callable[..., Any], s: int = seq) -> Any:
            def build() -> tuple[Callable[[], None], list[torch.Tensor]]:
                q, k = _leaf(1, heads, s, dim), _leaf(1, kv_heads, s, dim)
                angle = torch.arange(s, device="cuda")[None, :, None] * torch.rand(dim // 2, device="cuda")
                emb = torch.cat((angle, angle), -1)
                return _fwd_bwd(fn, [q, k], emb.cos().to(DTYPE), emb.sin().to(DTYPE)), [q, k]
            return build

        yield "ftlaunch", shape, make(apply_rotary_pos_emb)
        yield "torch", shape, make(apply_rotary_pos_emb_reference)
        liger = _liger("liger_rotary_pos_emb")
        if liger is not None:
            yield "liger", shape, make(liger)


def _fused_ce_cases(quick: bool) -> Iterator[Case]:
    from ftkernels.fused_ce import fused_linear_cross_entropy, linear_cross_entropy_reference

    hidden = 4096
    for vocab in (32000,) if quick else (32000, 128256):
        for tokens in (QUICK_TOKENS,) if quick else (2048, 4096, 8192, 16384):
            shape = {"tokens": tokens, "hidden": hidden, "vocab": vocab}

            def make(fn: Callable[..., Any], v: int = vocab, n: int = tokens) -> Any:
                def build() -> tuple[Callable[[], None], list[torch.Tensor]]:
                    h, w = _leaf(n, hidden), _leaf(v, hidden, scale=0.02)
                    y = torch.randint(0, v, (n,), device="cuda")
                    return (lambda: fn(h, w, y).backward()), [h, w]
                return build

            # the eager baseline is what transformers does: bf16 logits, upcast, F.cross_entropy
            yield "ftlaunch", shape, make(fused_linear_cross_entropy)
            yield "torch", shape, make(linear_cross_entropy_reference)
            liger = _liger("LigerFusedLinearCrossEntropyLoss")
            if liger is not None:
                loss = liger()
                yield "liger", shape, make(lambda h, w, y, _loss=loss: _loss(w, h, y))


CASES: dict[str, Callable[[bool], Iterator[Case]]] = {
    "rmsnorm": _rmsnorm_cases, "swiglu": _swiglu_cases, "rope": _rope_cases, "fused_ce": _fused_ce_cases}


def _liger(name: str) -> Any:
    """An attribute of ``liger_kernel.transformers`` (dotted below it), or None when Liger is not importable."""
    try:
        import importlib

        module_name, _, attr = f"liger_kernel.transformers.{name}".rpartition(".")
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


def _status(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    return f"error: {type(exc).__name__}: {exc}"[:200]


def run_kernels(names: list[str], quick: bool, rounds: int = ROUNDS) -> list[Row]:
    """Measure every (kernel, shape, provider), the providers of a shape interleaved over `rounds` rounds; failures
    (OOM, API drift) become rows with a status and leave the other providers' rows intact."""
    rows: list[Row] = []
    for name in names:
        groups: dict[str, list[tuple[str, Any]]] = {}
        shapes: dict[str, dict[str, int]] = {}
        for provider, shape, make in CASES[name](quick):
            key = repr(sorted(shape.items()))
            groups.setdefault(key, []).append((provider, make))
            shapes[key] = shape
        for key, providers in groups.items():
            ready: list[tuple[Row, Any]] = []
            for provider, make in providers:
                row: Row = {"kernel": name, "provider": provider, **shapes[key], "median_ms": "", "spread_ms": "",
                            "peak_mib": "", "rounds": rounds, "status": "ok"}
                try:
                    fn, grads, peak = _prepare(make)
                    row["peak_mib"] = round(peak, 4)
                    ready.append((row, (fn, grads)))
                except Exception as exc:  # noqa: BLE001 - one broken provider must not end the sweep
                    row["status"] = _status(exc)
                rows.append(row)
            try:
                for (row, _), times in zip(ready, _interleaved_medians([f for _, f in ready], rounds)):
                    times.sort()
                    row["median_ms"] = round(times[len(times) // 2], 4)
                    row["spread_ms"] = round(times[-1] - times[0], 4)
            except Exception as exc:  # noqa: BLE001
                for row, _ in ready:
                    row["status"] = _status(exc)
            del ready
            torch.cuda.empty_cache()
            for provider_row in rows[-len(providers):]:
                print(provider_row, flush=True)
    return rows


# ---------------------------------------------------------------- end to end: LoRA SFT of a random Llama-shaped ~1B
def _e2e_once(use_kernels: bool, seq: int, batch: int, steps: int, warmup: int) -> Row:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftkernels.patch import apply_kernels

    torch.manual_seed(0)
    # Llama-3.2-1B's shape (1.24B parameters), random weights: nothing is downloaded
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max(seq, 2048),
                         tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(DTYPE)
    applied = apply_kernels(model, "all") if use_kernels else []
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    row = {"kernel": "e2e-lora-llama-1b", "provider": "+".join(applied) or "eager", "tokens": batch * seq,
           "batch": batch, "seq": seq, "tokens_per_s": round(batch * seq * steps / elapsed, 1),
           "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1), "final_loss": round(loss.item(), 4),
           "status": "ok"}
    del model, optim
    torch.cuda.empty_cache()
    return row


def run_e2e(seq: int, batch: int, steps: int, warmup: int) -> list[Row]:
    """Tokens/s and peak memory of LoRA SFT without, then with, all kernels."""
    rows = []
    for use in (False, True):
        try:
            rows.append(_e2e_once(use, seq, batch, steps, warmup))
        except torch.cuda.OutOfMemoryError:
            rows.append({"kernel": "e2e-lora-llama-1b", "provider": "all" if use else "eager", "status": "oom"})
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    return rows


def write_csv(rows: list[Row], machine: dict[str, str], path: Path) -> None:
    """Append-free write: one file per GPU name, machine/date/commit on every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{**machine, **row} for row in rows]
    fields: list[str] = []
    for row in full:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(full)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 when there is no CUDA device or no Triton)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="smallest shape of each sweep only")
    parser.add_argument("--e2e", action="store_true", help="LoRA SFT tokens/s and memory instead of the sweep")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
              "The kernels' correctness tests run on CPU: pytest tests/kernels", file=sys.stderr)
        return 2
    from ftkernels._triton import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        print("bench/kernel_speed.py needs triton (pip install triton); nothing was measured.", file=sys.stderr)
        return 2
    machine = _machine()
    rows = run_e2e(args.seq, args.batch, args.steps, args.warmup) if args.e2e else run_kernels(args.kernels,
                                                                                                 args.quick)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine["gpu"]).strip("-").lower()
    path = args.out / f"kernels{'-e2e' if args.e2e else ''}-{slug}.csv"
    write_csv(rows, machine, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
