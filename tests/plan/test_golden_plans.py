"""Golden plan.json (and ds_config.json where DeepSpeed runs) of every shipped recipe, on the resources each recipe
says it is planned for, plus each strategy of the 70B full recipe: a change to planning, defaults, strategy configs
or the memory planner shows up as a diff to review, not as a silent change in what jobs run.

Volatile parts are normalised: the repository path, the Python interpreter, the run directory. Refresh after an
intended change: `FTLAUNCH_UPDATE_GOLDEN=1 pytest tests/plan/test_golden_plans.py`, then read the diff.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.plan.build import Resources, make_plan
from launcher.cli.args import parse_size
from launcher.config.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "plans"
H100 = parse_size("80GiB")

CASES: dict[str, tuple[str, list[str], Resources]] = {
    "demo": ("recipes/demo.yaml", [], Resources()),
    "demo-2ranks-fsdp": ("recipes/demo.yaml", ["strategy.name=fsdp"], Resources(procs_per_node=2)),
    "demo-classify": ("recipes/demo-classify.yaml", [], Resources()),
    "llama3-70b-qlora": ("recipes/llama3-70b-qlora.yaml", [],
                         Resources(nodes=1, gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=H100)),
    # The case: on 2 x 48 GiB only sharded strategies fit, and fsdp cannot step paged_adamw_8bit: zero3.
    "llama3-70b-qlora-2x48gib": ("recipes/llama3-70b-qlora.yaml", ["optim.grad_accum=8"],
                                 Resources(nodes=1, gpus_per_node=2, procs_per_node=2, gpu_mem_bytes=48 * 2**30)),
    "llama3-405b-qlora": ("recipes/llama3-405b-qlora.yaml", [],
                          Resources(nodes=1, gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=H100)),
    "llama3-70b-full": ("recipes/llama3-70b-full.yaml", [],
                        Resources(nodes=4, gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=H100)),
    **{f"llama3-70b-full-{s}": ("recipes/llama3-70b-full.yaml", [f"strategy.name={s}"],
                                Resources(nodes=4, gpus_per_node=8, procs_per_node=8, gpu_mem_bytes=H100))
       for s in ("fsdp", "zero2", "zero3")},
}


def normalise(value: Any, run_dir: str) -> Any:
    """Replace what differs between machines and runs with placeholders."""
    if isinstance(value, dict):
        return {k: normalise(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run_dir>").replace(sys.executable, "<python>").replace(str(ROOT), "<repo>")
    return value


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_matches_golden(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))  # no converted GGUF: the demo is sized the same
    recipe_file, overrides, resources = CASES[name]
    loaded = load_recipe(ROOT / recipe_file, overrides)
    run_dir = tmp_path / "runs" / name
    plan = normalise(make_plan(loaded, resources, run_dir).to_json(), str(run_dir.resolve()))
    files = {GOLDEN / f"{name}.plan.json": plan}
    if plan["strategy"].startswith("zero"):
        files[GOLDEN / f"{name}.ds_config.json"] = plan["strategy_config"]
    for path, data in files.items():
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        if os.environ.get("FTLAUNCH_UPDATE_GOLDEN"):
            path.write_text(text)
        assert path.is_file(), f"no golden {path.name}; create it: FTLAUNCH_UPDATE_GOLDEN=1 pytest {__file__}"
        assert text == path.read_text(), (f"{path.name} changed; if intended: FTLAUNCH_UPDATE_GOLDEN=1 pytest "
                                          "tests/plan/test_golden_plans.py and review the diff")


def test_golden_files_are_all_used() -> None:
    """A renamed or dropped case must not leave a stale golden behind."""
    expected = {f"{n}.plan.json" for n in CASES} | {p.name for p in GOLDEN.glob("*.ds_config.json")}
    assert {p.name for p in GOLDEN.iterdir()} == expected
    for ds in GOLDEN.glob("*.ds_config.json"):
        assert (GOLDEN / ds.name.replace(".ds_config.json", ".plan.json")).is_file()
