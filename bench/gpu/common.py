"""Shared by the GPU check scripts: the import path, planning a run like `launch` does, appending result rows.

Each script runs as `python bench/gpu/NAME.py`, which puts bench/gpu/ first on sys.path (so `import common` works);
the repository root (and kernels/, where the package `ftkernels` lives) go right after it.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for source in (ROOT / "kernels", ROOT):
    if str(source) not in sys.path:
        sys.path.insert(1, str(source))


def free_port() -> int:
    """A TCP port nothing listens on right now (for a one-rank process group's store)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plan_run(recipe: dict[str, Any], name: str, workdir: Path, device: str, gpu_mem: int | None) -> Any:
    """Write `recipe` as WORKDIR/NAME.yaml, plan it on one rank of `device` as `launch` would, claim a run directory
    under WORKDIR/runs and write its plan.json. Returns the Plan."""
    import yaml

    from launcher.plan.build import Resources, make_plan
    from launcher.config.recipe import load_recipe
    from launcher.common.rundir import claim_run_dir, write_json_atomic

    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **recipe}))
    loaded = load_recipe(path, [])
    resources = Resources(gpus_per_node=1 if device == "cuda" else 0, procs_per_node=1, gpu_mem_bytes=gpu_mem)
    run_dir = claim_run_dir(workdir / "runs", name)
    plan = make_plan(loaded, resources, run_dir)
    write_json_atomic(run_dir / "plan.json", plan.to_json())
    return plan


def append(results: Path, row: dict[str, Any]) -> None:
    """One JSON line; rows of several processes interleave whole (each is one short write)."""
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
