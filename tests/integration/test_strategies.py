"""DDP, FSDP2, ZeRO-2 and ZeRO-3 with real ranks (torchrun, gloo, CPU) on the tiny model.

What is checked, per strategy, against a single-process run with the same global batch (1 rank x grad_accum 4 ==
2 ranks x grad_accum 2, micro batch 2, same examples per step by construction of `launcher.train.trainer.micro_batches`):

* the loss curve, for LoRA and for full fine-tuning;
* a crash: rank 1 is SIGKILLed while the step-4 checkpoint is being written; the run dies, step 2 stays the usable
  checkpoint, and resuming on 2 ranks gives the uninterrupted curve;
* resuming that crashed run on 1 rank with `launch --resume DIR --procs 1` (re-planned: grad_accum 2 -> 4 keeps the
  global batch; DCP resharding for FSDP, DeepSpeed's universal checkpoint for ZeRO) gives the uninterrupted curve too,
  and so does FSDP the other way, 1 -> 2 ranks;
* `launch export` consolidates the sharded checkpoint into a model whose logits equal the reference model's.

Tolerance: losses agree to LOSS_ATOL. Measured on this machine (2 cores, torch 2.13 CPU, deepspeed 0.19.8): max
|difference| over 6 steps 0 to 3.1e-7 for every strategy, method, crash-resume and 2 -> 1 resume; exported logits
within 3e-7 (fp32; what differs is the summation order of all-reduce / reduce-scatter and the x world_size then
/ world_size round trip of the gradient scaling). 1e-4 (2e-5 relative at loss ~5) leaves ~300x room for other BLAS
builds and thread counts while still catching real errors: a wrong normalisation, a skipped or repeated micro batch,
or a lost optimizer state each move a step's loss by more than 1e-2 here.

Cost: runs are grouped, four jobs per sharded strategy (LoRA run; full run killed at step 4; its resume on 2 ranks;
its resume on 1 rank), two DDP jobs, one ZeRO-1 job, FSDP 1 -> 2 (two jobs), and two in-process reference runs. A cold
CI machine also compiles DeepSpeed's shm op once (~40 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARDED = ("fsdp", "zero2", "zero3")
LOSS_ATOL = 1e-4
LOGITS_ATOL = 1e-4
STEPS = 6
TIMINGS: dict[str, float] = {}

LORA = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
FULL = {"name": "full"}


@dataclass
class Work:
    root: Path
    model_dir: Path
    env: dict[str, str]
    reference: dict[str, Path] = field(default_factory=dict)
    """Single-process runs per method (`lora`, `full`)."""


@pytest.fixture(scope="module", autouse=True)
def report_timings(integration_timings: dict[str, str]) -> Iterator[None]:
    """Every job's wall time goes to the terminal summary (measured, not asserted)."""
    yield
    for label, seconds in TIMINGS.items():
        integration_timings[f"strategies: {label}"] = f"{seconds:.1f} s"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Work]:
    from tiny import rank_env, write_dataset

    root = tmp_path_factory.mktemp("strategies")
    write_dataset(root / "train.jsonl", "messages", n=64, seed=1)
    write_dataset(root / "eval.jsonl", "messages", n=10, seed=2)
    env = rank_env(root / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTLAUNCH_CACHE", env["FTLAUNCH_CACHE"])
        yield Work(root, tiny_model_dir, env)


def write_recipe(work: Work, name: str, strategy: str, method: dict[str, Any], grad_accum: int = 2,
                 every: int = 2) -> Path:
    recipe = {
        "name": name,
        "model": {"path": str(work.model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": [{"path": str(work.root / "train.jsonl")}], "eval": [{"path": str(work.root / "eval.jsonl")}],
                 "max_length": 64},
        "method": method,
        "optim": {"lr": 3e-3, "micro_batch": 2, "grad_accum": grad_accum, "max_steps": STEPS, "warmup_steps": 2,
                  "seed": 3},
        "eval": {"at_start": False},
        "checkpoint": {"every_steps": every, "keep_last": 5},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(work.root / "runs")},
        "strategy": {"name": strategy},
    }
    path = work.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def plan(recipe: Path, procs: int) -> Path:
    """`launch plan --out DIR`: the run directory with plan.json (and ds_config.json); `launch --resume DIR` then
    runs it."""
    run_dir = recipe.parent / "runs" / recipe.stem
    out = subprocess.run([sys.executable, "-m", "launcher", "plan", str(recipe), "--procs", str(procs), "--json",
                          "--gpus-per-node", "0", "--out", str(run_dir)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["run_dir"] == str(run_dir.resolve())
    return run_dir.resolve()


def timed(label: str, args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    TIMINGS[label] = time.perf_counter() - started
    return result


def launch(work: Work, label: str, *args: str) -> subprocess.CompletedProcess[str]:
    return timed(label, [sys.executable, "-m", "launcher", *args], work.env)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), train
    return [r["loss"] for r in train]


def assert_same_curve(got: list[float], want: list[float], what: str) -> None:
    assert len(got) <= len(want)
    diff = max(abs(a - b) for a, b in zip(got, want))
    print(f"{what}: {len(got)} steps, max |loss diff| vs single process = {diff:.2e}")
    assert diff <= LOSS_ATOL, (what, got, want)


def assert_whole_curve(run_dir: Path, want: list[float], what: str) -> None:
    """All STEPS steps were trained, on the single-process curve (a resumed run logs each step once)."""
    got = losses(run_dir)
    assert len(got) == STEPS
    assert_same_curve(got, want, what)


def kill_during_second_save(work: Work, label: str, run_dir: Path, ranks: int, kill_rank: int) -> int:
    """Run the planned `run_dir` on `ranks` ranks until rank `kill_rank` is SIGKILLed while writing its second
    checkpoint (step 4: tests/integration/kill_during_save.py); the run's exit code."""
    env = {**work.env, "KILL_AT_SAVE": "2", "KILL_RANK": str(kill_rank)}
    return timed(label, [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                         str(REPO / "tests" / "integration" / "kill_during_save.py"), str(run_dir)], env).returncode


# --------------------------------------------------------------------------------------------------- references
def reference(work: Work, method: str) -> Path:
    """The single-process run (DDP on 1 rank, grad_accum 4), in this process."""
    if method not in work.reference:
        from launcher.train.job import run_job

        run_dir = plan(write_recipe(work, f"ref-{method}", "ddp", LORA if method == "lora" else FULL, grad_accum=4),
                       procs=1)
        started = time.perf_counter()
        assert run_job(run_dir) == 0
        TIMINGS[f"reference {method} (1 process, in-process)"] = time.perf_counter() - started
        work.reference[method] = run_dir
    return work.reference[method]


# ------------------------------------------------------------------------------------------------ strategy runs
@dataclass
class Runs:
    lora: Path
    killed: Path
    killed_returncode: int
    after_kill: list[str]
    """checkpoints/ listing right after the crash."""
    latest_after_kill: str
    one_rank: Path
    resumed_output: str = ""
    one_rank_output: str = ""


_runs: dict[str, Runs] = {}


def strategy_runs(work: Work, strategy: str) -> Runs:
    if strategy in _runs:
        return _runs[strategy]
    lora = plan(write_recipe(work, f"{strategy}-lora", strategy, LORA, every=3), procs=2)
    result = launch(work, f"{strategy} lora, 2 ranks", str(work.root / f"{strategy}-lora.yaml"), "--resume", str(lora))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = plan(write_recipe(work, f"{strategy}-full", strategy, FULL), procs=2)
    crash_code = kill_during_second_save(work, f"{strategy} full, 2 ranks, killed at step 4", killed, ranks=2,
                                         kill_rank=1)
    ckpts = killed / "checkpoints"
    after = sorted(p.name for p in ckpts.iterdir())
    latest = (ckpts / "latest").read_text().strip()

    one_rank = killed.with_name(killed.name + "-one-rank")
    shutil.copytree(killed, one_rank)

    resumed = launch(work, f"{strategy} full, resume on 2 ranks", str(work.root / f"{strategy}-full.yaml"),
                     "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # What a user types: the run re-plans itself for 1 rank (grad_accum 2 -> 4 keeps the global batch).
    single = launch(work, f"{strategy} full, resume on 1 rank", "--resume", str(one_rank), "--procs", "1",
                    "--gpus-per-node", "0")
    assert single.returncode == 0, single.stderr[-3000:]
    _runs[strategy] = Runs(lora, killed, crash_code, after, latest, one_rank, resumed.stderr, single.stderr)
    return _runs[strategy]


# -------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", ["lora", "full"])
def test_ddp_two_ranks_equal_single_process(work: Work, method: str) -> None:
    recipe = write_recipe(work, f"ddp-{method}", "ddp", LORA if method == "lora" else FULL)
    run_dir = plan(recipe, procs=2)
    result = launch(work, f"ddp {method}, 2 ranks", str(recipe), "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(losses(run_dir), losses(reference(work, method)), f"ddp {method}")


def test_zero1_lora_equals_single_process(work: Work) -> None:
    """ZeRO-1 shares ZeRO-2's code path in DeepSpeed (stage_1_and_2.py): one run checks the curve."""
    recipe = write_recipe(work, "zero1-lora", "zero1", LORA, every=STEPS)
    run_dir = plan(recipe, procs=2)
    result = launch(work, "zero1 lora, 2 ranks", str(recipe), "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(losses(run_dir), losses(reference(work, "lora")), "zero1 lora")


@pytest.mark.parametrize("strategy", SHARDED)
def test_lora_equals_single_process(work: Work, strategy: str) -> None:
    runs = strategy_runs(work, strategy)
    assert_whole_curve(runs.lora, losses(reference(work, "lora")), f"{strategy} lora")


@pytest.mark.parametrize("strategy", SHARDED)
def test_kill_during_checkpoint_keeps_the_previous_one_and_resume_is_exact(work: Work, strategy: str) -> None:
    runs = strategy_runs(work, strategy)
    assert runs.killed_returncode != 0
    # The step-4 checkpoint never became visible; step 2 stayed the one `latest` names.
    assert runs.latest_after_kill == "step-00000002"
    assert "step-00000002" in runs.after_kill and "step-00000004" not in runs.after_kill
    assert ".step-00000004.tmp" in runs.after_kill
    assert_whole_curve(runs.killed, losses(reference(work, "full")), f"{strategy} full, killed and resumed on 2 ranks")
    names = sorted(p.name for p in (runs.killed / "checkpoints").iterdir())
    assert ".step-00000004.tmp" not in names and "step-00000006" in names  # the stale part was cleaned


@pytest.mark.parametrize("strategy", SHARDED)
def test_resume_on_one_rank_continues_the_curve(work: Work, strategy: str) -> None:
    runs = strategy_runs(work, strategy)
    assert_whole_curve(runs.one_rank, losses(reference(work, "full")), f"{strategy} full, resumed 2 -> 1 rank")
    log = (runs.one_rank / "logs" / "rank0.log").read_text()
    assert "resumed from step-00000002" in log
    assert "resume: 2 -> 1 ranks; grad_accum 2 -> 4 keeps the global batch 8" in " ".join(runs.one_rank_output.split())
    now, before = (json.loads(p.read_text()) for p in (runs.one_rank / "plan.json",
                                                           runs.one_rank / "plan-history" / "001.json"))
    assert (now["world_size"], now["recipe"]["optim"]["grad_accum"], now["run_dir"]) == (1, 4, str(runs.one_rank))
    assert (before["world_size"], before["recipe"]["optim"]["grad_accum"]) == (2, 2)


def test_fsdp_resume_on_two_ranks_from_one(work: Work) -> None:
    """The other direction through DCP: a 1-rank FSDP run dies writing its step-4 checkpoint; `launch --resume DIR
    --procs 2` reshards step 2 onto 2 ranks (grad_accum 4 -> 2) and continues the single-process curve."""
    run_dir = plan(write_recipe(work, "fsdp-full-1", "fsdp", FULL, grad_accum=4), procs=1)
    crash_code = kill_during_second_save(work, "fsdp full, 1 rank, killed at step 4", run_dir, ranks=1, kill_rank=0)
    assert crash_code != 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    resumed = launch(work, "fsdp full, resume 1 -> 2 ranks", "--resume", str(run_dir), "--procs", "2",
                     "--gpus-per-node", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: 1 -> 2 ranks; grad_accum 4 -> 2" in " ".join(resumed.stderr.split())
    assert_whole_curve(run_dir, losses(reference(work, "full")), "fsdp full, resumed 1 -> 2 ranks")


@pytest.mark.parametrize("strategy", SHARDED)
def test_export_of_sharded_checkpoint_has_the_trained_logits(work: Work, strategy: str) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from launcher.cli.main import main

    runs = strategy_runs(work, strategy)
    out = runs.killed / "exported"
    started = time.perf_counter()
    assert main(["export", str(runs.killed), "--out", str(out)]) == 0
    TIMINGS[f"{strategy} export (in-process)"] = time.perf_counter() - started
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        trained = AutoModelForCausalLM.from_pretrained(reference(work, "full") / "model").eval()(input_ids=ids).logits
        at_end = AutoModelForCausalLM.from_pretrained(runs.killed / "model").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(work.model_dir).eval()(input_ids=ids).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(runs.lora / "adapter").eval()(input_ids=ids).logits
        ref_adapter = AutoPeftModelForCausalLM.from_pretrained(
            reference(work, "lora") / "adapter").eval()(input_ids=ids).logits
    print(f"{strategy}: max |logit diff| full {float((exported - trained).abs().max()):.2e}, "
          f"lora {float((adapter - ref_adapter).abs().max()):.2e}")
    assert torch.allclose(exported, trained, atol=LOGITS_ATOL)
    assert torch.equal(exported, at_end)  # the job's own outputs come from the same consolidation
    assert torch.allclose(adapter, ref_adapter, atol=LOGITS_ATOL)
    assert not torch.allclose(exported, base, atol=1e-2)  # training changed the model
