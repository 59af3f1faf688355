"""`bench/gpu/run.sh --cpu-dry-run`: the GPU check's every step, on the CPU with a tiny model, so the script that
only a lent GPU machine runs for real cannot rot between GPU runs. CUDA-only parts (kernel timings, the NCCL
all-reduce, MFU, device memory) must say they were skipped, never pass silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = ["env", "assets", "kernels", "strategies_lora", "qlora", "e2e", "strategies_full", "resume"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out, work = tmp_path_factory.mktemp("gpu-out"), tmp_path_factory.mktemp("gpu-work")
    env = {**os.environ, "PYTHON": sys.executable, "FTLAUNCH_CACHE": str(work / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "--cpu-dry-run", str(out), "--work",
                           str(work), "--budget", "1500"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log[-6000:]}"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows


def test_every_step_ran_and_passed(dry_run: tuple[Path, list[dict]]) -> None:
    _, rows = dry_run
    steps = {r["step"]: r["status"] for r in rows if r["kind"] == "step"}
    assert list(steps) == STEPS
    assert set(steps.values()) == {"ok"}, steps


def test_cuda_only_parts_say_skipped(dry_run: tuple[Path, list[dict]]) -> None:
    _, rows = dry_run
    env = next(r for r in rows if r["kind"] == "env")
    assert env["device"] == "cpu" and env["nccl_all_reduce"].startswith("skipped")
    timings = [r for r in rows if r["kind"] == "kernel_timing"]
    assert len(timings) == 1 and timings[0]["status"].startswith("skipped")
    assert all(r["mfu"] is None and "memory" not in r for r in rows if r["kind"] in ("strategy", "qlora"))


def test_training_rows_agree_and_carry_predictions(dry_run: tuple[Path, list[dict]]) -> None:
    """Same weights, data and seed: every strategy's first step sees the same loss (bf16 on CPU: to 1e-3)."""
    _, rows = dry_run
    configs = [r for r in rows if r["kind"] == "strategy"]
    assert sorted(r["name"] for r in configs) == sorted(f"{s}-{m}" for s in ("ddp", "fsdp", "zero2", "zero3")
                                                        for m in ("lora", "full"))
    first = [r["losses"][0] for r in configs]
    assert max(first) - min(first) <= 1e-3 * max(first)
    for row in configs:
        assert row["status"] == "ok" and row["finite"] and row["predicted"]["total"] > 0
        assert row["params_total"] > 0 and 0 < row["params_trainable"] <= row["params_total"]
        assert row["tokens_per_step"] == [2 * 64] * len(row["losses"])  # every row cut at max_length
    qlora = next(r for r in rows if r["kind"] == "qlora")
    assert qlora["method"] == "qlora" and qlora["optim"] == "paged_adamw_8bit" and qlora["finite"]


def test_kernels_resume_and_e2e(dry_run: tuple[Path, list[dict]]) -> None:
    out, rows = dry_run
    checks = [r for r in rows if r["kind"] == "kernel_check"]
    assert {r["kernel"] for r in checks} == {"rmsnorm", "swiglu", "rope", "fused_ce"}
    assert all(r["status"] == "ok" for r in checks)
    resume = [r for r in rows if r["kind"] == "resume"]
    assert resume and all(r["status"] == "ok" and r["max_rel_diff"] == 0.0 for r in resume)  # CPU: bitwise
    report = json.loads(next(out.glob("sft_vs_trl-*.json")).read_text())
    assert set(report["per_side_median"]) == {"ours", "ours_kernels", "trl"}
    assert report["checks"]["same_tokens_per_step"] and report["checks"]["same_lora_init"]
    summary = (out / "summary.md").read_text()
    for heading in ("## Environment", "## Kernels: correctness", "## Strategies on one GPU", "## Save and resume",
                    "## End to end"):
        assert heading in summary
