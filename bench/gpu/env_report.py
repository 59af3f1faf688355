"""The machine a GPU run measured: GPU, memory, driver, torch / CUDA / NCCL / Triton and package versions, the
commit; plus a one-rank NCCL all-reduce (the collective every strategy's step uses).

    python bench/gpu/env_report.py RESULTS.jsonl [--cpu-dry-run]
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import ROOT, append, free_port

PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "datasets", "trl", "deepspeed", "bitsandbytes",
            "liger-kernel", "pydantic", "submitit", "safetensors", "tokenizers", "numpy")


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"


def commit() -> str:
    """HEAD plus `-dirty` when tracked files differ from it (a run carries the working tree, not a commit)."""
    if os.environ.get("FTLAUNCH_COMMIT"):  # a copied working tree without .git (the lent GPU machine)
        return os.environ["FTLAUNCH_COMMIT"]
    sha = _run("git", "rev-parse", "--short=12", "HEAD")
    dirty = _run("git", "status", "--porcelain", "--untracked-files=no")
    return (sha or "unknown") + ("-dirty" if dirty and not dirty.startswith("unavailable") else "")


def report(dry: bool) -> dict[str, Any]:
    import torch

    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    row: dict[str, Any] = {
        "kind": "env", "status": "ok", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch_cuda": torch.version.cuda, "versions": versions, "cuda_available": torch.cuda.is_available(),
    }
    if dry or not torch.cuda.is_available():
        row.update({"device": "cpu", "nccl_all_reduce": "skipped: needs CUDA"})
        return row
    props = torch.cuda.get_device_properties(0)
    row.update({
        "device": "cuda", "gpu": torch.cuda.get_device_name(0), "gpu_memory_bytes": props.total_memory,
        "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "nvidia_smi": _run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                           "--format=csv,noheader"),
    })
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    value = torch.ones(1024, device="cuda")
    dist.all_reduce(value)
    torch.cuda.synchronize()
    row["nccl_all_reduce"] = "ok" if float(value.sum()) == 1024.0 else f"wrong sum {float(value.sum())}"
    dist.destroy_process_group()
    return row


def main(argv: list[str]) -> int:
    row = report("--cpu-dry-run" in argv)
    append(Path(argv[0]), row)
    print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
