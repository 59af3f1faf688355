"""Save at step N and resume on the device, through the real `python -m launcher.train.job` (fsdp: DCP; zero3: DeepSpeed).

    python bench/gpu/resume_check.py SPEC.json RESULTS.jsonl

SPEC.json: {"device", "workdir", "runs": [{"name", "recipe", "steps", "save_at"}]}. For each run:
  1. plan it (as `launch` does) and run `python -m launcher.train.job RUN_DIR` for `steps` steps with a checkpoint every
     `save_at` steps: the uninterrupted curve;
  2. cut the run back to its step-`save_at` checkpoint (later checkpoint removed, `latest` pointing back), as a
     preempted job leaves it, and run the same job again: it resumes from step `save_at`;
  3. compare the losses of steps save_at+1..steps. Tolerance: one bf16 rounding of the loss (2^-8 relative) per
     step. What a broken resume changes (the optimizer moments, the LR schedule position, the data position, the
     adapter weights) moves the loss by far more than that; what it cannot remove (non-deterministic reductions in
     the attention backward on the GPU) moves it far less. On the CPU (gloo, float32) the curves are bitwise equal
     (tests/train/test_train.py), so the same bound is loose there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from common import ROOT, append, plan_run

TOLERANCE = 2.0 ** -8


def _train_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _train_rows(run_dir)}


def _job(run_dir: Path, log: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the job is a single process: launcher.train.job works that out itself
    started = time.perf_counter()
    with log.open("a") as handle:
        rc = subprocess.run([sys.executable, "-m", "launcher.train.job", str(run_dir)], cwd=ROOT, env=env,
                            stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    return rc, time.perf_counter() - started


def check(run: dict[str, Any], device: str, workdir: Path) -> dict[str, Any]:
    plan = plan_run(run["recipe"], run["name"], workdir, device, None)
    run_dir = Path(plan.run_dir)
    log = workdir / f"{run['name']}.log"
    rc, first_s = _job(run_dir, log)
    if rc != 0:
        raise RuntimeError(f"uninterrupted run exited {rc}; log tail:\n{log.read_text()[-2500:]}")
    full = _losses(run_dir)
    # The MFU the trainer's progress line printed (launcher/train/throughput.py): on a GPU with a known peak only.
    reported_mfu = [r["mfu"] for r in _train_rows(run_dir) if "mfu" in r]
    save_at = int(run["save_at"])
    checkpoints = run_dir / "checkpoints"
    kept = f"step-{save_at:08d}"
    if not (checkpoints / kept).is_dir():
        raise RuntimeError(f"no checkpoint {kept} in {checkpoints}: {sorted(p.name for p in checkpoints.iterdir())}")
    for path in checkpoints.glob("step-*"):
        if path.name > kept:
            shutil.rmtree(path)
    (checkpoints / "latest").write_text(kept + "\n")
    rc, resumed_s = _job(run_dir, log)
    if rc != 0:
        raise RuntimeError(f"resumed run exited {rc}; log tail:\n{log.read_text()[-2500:]}")
    resumed = _losses(run_dir)
    steps = [s for s in sorted(full) if s > save_at]
    diffs = [abs(resumed[s] - full[s]) / max(1e-12, abs(full[s])) for s in steps if s in resumed]
    ok = len(diffs) == len(steps) and len(steps) > 0 and max(diffs) <= TOLERANCE
    return {"strategy": plan.strategy, "method": plan.recipe["method"]["name"], "save_at": save_at,
            "steps": max(full), "losses_uninterrupted": [full[s] for s in sorted(full)],
            "losses_resumed": [resumed.get(s) for s in sorted(full)], "max_rel_diff": max(diffs) if diffs else None,
            "tolerance": TOLERANCE,
            "trainer_mfu_last": reported_mfu[-1] if reported_mfu else None, "first_run_s": round(first_s, 1), "resumed_run_s": round(resumed_s, 1),
            "status": "ok" if ok else "failed: resumed losses differ beyond the tolerance"}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    results = Path(argv[1])
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FTLAUNCH_CACHE", str(workdir / "cache"))
    failures = 0
    for run in spec["runs"]:
        started = time.perf_counter()
        row: dict[str, Any] = {"kind": "resume", "name": run["name"], "device": spec["device"]}
        try:
            row.update(check(run, spec["device"], workdir))
        except Exception as err:  # noqa: BLE001 - record it and check the next strategy
            row["status"] = f"failed: {type(err).__name__}: {err}"[:3000]
            row["traceback"] = traceback.format_exc()[-2000:]
        failures += row["status"] != "ok"
        row["seconds"] = round(time.perf_counter() - started, 1)
        append(results, row)
        print(json.dumps({k: row.get(k) for k in ("name", "status", "max_rel_diff", "seconds")}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
