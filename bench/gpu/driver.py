"""The GPU check, step by step, each in its own processes and time box; what each measured goes to RESULTS.

    python bench/gpu/driver.py OUT_DIR [--cpu-dry-run] [--budget SECONDS] [--only STEP ...] [--work DIR]

Writes OUT_DIR/results.jsonl (one JSON object per line: a `step` row per step with its status, seconds and the
error of a failed step, and the rows each step's scripts append), OUT_DIR/log.txt (everything the steps printed),
OUT_DIR/summary.md (bench/gpu/report.py) and the GPU version of bench/sft_vs_trl.py's JSON.

A step that fails or runs out of its time is recorded and the next step still runs. Steps run in order of what the
project most needs to know; each has a budget (seconds on one H100) and none runs past the whole run's budget.
`--cpu-dry-run` runs the same steps on the CPU with a tiny model (CUDA-only parts reported as skipped), so the
suite keeps this script working between GPU runs (tests/test_gpu_dry_run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common import ROOT, append

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shapes:
    """What one mode trains: the GPU run's real sizes, or the dry run's tiny ones."""

    device: str
    model: str
    dtype: str
    max_length: int
    micro_batch: int
    steps: int
    skip: int
    data_rows: int
    words_per_row: int
    """About one token per word with the tiny BPE: rows longer than max_length are cut to exactly max_length."""
    qlora_model: str
    qlora_max_length: int
    resume_steps: int


GPU = Shapes(device="cuda", model="1b", dtype="bfloat16", max_length=2048, micro_batch=4, steps=20, skip=2,
             data_rows=160, words_per_row=2300, qlora_model="8b", qlora_max_length=1024, resume_steps=20)
DRY = Shapes(device="cpu", model="tiny", dtype="bfloat16", max_length=64, micro_batch=2, steps=4, skip=1,
             data_rows=32, words_per_row=80, qlora_model="tiny", qlora_max_length=64, resume_steps=4)


class Run:
    """The state of one driver run: where things go, how much time is left, how to start a step's process."""

    def __init__(self, out: Path, work: Path, shapes: Shapes, budget: float, dry: bool) -> None:
        self.out, self.work, self.shapes, self.dry = out, work, shapes, dry
        self.resume_strategies: tuple[str, ...] = ("fsdp", "zero3")
        self.results = out / "results.jsonl"
        self.log = out / "log.txt"
        self.deadline = time.monotonic() + budget
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "FTLAUNCH_CACHE": str(work / "cache"),
                    "HF_DATASETS_CACHE": str(work / "hf-datasets"), "PYTHONWARNINGS": "ignore"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def python(self, script: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> None:
        """Run `python bench/gpu/SCRIPT ARGS` (or a path under ROOT), output to log.txt; raise when it fails or
        outlives `timeout` (its whole process group is killed then)."""
        path = HERE / script if (HERE / script).is_file() else ROOT / script
        with self.log.open("a") as log:
            log.write(f"\n===== {path.relative_to(ROOT)} {' '.join(args)}\n")
            log.flush()
            child = subprocess.Popen([sys.executable, str(path), *args], cwd=ROOT, env=env or self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = child.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise TimeoutError(f"{path.name} ran out of its {timeout:.0f} s") from None
        if rc != 0:
            raise RuntimeError(f"{path.name} exited {rc}")

    def spec(self, name: str, data: dict[str, Any]) -> Path:
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(data, indent=1))
        return path

    # ------------------------------------------------------------------------------------------------ recipes
    @property
    def model_dir(self) -> Path:
        return self.work / "models" / f"llama-{self.shapes.model}-{self.shapes.dtype}"

    def recipe(self, method: dict[str, Any], strategy: str, *, data: Path, fmt: str = "text",
               max_length: int | None = None, micro_batch: int | None = None, steps: int | None = None,
               model: Path | None = None, **sections: Any) -> dict[str, Any]:
        s = self.shapes
        full = method["name"] in ("full", "freeze")
        recipe: dict[str, Any] = {
            "model": {"path": str(model or self.model_dir), "dtype": s.dtype, "attn_implementation": "sdpa"},
            "data": {"train": [{"path": str(data), "format": fmt}], "max_length": max_length or s.max_length,
                     "truncation": "truncate"},
            "method": method,
            "optim": {"lr": 1e-5 if full else 2e-4, "micro_batch": micro_batch or s.micro_batch,
                      "max_steps": steps or s.steps, "warmup_steps": 2, "schedule": "constant", "seed": 0},
            "strategy": {"name": strategy},
            "eval": {"at_start": False},
            "logging": {"progress": False, "tensorboard": False},
            "output": {"root": str(self.work / "runs")},
        }
        for key, value in sections.items():
            recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
        return recipe


LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


# ----------------------------------------------------------------------------------------------------------- steps
def step_env(run: Run, timeout: float) -> None:
    run.python("env_report.py", str(run.results), *(["--cpu-dry-run"] if run.dry else []), timeout=timeout)


def step_assets(run: Run, timeout: float) -> None:
    s = run.shapes
    started = time.monotonic()
    run.python("assets.py", "model", str(run.model_dir), s.model, s.dtype, s.device, timeout=timeout)
    run.python("assets.py", "text", str(run.work / "data" / "text.jsonl"), str(s.data_rows), str(s.words_per_row),
               timeout=timeout - (time.monotonic() - started))
    run.python("assets.py", "chat", str(run.work / "data" / "chat.jsonl"), str(s.data_rows), str(s.words_per_row),
               timeout=timeout - (time.monotonic() - started))


def step_kernels(run: Run, timeout: float) -> None:
    env = {**run.env, "TRITON_INTERPRET": "1"} if run.dry else run.env
    run.python("kernel_check.py", str(run.results), *(["--cpu-dry-run"] if run.dry else []), timeout=timeout, env=env)


def _strategies(run: Run, timeout: float, method: dict[str, Any], tag: str) -> None:
    data = run.work / "data" / "text.jsonl"
    configs = [{"name": f"{strategy}-{tag}", "steps": run.shapes.steps, "skip": run.shapes.skip,
                "recipe": run.recipe(method, strategy, data=data)} for strategy in STRATEGIES]
    spec = run.spec(f"strategies-{tag}", {"device": run.shapes.device, "workdir": str(run.work), "kind": "strategy",
                                          "configs": configs})
    run.python("train_probe.py", str(spec), str(run.results), timeout=timeout)


def step_strategies_lora(run: Run, timeout: float) -> None:
    _strategies(run, timeout, LORA, "lora")


def step_strategies_full(run: Run, timeout: float) -> None:
    _strategies(run, timeout, {"name": "full"}, "full")


def step_qlora(run: Run, timeout: float) -> None:
    s = run.shapes
    started = time.monotonic()
    model = run.work / "models" / f"llama-{s.qlora_model}-{s.dtype}"
    run.python("assets.py", "model", str(model), s.qlora_model, s.dtype, s.device, timeout=timeout)
    method = {"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "bits": 4, "quant_type": "nf4",
              "double_quant": True, "compute_dtype": "bfloat16"}
    recipe = run.recipe(method, "ddp", data=run.work / "data" / "text.jsonl", model=model,
                        max_length=s.qlora_max_length, steps=max(s.skip + 2, s.steps // 2),
                        optim={"name": "paged_adamw_8bit"})
    recipe["model"]["gradient_checkpointing"] = True
    # The same under FSDP2 (packed codes stored as bf16 and sharded; issue 16): bitsandbytes' optimizers cannot step
    # DTensor shards, so plain AdamW. One GPU here: the sharding path and the planner's fsdp row, not the speed-up.
    sharded = json.loads(json.dumps(recipe))
    sharded["strategy"] = {"name": "fsdp"}
    sharded["optim"]["name"] = "adamw"
    configs = [{"name": f"qlora-{s.qlora_model}", "steps": recipe["optim"]["max_steps"], "skip": s.skip,
                "recipe": recipe},
               {"name": f"qlora-{s.qlora_model}-fsdp", "steps": recipe["optim"]["max_steps"], "skip": s.skip,
                "recipe": sharded}]
    spec = run.spec("qlora", {"device": s.device, "workdir": str(run.work), "kind": "qlora", "configs": configs})
    run.python("train_probe.py", str(spec), str(run.results), timeout=timeout - (time.monotonic() - started))


def step_resume(run: Run, timeout: float) -> None:
    s = run.shapes
    data = run.work / "data" / "text.jsonl"
    save_at = s.resume_steps // 2
    runs = [{"name": f"resume-{strategy}", "save_at": save_at,
             "recipe": run.recipe(LORA, strategy, data=data, max_length=s.max_length // 2, micro_batch=2,
                                  steps=s.resume_steps, checkpoint={"every_steps": save_at, "keep_last": 2})}
            for strategy in (("fsdp",) if run.dry else run.resume_strategies)]  # dry: the same code, one strategy
    spec = run.spec("resume", {"device": s.device, "workdir": str(run.work), "runs": runs})
    run.python("resume_check.py", str(spec), str(run.results), timeout=timeout)


def step_e2e(run: Run, timeout: float) -> None:
    """bench/sft_vs_trl.py on the device: ours, ours with `kernels: all`, TRL's SFTTrainer; same model/data/batches."""
    s = run.shapes
    recipe = run.recipe(LORA, "ddp", data=run.work / "data" / "chat.jsonl", fmt="messages")
    recipe["data"]["chat_template"] = "chatml"
    recipe["data"]["loss_on"] = "assistant"
    if run.dry:
        # TRL's bf16=True on a CPU is Trainer's CPU autocast: 16 s a step for the tiny model in CI (110 s of the dry
        # run), ours 0.05 s. The dry run checks the wiring, not speed: fp32 on both sides.
        recipe["model"]["dtype"] = "float32"
    path = run.work / "e2e.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"name": "e2e", **recipe}))
    run.python("bench/sft_vs_trl.py", "--recipe", str(path), "--steps", str(s.steps), "--skip", str(s.skip),
               "--device", s.device, "--with-kernels", "--tag", "gpu" if not run.dry else "cpu-dry-run",
               "--out", str(run.out), timeout=timeout)


@dataclass(frozen=True)
class Step:
    name: str
    budget: float
    """Seconds on one H100; the run's whole budget caps it too."""
    run: Callable[[Run, float], None]
    needs: tuple[str, ...] = ()
    """Steps whose failure makes this one pointless (it is then recorded as skipped)."""


STEPS = (
    Step("env", 40, step_env),
    Step("assets", 60, step_assets),
    Step("kernels", 70, step_kernels),
    Step("strategies_lora", 80, step_strategies_lora, ("assets",)),
    Step("qlora", 150, step_qlora, ("assets",)),
    Step("e2e", 100, step_e2e, ("assets",)),
    Step("strategies_full", 90, step_strategies_full, ("assets",)),
    Step("resume", 200, step_resume, ("assets",)),  # 4 job runs of ~40 s on an H200 (run 3 of 20261126)
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for all steps (default 520)")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--resume-strategies", nargs="+", default=["fsdp", "zero3"], choices=["fsdp", "zero3"],
                        help="strategies the resume step checks (default both)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="ftlaunch-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args.out.resolve(), work.resolve(), DRY if args.cpu_dry_run else GPU, args.budget, args.cpu_dry_run)
    run.resume_strategies = tuple(dict.fromkeys(args.resume_strategies))
    failed: set[str] = set()
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        row: dict[str, Any] = {"kind": "step", "step": step.name, "budget_s": step.budget}
        # Budgets are seconds on one GPU; a dry run's steps share the run's budget (CPU speed varies too much).
        timeout = run.left() if run.dry else min(step.budget, run.left())
        started = time.monotonic()
        if any(need in failed for need in step.needs):
            row["status"] = f"skipped: needs {', '.join(n for n in step.needs if n in failed)}"
        elif timeout < 5:
            row["status"] = "skipped: the run's budget is spent"
        else:
            try:
                step.run(run, timeout)
                row["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - record the step's failure and go on with the next step
                row["status"] = f"failed: {type(err).__name__}: {err}"
                row["log_tail"] = run.log.read_text()[-3000:] if run.log.is_file() else ""
        if row["status"] != "ok":
            failed.add(step.name)
        row["seconds"] = round(time.monotonic() - started, 1)
        append(run.results, row)
        print(f"[{step.name}] {row['status']} ({row['seconds']} s)", flush=True)
    try:
        run.python("report.py", str(run.results), str(run.out / "summary.md"), timeout=60)
    except Exception as err:  # noqa: BLE001 - the raw results are what matters; the summary can be rebuilt
        print(f"summary not written: {err}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
