"""QLoRA with the 4-bit base sharded across ranks: FSDP2 and ZeRO-3 on real gloo ranks, bitsandbytes 4-bit on CPU.

What is checked, against one process training the same recipe under DDP (1 rank x grad_accum 4 == 2 ranks x
grad_accum 2, micro batch 2, as in tests/integration/test_strategies.py):

* FSDP, 2 ranks: rank 0 alone quantizes; rank 1 builds on meta and takes rank 0's 4-bit layers
  (launcher/train/quant_layout.py). Each rank holds half of the weight bytes, and the loss curve is the single
  process's;
* the checkpoint holds the adapter and its optimizer state, not the frozen base;
* a crash while writing the step-4 checkpoint, then resuming on 1 rank (2 -> 1); that 1-rank run cut back to its own
  step-4 checkpoint (as if preempted right after it) and resumed on 2 ranks (1 -> 2): both curves are the
  uninterrupted one (a resume on the same world size is the 1 -> 2 case's last step; test_strategies.py covers it
  for FSDP without quantization);
* the adapter exported from the sharded checkpoint equals the single process's adapter;
* ZeRO-3, 2 ranks: the same curve, each rank holding half of the weights.

Tolerance: LOSS_ATOL as in test_strategies.py (1e-4). Measured here (2 cores, torch 2.13 CPU, bitsandbytes 0.50.2):
max |loss difference| 1.6e-7 for FSDP (2 ranks, 2 -> 1, 1 -> 2), 4.4e-7 for ZeRO-3; adapters within 8.1e-7. The base is frozen and dequantized identically on
every rank (same packed codes, same quantization state), so what differs is only the reduction order of the adapter
gradients, as for LoRA; a rank with a wrongly rebuilt layer (other codes, scales or code book) moves the step-1 loss
by more than 1e-1, a lost optimizer state or data position a later step's by more than 1e-3.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOSS_ATOL = 1e-4
STEPS = 6
QLORA = {"name": "qlora", "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
         "r": 8, "alpha": 16, "dropout": 0.0}


@dataclass
class Work:
    root: Path
    model_dir: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Work]:
    from tiny import rank_env, write_dataset

    root = tmp_path_factory.mktemp("qlora-sharded")
    write_dataset(root / "train.jsonl", "messages", n=64, seed=1)
    env = rank_env(root / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTLAUNCH_CACHE", env["FTLAUNCH_CACHE"])
        yield Work(root, tiny_model_dir, env)


def planned(work: Work, name: str, strategy: str, procs: int, grad_accum: int) -> Path:
    """A run directory planned by `launch plan --out` for `procs` ranks (checkpoints every 2 steps)."""
    recipe = {
        "name": name,
        "model": {"path": str(work.model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": [{"path": str(work.root / "train.jsonl")}], "max_length": 64},
        "method": QLORA,
        "optim": {"name": "adamw", "lr": 3e-3, "micro_batch": 2, "grad_accum": grad_accum, "max_steps": STEPS,
                  "warmup_steps": 2, "seed": 3},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(work.root / "runs")},
        "strategy": {"name": strategy},
    }
    path = work.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = work.root / "runs" / name
    out = subprocess.run([sys.executable, "-m", "launcher", "plan", str(path), "--procs", str(procs), "--json",
                          "--gpus-per-node", "0", "--out", str(run_dir)], capture_output=True, text=True, cwd=REPO,
                         env=work.env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["runnable"], plan["unsupported"]
    return run_dir.resolve()


def launch(work: Work, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "launcher", *args], env=work.env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def killed_at_second_save(work: Work, run_dir: Path, ranks: int, kill_rank: int) -> None:
    """Run `run_dir` until rank `kill_rank` dies writing the step-4 checkpoint (tests/integration/kill_during_save.py);
    step 2 stays the checkpoint `latest` names."""
    env = {**work.env, "KILL_AT_SAVE": "2", "KILL_RANK": str(kill_rank)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                             str(REPO / "tests" / "integration" / "kill_during_save.py"), str(run_dir)], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"


def cut_back(run_dir: Path, step: int) -> None:
    """Make a finished run look preempted right after its step-`step` checkpoint: later checkpoints gone, `latest`
    naming it, no outcome or outputs yet (`launch --resume` refuses a completed run)."""
    kept = f"step-{step:08d}"
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / kept).is_dir()
    for path in checkpoints.glob("step-*"):
        if path.name > kept:
            shutil.rmtree(path)
    (checkpoints / "latest").write_text(kept + "\n")
    (run_dir / "outcome.json").unlink()
    for output in ("adapter", "model", "merged"):
        shutil.rmtree(run_dir / output, ignore_errors=True)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), train
    return [r["loss"] for r in train]


def assert_curve(run_dir: Path, want: list[float], what: str) -> None:
    got = losses(run_dir)
    assert len(got) == STEPS == len(want)
    diff = max(abs(a - b) for a, b in zip(got, want))
    print(f"{what}: max |loss diff| vs single process = {diff:.2e}")
    assert diff <= LOSS_ATOL, (what, got, want)


def held_fraction(run_dir: Path, rank: int) -> float:
    """The share of the model's weight bytes rank `rank` logged holding."""
    log = (run_dir / "logs" / f"rank{rank}.log").read_text()
    match = re.search(rf"weights held by rank {rank}: [\d.]+ of [\d.]+ MiB \(([\d.]+)%\)", log)
    assert match, log[-2000:]
    return float(match.group(1)) / 100


@dataclass
class Runs:
    reference: Path
    fsdp_to_one: Path
    """2 ranks, killed writing step 4, resumed on 1 rank."""
    fsdp_from_one: Path
    """`fsdp_to_one` cut back to its step-4 checkpoint (written by 1 rank) and resumed on 2 ranks."""
    zero3: Path


_runs: list[Runs] = []


@pytest.fixture(scope="module")
def runs(work: Work) -> Runs:
    if _runs:
        return _runs[0]
    from launcher.train.job import run_job

    reference = planned(work, "reference", "ddp", procs=1, grad_accum=4)
    assert run_job(reference) == 0

    to_one = planned(work, "fsdp-to-one", "fsdp", procs=2, grad_accum=2)
    killed_at_second_save(work, to_one, ranks=2, kill_rank=1)
    launch(work, "--resume", str(to_one), "--procs", "1", "--gpus-per-node", "0")

    from_one = to_one.with_name("fsdp-from-one")
    shutil.copytree(to_one, from_one)
    cut_back(from_one, step=4)
    launch(work, "--resume", str(from_one), "--procs", "2", "--gpus-per-node", "0")

    zero3 = planned(work, "zero3", "zero3", procs=2, grad_accum=2)
    launch(work, "--resume", str(zero3))
    _runs.append(Runs(reference, to_one, from_one, zero3))
    return _runs[0]


def test_two_ranks_shard_the_4bit_base(runs: Runs) -> None:
    for rank in (0, 1):
        assert held_fraction(runs.fsdp_from_one, rank) == pytest.approx(0.5, abs=0.02)
        assert held_fraction(runs.zero3, rank) == pytest.approx(0.5, abs=0.02)


def test_fsdp_resume_on_another_world_size_continues_the_curve(runs: Runs) -> None:
    want = losses(runs.reference)
    assert_curve(runs.fsdp_to_one, want, "fsdp qlora, resumed 2 -> 1 rank")
    assert_curve(runs.fsdp_from_one, want, "fsdp qlora, resumed 1 -> 2 ranks")
    assert "resumed from step-00000002" in (runs.fsdp_to_one / "logs" / "rank0.log").read_text()
    assert "resumed from step-00000004" in (runs.fsdp_from_one / "logs" / "rank0.log").read_text()


def test_zero3_two_ranks_follow_the_single_process_curve(runs: Runs) -> None:
    assert_curve(runs.zero3, losses(runs.reference), "zero3 qlora, 2 ranks")


def test_sharded_checkpoint_holds_the_adapter_not_the_base(runs: Runs) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(runs.fsdp_from_one / "checkpoints" / "step-00000006" / "dcp")).read_metadata()
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys
    optimizer_keys = [k for k in metadata.state_dict_metadata if k.startswith("optimizer.state.")]
    assert optimizer_keys and all("lora_" in k for k in optimizer_keys)


def test_adapter_exported_from_the_sharded_checkpoint_equals_the_single_process_one(runs: Runs) -> None:
    from safetensors.torch import load_file

    want = load_file(runs.reference / "adapter" / "adapter_model.safetensors")
    for run_dir in (runs.fsdp_to_one, runs.fsdp_from_one, runs.zero3):
        got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert set(got) == set(want)
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        print(f"{run_dir.name}: adapter max |diff| vs single process {worst:.2e}")
        assert worst <= 1e-4, run_dir.name
    config: dict[str, Any] = json.loads((runs.fsdp_from_one / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
