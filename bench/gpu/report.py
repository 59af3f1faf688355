"""results.jsonl of a GPU run -> a Markdown summary (the tables the README quotes).

    python bench/gpu/report.py RESULTS.jsonl SUMMARY.md

Reads only what the run wrote (results.jsonl and the sft_vs_trl-*.json beside it); nothing is measured here.
Agreement across strategies: each configuration's step losses against the ddp run of the same method, relative.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GiB = 2**30
STEP1_TOLERANCE = 2.0 ** -8


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(value: Any, fmt: str = "{:.3g}") -> str:
    return "" if value is None or value != value else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def env_section(rows: list[dict[str, Any]]) -> str:
    env = next((r for r in rows if r.get("kind") == "env"), None)
    if env is None:
        return "## Environment\n\nnot recorded\n"
    v = env.get("versions", {})
    return ("## Environment\n\n"
            f"- device: {env.get('gpu', env.get('device'))} ({_f(env.get('gpu_memory_bytes', 0) / GiB, '{:.0f}')} GiB, "
            f"{env.get('sm_count', '')} SMs, capability {env.get('capability', '')}); nvidia-smi: "
            f"{env.get('nvidia_smi', '')}\n"
            f"- date {env.get('date')}, commit {env.get('commit')}, host {env.get('host')}, {env.get('cpus')} CPUs\n"
            f"- torch {v.get('torch')} (CUDA {env.get('torch_cuda')}, NCCL {env.get('nccl', '')}), triton "
            f"{v.get('triton')}, transformers {v.get('transformers')}, peft {v.get('peft')}, deepspeed "
            f"{v.get('deepspeed')}, bitsandbytes {v.get('bitsandbytes')}, trl {v.get('trl')}, liger-kernel "
            f"{v.get('liger-kernel')}; one-rank NCCL all-reduce: {env.get('nccl_all_reduce', 'not run')}\n")


def steps_section(rows: list[dict[str, Any]]) -> str:
    steps = [r for r in rows if r.get("kind") == "step"]
    return "## Steps\n\n" + _table(["step", "status", "seconds", "budget"],
                                   [[r["step"], r["status"].splitlines()[0][:160], _f(r["seconds"], "{:.0f}"),
                                     _f(r["budget_s"], "{:.0f}")] for r in steps])


def kernels_section(rows: list[dict[str, Any]]) -> str:
    checks = [r for r in rows if r.get("kind") == "kernel_check"]
    out = "## Kernels: correctness (forward and backward vs a float64 gold result)\n\n"
    table = []
    for r in checks:
        shape = ", ".join(f"{k}={r[k]}" for k in ("tokens", "hidden", "intermediate", "heads", "head_dim", "vocab")
                          if k in r)
        worst = max(r.get("tensors", []), key=lambda t: t["err_kernel"] / max(t["bound"], 1e-30), default=None)
        table.append([r["kernel"], shape, r.get("dtype", ""), r["status"][:120],
                      _f(worst and worst["err_kernel"]), _f(worst and worst["err_eager"]), _f(worst and worst["bound"])])
    out += _table(["kernel", "shape", "dtype", "status", "worst err (kernel)", "err (eager)", "bound"], table)
    timings = [r for r in rows if r.get("kind") == "kernel_timing" and "provider" in r]
    skipped = [r["status"] for r in rows if r.get("kind") == "kernel_timing" and "provider" not in r]
    if skipped:
        out += f"\nKernel timings: {skipped[0]}\n"
    if timings:
        rounds = next((r["rounds"] for r in timings if r.get("rounds")), None)
        how = f", median of {rounds} interleaved rounds" if rounds else ""
        out += f"\n## Kernels: forward + backward time and peak memory (`bench/kernel_speed.py --quick`{how})\n\n"
        by_case: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for r in timings:
            shape = ", ".join(f"{k}={r[k]}" for k in ("tokens", "hidden", "intermediate", "heads", "vocab") if k in r)
            by_case.setdefault((r["kernel"], shape), {})[r["provider"]] = r
        table = []
        for (kernel, shape), providers in by_case.items():
            ours, eager, liger = (providers.get(p, {}) for p in ("ftlaunch", "torch", "liger"))

            def ms(r: dict[str, Any]) -> float | None:
                return r.get("median_ms") if r.get("status") == "ok" and r.get("median_ms") != "" else None

            def ratio(a: float | None, b: float | None) -> str:
                return _f(b / a if a and b else None, "{:.2f}x")

            table.append([kernel, shape, _f(ms(ours), "{:.3f}"), _f(ms(eager), "{:.3f}"), _f(ms(liger), "{:.3f}"),
                          ratio(ms(ours), ms(eager)), ratio(ms(ours), ms(liger)),
                          _f(ours.get("peak_mib") or None, "{:.0f}"), _f(eager.get("peak_mib") or None, "{:.0f}"),
                          _f(liger.get("peak_mib") or None, "{:.0f}"),
                          "; ".join(f"{p}: {r['status'][:60]}" for p, r in providers.items() if r["status"] != "ok")])
        out += _table(["kernel", "shape", "ours ms", "eager ms", "liger ms", "speedup vs eager", "speedup vs liger",
                       "ours MiB", "eager MiB", "liger MiB", "errors"], table)
    return out


def _agreement(configs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Max relative loss difference of each config against the ddp config of the same method, over all steps."""
    base = {r["method"]: r["losses"] for r in configs if r.get("strategy") == "ddp" and r.get("losses")}
    out: dict[str, float | None] = {}
    for r in configs:
        ref = base.get(r.get("method"))
        if not ref or not r.get("losses"):
            out[r["name"]] = None
            continue
        out[r["name"]] = max(abs(a - b) / max(1e-12, abs(b)) for a, b in zip(r["losses"], ref))
    return out


def training_section(rows: list[dict[str, Any]], kind: str, title: str) -> str:
    configs = [r for r in rows if r.get("kind") == kind]
    if not configs:
        return ""
    agreement = _agreement(configs)
    table = []
    for r in configs:
        memory, predicted, error = r.get("memory", {}), r.get("predicted") or {}, r.get("planner_error") or {}
        losses = r.get("losses") or []
        table.append([
            r["name"], r["status"].splitlines()[0][:100], _f(losses[0] if losses else None, "{:.4f}"),
            _f(losses[-1] if losses else None, "{:.4f}"), _f(agreement.get(r["name"]), "{:.1e}"),
            _f(r.get("tokens_per_s"), "{:,.0f}"), _f(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"),
            _f(memory.get("allocated_peak", 0) / GiB or None, "{:.1f}"),
            _f(memory.get("device_peak", 0) / GiB or None, "{:.1f}"),
            _f(predicted.get("total", 0) / GiB or None, "{:.1f}"),
            _f(error.get("total_vs_device_peak") and 100 * error["total_vs_device_peak"], "{:+.0f}%"),
        ])
    first = [r["losses"][0] for r in configs if r.get("losses")]
    spread = (max(first) - min(first)) / max(first) if len(first) > 1 else None
    verdict = "" if spread is None else (
        f"\nStep 1 (same weights, same batch) across configurations: relative spread {spread:.1e}, "
        f"{'within' if spread <= STEP1_TOLERANCE else 'BEYOND'} the tolerance {STEP1_TOLERANCE:.1e} (one bf16 "
        "rounding: only the order of bf16 reductions differs between strategies at step 1).\n")
    return (f"## {title}\n\n" + _table(
        ["config", "status", "loss step 1", "loss last", "max rel. loss diff vs ddp", "tokens/s", "MFU",
         "peak allocated GiB", "device peak GiB", "planner GiB", "planner error"], table) + verdict)


def resume_section(rows: list[dict[str, Any]]) -> str:
    runs = [r for r in rows if r.get("kind") == "resume"]
    if not runs:
        return ""
    table = [[r["name"], r["status"].splitlines()[0][:160], str(r.get("save_at", "")), str(r.get("steps", "")),
              _f(r.get("max_rel_diff"), "{:.1e}"), _f(r.get("tolerance"), "{:.1e}"),
              _f(r.get("trainer_mfu_last") and 100 * r["trainer_mfu_last"], "{:.1f}%")] for r in runs]
    return "## Save and resume\n\n" + _table(["run", "status", "saved at", "steps", "max rel. loss diff",
                                             "tolerance", "MFU (progress line)"], table)


def e2e_section(results: Path) -> str:
    files = sorted(results.parent.glob("sft_vs_trl-*.json"))
    if not files:
        return ""
    report = json.loads(files[-1].read_text())
    sides = report["per_side_median"]
    names = [s for s in sides if s != "trl"] + ["trl"]
    table = []
    for label, key, fmt in (("tokens/s", "tokens_per_s", "{:,.0f}"), ("median step s", "median_timed_step_s", "{:.3f}"),
                            ("peak GPU MiB", "gpu_peak_allocated_mib", "{:,.0f}"), ("loss step 1", "loss_step1", "{:.4f}"),
                            ("loss final", "loss_final", "{:.4f}")):
        table.append([label, *(_f(sides[n].get(key), fmt) for n in names)])
    ratios = report.get("ratios", {})
    lines = [f"- {k}: {_f(v, '{:.3f}')}" for k, v in ratios.items() if v == v]
    return (f"## End to end: LoRA SFT, ours vs TRL SFTTrainer ({files[-1].name})\n\n" + _table(["", *names], table)
            + "\n" + "\n".join(lines) + f"\n\nchecks: {json.dumps(report.get('checks', {}))}\n")


def render(results: Path) -> str:
    rows = _rows(results)
    parts = ["# GPU check\n", env_section(rows), steps_section(rows), kernels_section(rows),
             training_section(rows, "strategy", "Strategies on one GPU"),
             training_section(rows, "qlora", "QLoRA 4-bit (nf4, double quantization): ddp + paged AdamW 8-bit; fsdp + AdamW"),
             resume_section(rows), e2e_section(results)]
    return "\n".join(p for p in parts if p)


def main(argv: list[str]) -> int:
    Path(argv[1]).write_text(render(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
