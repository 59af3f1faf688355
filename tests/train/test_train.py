"""Local training on the tiny model: every data format and method learns, resume is exact, Ctrl-C is safe,
outputs load with from_pretrained.

Runs happen in this process through `launcher.train.job.run_job` (one import of torch for all of them); one test goes
through the real `launch` command in a child process to check signals.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import LocalExecutor
from cluster.runs import run_status
from launcher.plan.resources import Resources
from launcher.config.recipe import load_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def rows_for(fmt: str, n: int) -> list[dict[str, Any]]:
    """A learnable toy task in each format: answer with the word reversed."""
    out = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        question, answer = f"reverse {word}", word[::-1]
        if fmt == "messages":
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif fmt == "alpaca":
            out.append({"instruction": "reverse the word", "input": word, "output": answer})
        elif fmt == "prompt_completion":
            out.append({"prompt": question + " =", "completion": " " + answer})
        else:
            out.append({"text": f"{question} = {answer}"})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_recipe(tmp_path: Path, model_dir: Path, fmt: str = "messages", **sections: Any) -> Path:
    train = write_jsonl(tmp_path / f"train-{fmt}.jsonl", rows_for(fmt, 64))
    evals = write_jsonl(tmp_path / f"eval-{fmt}.jsonl", rows_for(fmt, 10))
    recipe: dict[str, Any] = {
        "name": "tiny",
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(train), "format": fmt}, "eval": [{"path": str(evals), "format": fmt}],
                 "max_length": 64, "loss_on": "all" if fmt == "text" else "assistant"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"lr": 3e-3, "micro_batch": 4, "max_steps": 12, "warmup_steps": 2, "seed": 3},
        "eval": {"at_start": True},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "method"  # a method replaces the default one whole
        recipe[key] = {**recipe.get(key, {}), **value} if merge else value
    path = tmp_path / f"{fmt}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start_run(recipe: Path, overrides: list[str] | None = None) -> Path:
    loaded = load_recipe(recipe, overrides or [])
    return LocalExecutor(Resources()).prepare(loaded).run_dir  # what `launch` writes before the job starts


def run(run_dir: Path) -> int:
    from launcher.train.job import run_job

    return run_job(run_dir)


def metrics(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("fmt, method", [
    # A random tiny model's frozen lm_head caps how sharp its logits can get, so adapters train it too.
    ("messages", {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]}),
    ("alpaca", {"name": "dora", "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]}),
    ("prompt_completion", {"name": "full"}),
    ("text", {"name": "freeze", "trainable_layers": 1, "trainable_patterns": ["lm_head"]}),
])
def test_each_format_and_method_learns(tmp_path: Path, tiny_model_dir: Path, fmt: str, method: dict) -> None:
    lr = 3e-3 if method["name"] in ("full", "freeze") else 1e-2
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, fmt, method=method,
                                    optim={"lr": lr, "max_steps": 20, "schedule": "constant"}))
    assert run(run_dir) == 0
    evals = metrics(run_dir, "eval")
    assert evals[0]["when"] == "start" and evals[-1]["when"] == "end"
    print(fmt, method["name"], [round(e["eval_loss"], 3) for e in evals])
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"], evals
    train = [r["loss"] for r in metrics(run_dir, "train")]
    assert len(train) == 20 and sum(train[-3:]) < sum(train[:3])
    out = run_dir / ("adapter" if method["name"] in ("lora", "dora") else "model")
    assert (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """2N steps == N steps + resume + N steps: same losses (fixed seed, CPU, fp32), dropout on to test RNG restore."""
    recipe = make_recipe(tmp_path, tiny_model_dir, method={"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
                         optim={"max_steps": 10, "grad_accum": 2, "micro_batch": 2},
                         checkpoint={"every_steps": 5, "keep_last": 5}, eval={"at_start": False})
    run_dir = start_run(recipe)
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in dist_vars}
    assert run(run_dir) == 0
    assert {name: os.environ.get(name) for name in dist_vars} == before  # an in-process run leaves none behind
    full = [r["loss"] for r in metrics(run_dir, "train")]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000005", "step-00000010"]
    # What `launch logs` shows: a line per step with its figures, each save and the evaluation, as they happen.
    log = (run_dir / "logs" / "rank0.log").read_text()
    for step, loss in enumerate(full, start=1):
        assert re.search(rf"step {step}/10  loss {loss:.4f}  lr \S+  grad_norm \S+  [\d,]+ tok/s \(run [\d,]+\)  "
                         rf"eta (-|\d+:\d\d)", log), step
    assert "step 10/10" in log and "eta 0:00" in log
    for step in (5, 10):
        assert re.search(rf"checkpoint step {step} saved \(\d+\.\d s\): \S+step-0000000?{step}", log), step
    assert re.search(r"evaluating \(end, step 10\): \d+ examples", log)
    # Cut the run back to its state after step 5, then resume it.
    shutil.rmtree(ckpts / "step-00000010")
    (ckpts / "latest").write_text("step-00000005\n")
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train" and json.loads(line)["step"] <= 5]
    # ... and leave the line a crash or a full disk tears: the resume drops it and goes on.
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + '\n{"kind": "train", "step": 6, "lo')
    assert run(run_dir) == 0
    resumed = [r["loss"] for r in metrics(run_dir, "train")]
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 11))
    assert resumed == pytest.approx(full, rel=0, abs=1e-6)


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path: Path, tiny_model_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    recipe = make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 6},
                         checkpoint={"every_steps": 3, "keep_last": 3}, eval={"at_start": False})
    run_dir = start_run(recipe)
    assert run(run_dir) == 0
    ckpts = run_dir / "checkpoints"
    (ckpts / "step-00000006" / "trainable.safetensors").write_bytes(b"garbage")
    (ckpts / ".step-00000009.tmp").mkdir()  # a save that a killed rank never finished
    from launcher.train.checkpoint import load_checkpoint, resumable_checkpoints

    assert [p.name for p in resumable_checkpoints(run_dir)] == ["step-00000006", "step-00000003"]
    from launcher.train.model import build_model
    from launcher.strategies.ddp import DDPStrategy
    from launcher.train.trainer import make_optimizer
    import torch

    plan = json.loads((run_dir / "plan.json").read_text())
    recipe_obj = load_recipe(recipe).recipe
    model = build_model(recipe_obj, torch.device("cpu"))
    optimizer = make_optimizer(model, recipe_obj.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = load_checkpoint(run_dir, DDPStrategy(1, 0, torch.device("cpu")), model, optimizer, scheduler)
    assert state is not None and state.step == 3
    assert "step-00000006 is damaged" in caplog.text
    assert plan["run_dir"] == str(run_dir)


def test_outputs_load_with_from_pretrained_and_merge_matches(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, output={"merge": True}, optim={"max_steps": 4},
                                    eval={"at_start": False},
                                    model={"path": str(tiny_model_dir), "dtype": "float32",
                                           "attn_implementation": "eager", "name": "example-org/tiny-llama"}))
    assert run(run_dir) == 0
    # Portable: the adapter names the base by its Hub name, not this machine's directory, and carries a model card.
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "example-org/tiny-llama"
    card = (run_dir / "adapter" / "README.md").read_text()
    final = metrics(run_dir, "eval")[-1]
    assert "base_model: example-org/tiny-llama" in card and "AutoPeftModelForCausalLM" in card
    assert f"| eval_loss | {final['eval_loss']:.4f} |" in card and "| steps | 4 |" in card
    assert "| eval_loss |" in (run_dir / "merged" / "README.md").read_text()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        a, m = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, m, atol=1e-4)  # training changed something


def test_early_stopping_stops(tmp_path: Path, tiny_model_dir: Path) -> None:
    # lr 0: eval loss never improves, so patience 2 stops after the third periodic evaluation.
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 40, "lr": 1e-12, "warmup_steps": 0},
                                    eval={"every_steps": 2, "at_start": False},
                                    early_stopping={"patience": 2, "min_delta": 0.01}))
    assert run(run_dir) == 0
    assert metrics(run_dir, "train")[-1]["step"] == 6


def test_exact_match_metric(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 2},
                                    eval={"exact_match": True, "max_new_tokens": 4}))
    assert run(run_dir) == 0
    for row in metrics(run_dir, "eval"):
        assert 0.0 <= row["eval_exact_match"] <= 1.0


def test_a_hub_dataset_in_the_alpaca_prompt_trains_from_the_hub_cache(tmp_path: Path, tiny_model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`launch` on `hub:` sources read from a (fake) Hub cache, offline: the job reads its splits' files, renders
    them with the Alpaca prompt (tests/train/test_data.py checks the text and the exact-match prompts) and names the
    dataset in the model card."""
    from tiny import use_hub_cache, write_hub_dataset

    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    files = {"train.jsonl": rows_for("alpaca", 24), "test.jsonl": rows_for("alpaca", 4)}
    write_hub_dataset(cache, "org/reverse", files, "d" * 40)
    source = {"hub": "org/reverse", "format": "alpaca"}
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, "alpaca", optim={"max_steps": 2},
                                    eval={"at_start": False},
                                    data={"train": [source], "eval": [{**source, "split": "test"}],
                                          "prompt_style": "alpaca", "max_length": 256}))  # the preamble is long
    assert run(run_dir) == 0
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "rows=24 " in log and "eval_rows=4 " in log, log
    assert metrics(run_dir, "eval")[-1]["eval_loss"] > 0
    assert "`org/reverse`" in (run_dir / "adapter" / "README.md").read_text()


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 300, "micro_batch": 2},
                         eval={"at_start": False}, logging={"progress": False, "tensorboard": False, "every_steps": 1})
    env = {**os.environ, "FTLAUNCH_CACHE": str(tmp_path / "cache")}
    child = subprocess.Popen([sys.executable, "-m", "launcher", str(recipe)], env=env, cwd=tmp_path,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir, "train")) >= 3:
            break
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    output, _ = child.communicate(timeout=240)
    assert child.returncode == 3, output
    assert "Traceback" not in output and "--resume" in output
    stopped_at = metrics(run_dir, "train")[-1]["step"]
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "COMPLETE").is_file()
    assert (run_status(run_dir).state, run_status(run_dir).exit_code) == ("STOPPED", 3)
    refused = subprocess.run([sys.executable, "-m", "launcher", str(recipe), "--resume", "optim.max_steps=1"],
                             env=env, cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "overrides cannot change a run" in refused.stderr
    resumed = subprocess.run([sys.executable, "-m", "launcher", str(recipe), "--resume"],
                             env=env, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in metrics(run_dir, "train")]
    assert steps == list(range(1, 301))  # every step exactly once: nothing lost, nothing repeated
    assert (run_status(run_dir).state, run_status(run_dir).exit_code) == ("COMPLETED", 0)
    again = subprocess.run([sys.executable, "-m", "launcher", str(recipe), "--resume"],
                           env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "1 completed" in again.stderr  # a completed run is never run again
    assert [r["step"] for r in metrics(run_dir, "train")] == steps


def test_kernels_all_trains_like_eager(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`kernels: all` (PyTorch paths on CPU: chunked CE never materialises logits) gives the eager run's losses."""
    losses = {}
    for kernels in ([], "all"):
        case = tmp_path / ("kernels" if kernels else "eager")
        case.mkdir()
        run_dir = start_run(make_recipe(case, tiny_model_dir, kernels=kernels, optim={"max_steps": 4, "label_smoothing": 0.1},
                                        eval={"at_start": False}))
        assert run(run_dir) == 0
        losses[bool(kernels)] = [r["loss"] for r in metrics(run_dir, "train")] + [metrics(run_dir, "eval")[-1]["eval_loss"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_rank_batches_are_equal_in_number_and_cover_every_item_once() -> None:
    from launcher.train.evaluate import rank_batches

    class FakeStrategy:
        def __init__(self, rank: int, world: int) -> None:
            self.rank, self.world_size = rank, world

    items = list(range(7))
    per_rank = [rank_batches(items, FakeStrategy(r, 3), 2) for r in range(3)]  # type: ignore[arg-type]
    assert {len(b) for b in per_rank} == {2}  # 7 items, 3 ranks, batch 2: every rank runs 2 batches
    counted = sorted(i for batches in per_rank for chunk, counts in batches if counts for i in chunk)
    assert counted == items


def _bf16_full_run(tmp_path: Path, model_dir: Path, master_weights: bool, steps: int, **sections: Any) -> Path:
    case = tmp_path / f"masters-{master_weights}-{steps}"
    case.mkdir()
    return start_run(make_recipe(case, model_dir, method={"name": "full"},
                                 model={"path": str(model_dir), "dtype": "bfloat16", "attn_implementation": "eager",
                                        "master_weights": master_weights},
                                 optim={"lr": 1e-5, "max_steps": steps, "schedule": "constant", "warmup_steps": 0},
                                 eval={"at_start": False}, **sections))


def test_bf16_full_fine_tuning_keeps_float32_master_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Adam moves each weight by about lr = 1e-5 a step; near 0.02 a bf16 weight moves only in steps of 1.2e-4. Pure
    bf16 rounds most updates away; fp32 masters accumulate them (what the H200 run measured at 1B scale)."""
    from safetensors.torch import load_file

    initial = load_file(str(tiny_model_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    changed = {}
    for master_weights in (True, False):
        run_dir = _bf16_full_run(tmp_path, tiny_model_dir, master_weights, steps=12)
        assert run(run_dir) == 0
        saved = load_file(str(run_dir / "checkpoints" / "step-00000012" / "trainable.safetensors"))
        tensor = saved["model.layers.0.mlp.down_proj.weight"]
        assert tensor.dtype == (torch_dtype("float32") if master_weights else torch_dtype("bfloat16"))
        output = load_file(str(run_dir / "model" / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
        assert output.dtype == torch_dtype("bfloat16")  # the output is the recipe's dtype either way
        changed[master_weights] = float((output.float() != initial.bfloat16().float()).float().mean())
    print("fraction of bf16 weights changed:", changed)
    assert changed[True] > 0.5 and changed[False] < 0.5 * changed[True], changed


def test_bf16_master_weights_resume_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The checkpoint holds the fp32 masters, not their bf16 rounding: N + resume + N == 2N steps."""
    run_dir = _bf16_full_run(tmp_path, tiny_model_dir, True, steps=6, checkpoint={"every_steps": 3, "keep_last": 3})
    assert run(run_dir) == 0
    full = [r["loss"] for r in metrics(run_dir, "train")]
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step-00000006")
    (ckpts / "latest").write_text("step-00000003\n")
    assert run(run_dir) == 0
    assert [r["loss"] for r in metrics(run_dir, "train")] == full


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


LOSS_CURVES = Path(__file__).resolve().parents[1] / "golden" / "loss_curves.json"


@pytest.mark.parametrize("method", [{"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, {"name": "full"}],
                         ids=["lora", "full"])
def test_pinned_loss_curve(tmp_path: Path, tiny_model_dir: Path, method: dict) -> None:
    """The first 10 step losses of a tiny CPU run with a fixed seed, pinned to 1e-5: a change that shifts every run
    alike (loss normalisation, schedule, data order, init) fails here even though N-rank vs 1-rank still agree.
    Refresh after an intended change: FTLAUNCH_UPDATE_GOLDEN=1 pytest tests/train/test_train.py -k pinned."""
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, method=method, eval={"at_start": False},
                                    optim={"lr": 3e-3, "max_steps": 10, "warmup_steps": 3, "schedule": "cosine",
                                           "micro_batch": 4, "grad_accum": 2, "seed": 3}))
    assert run(run_dir) == 0
    losses = [r["loss"] for r in metrics(run_dir, "train")]
    pinned = json.loads(LOSS_CURVES.read_text()) if LOSS_CURVES.is_file() else {}
    if os.environ.get("FTLAUNCH_UPDATE_GOLDEN"):
        pinned[method["name"]] = losses
        LOSS_CURVES.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    assert len(losses) == 10
    assert losses == pytest.approx(pinned[method["name"]], rel=0, abs=1e-5)


def test_lr_schedule_multipliers() -> None:
    """Warmup (step+1)/warmup, then linear or cosine decay to min_lr_ratio at the last step; constant stays 1."""
    import math

    from launcher.config.schema import OptimConfig
    from launcher.train.trainer import lr_lambda

    cosine = lr_lambda(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == pytest.approx(1.0) and cosine(14) == pytest.approx(0.1)
    assert cosine(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = lr_lambda(OptimConfig(warmup_ratio=0.25, schedule="linear"), total_steps=8)
    assert [linear(s) for s in (0, 1, 2, 5, 8)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    constant = lr_lambda(OptimConfig(schedule="constant"), total_steps=5)
    assert {constant(s) for s in range(5)} == {1.0}


def _nan_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """Training forwards (one per step at grad_accum 1) return a NaN loss at the given 1-based steps."""
    import launcher.train.trainer as train_module

    real = train_module.forward_loss_sum
    calls = [0]

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] in steps else loss

    monkeypatch.setattr(train_module, "forward_loss_sum", forward)


def test_a_nan_step_is_not_applied(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    _nan_at(monkeypatch, {3})
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 5}, eval={"at_start": False},
                                    checkpoint={"every_steps": 1, "keep_last": 10}))
    assert run(run_dir) == 0
    rows = metrics(run_dir, "train")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] != rows[2]["loss"] and all(r["loss"] == r["loss"] for r in rows if r["step"] != 3)
    weights = [load_file(str(run_dir / "checkpoints" / f"step-{s:08d}" / "trainable.safetensors")) for s in (2, 3, 4)]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])  # step 3 changed nothing
    assert any((weights[1][k] != weights[2][k]).any() for k in weights[0])  # step 4 trained again


def test_nan_steps_in_a_row_stop_the_run(tmp_path: Path, tiny_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import torch
    from safetensors.torch import load_file

    from launcher.train.job import EXIT_DIVERGED

    _nan_at(monkeypatch, {3, 4})
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 8, "max_nonfinite_steps": 2},
                                    eval={"at_start": False}, checkpoint={"every_steps": 2, "keep_last": 10}))
    assert run(run_dir) == EXIT_DIVERGED
    assert "training diverged: steps 3-4: 2 steps in a row had a non-finite loss" in caplog.text
    assert (run_status(run_dir).state, run_status(run_dir).exit_code) == ("DIVERGED", EXIT_DIVERGED)
    assert [r["step"] for r in metrics(run_dir, "train")] == [1, 2, 3, 4]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000002"  # the step-4 checkpoint was never reached: the run stopped first
    state = load_file(str(run_dir / "checkpoints" / latest / "trainable.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_crash_bad_input_and_a_killed_job_are_told_apart(tmp_path: Path, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`launch status` says how each run ended (issue 18): not RUNNING for two minutes, then STOPPED for all."""
    from cluster.runs import list_runs
    from launcher.common import outcome
    from launcher.common.exits import EXIT_BAD_INPUT
    from launcher.train.trainer import Trainer

    def boom(self: Trainer) -> None:
        raise RuntimeError("boom at step 1")

    for sub in ("c", "f"):
        (tmp_path / sub).mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run", boom)
        crashed = start_run(make_recipe(tmp_path / "c", tiny_model_dir, eval={"at_start": False}))
        with pytest.raises(RuntimeError, match="boom"):
            run(crashed)
    status = run_status(crashed)
    assert (status.state, status.reason) == ("CRASHED", "RuntimeError: boom at step 1")
    # `launch status` says where, from the rank's log, which holds the traceback (before, only the terminal did)
    assert len(status.error) == 1 and status.error[0].startswith("crashed: RuntimeError: boom at step 1 (at ")
    assert status.error[0].endswith(f"{Path(__file__).name}:{boom.__code__.co_firstlineno + 1} in boom)")
    assert "Traceback (most recent call last)" in (crashed / "logs" / "rank0.log").read_text()

    recipe = make_recipe(tmp_path / "f", tiny_model_dir, eval={"at_start": False})
    (tmp_path / "f" / "train-messages.jsonl").write_text('{"messages": "not a list"}\n')
    failed = start_run(recipe)
    assert run(failed) == EXIT_BAD_INPUT
    assert (run_status(failed).state, run_status(failed).exit_code) == ("FAILED", EXIT_BAD_INPUT)
    assert run_status(failed).error[0].endswith("train-messages.jsonl: row 1: field 'messages': expected a non-empty "
                                                "list of messages. Fix: messages rows need `messages`: [{role, "
                                                "content}, ...] (OpenAI) or `conversations`: [{from, value}, ...] "
                                                "(ShareGPT)")

    (tmp_path / "m").mkdir()  # valid rows, but fewer than one optimizer step takes
    too_few = start_run(make_recipe(tmp_path / "m", tiny_model_dir, eval={"at_start": False},
                                    optim={"micro_batch": 40, "grad_accum": 2, "max_steps": 1}))
    assert run(too_few) == EXIT_BAD_INPUT
    assert "fewer than one optimizer step takes: micro_batch(40) * grad_accum(2) * world_size(1) = 80" in \
        (too_few / "logs" / "rank0.log").read_text()
    assert "fewer than one optimizer step takes" in run_status(too_few).error[0]

    killed = tmp_path / "k"  # a job killed outright (SIGKILL, OOM) records nothing after `running`
    killed.mkdir()
    outcome.record(killed, outcome.Outcome.RUNNING)
    data = json.loads((killed / outcome.OUTCOME_FILE).read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (killed / outcome.OUTCOME_FILE).write_text(json.dumps({**data, "pid": dead.pid}))
    assert outcome.read(killed)["outcome"] == "crashed"  # type: ignore[index]
    outcome.record(killed, outcome.Outcome.RUNNING)  # this process: alive
    assert outcome.read(killed)["outcome"] == "running"  # type: ignore[index]

    states = {r.run_dir: r.state for r in list_runs(crashed.parent, 10) + list_runs(failed.parent, 10)}
    assert states == {str(crashed): "CRASHED", str(failed): "FAILED"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs (root can mount one: CI and the dev machine run as root), unmounted after the test."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True, text=True)
    assert proc.returncode == 0, f"this test needs a tmpfs (root): {proc.stderr}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_cleanly_and_the_run_resumes_exactly(tmp_path: Path, tiny_model_dir: Path,
                                                               small_disk: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The disk fills after the step-2 checkpoint: the step-4 one fails with a clear message (exit 5, no
    traceback), its partial directory is removed, step 2 stays `latest`; with room again the run resumes and ends
    exactly where an uninterrupted run does."""
    from launcher.common.exits import EXIT_WRITE_FAILED
    from launcher.train import checkpoint

    sections = dict(optim={"max_steps": 6}, eval={"at_start": False}, checkpoint={"every_steps": 2, "keep_last": 5},
                    logging={"progress": False, "tensorboard": False, "every_steps": 1})
    (tmp_path / "ref").mkdir()
    reference = start_run(make_recipe(tmp_path / "ref", tiny_model_dir, **sections))
    assert run(reference) == 0

    recipe = make_recipe(tmp_path, tiny_model_dir, **sections, output={"root": str(small_disk / "runs")})
    run_dir = start_run(recipe)
    real_save = checkpoint.save_checkpoint
    filler = small_disk / "filler"

    def save_then_fill(*args: Any, **kwargs: Any) -> Path:
        saved = real_save(*args, **kwargs)
        if not filler.exists():  # the disk fills up (another job, a log) right after the first checkpoint
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            filler.write_bytes(b"\0" * max(0, free - 8192))
        return saved

    with monkeypatch.context() as patch:
        patch.setattr("launcher.train.trainer.save_checkpoint", save_then_fill)
        assert run(run_dir) == EXIT_WRITE_FAILED
    assert "could not be written" in caplog.text and "step-00000002, is intact" in caplog.text
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert not list(ckpts.glob(".step-*")) and not (ckpts / "step-00000004").exists()
    assert (run_status(run_dir).state, run_status(run_dir).exit_code) == ("FAILED", EXIT_WRITE_FAILED)

    filler.unlink()
    assert run(run_dir) == 0
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 7))
    assert [r["loss"] for r in metrics(run_dir, "train")] == pytest.approx(
        [r["loss"] for r in metrics(reference, "train")], rel=0, abs=1e-6)


def test_two_launches_started_together_get_a_run_each(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Issue 18: two `launch RECIPE` at once used to share one run directory (interleaved metrics, one crash)."""
    recipe = make_recipe(tmp_path, tiny_model_dir, optim={"max_steps": 4}, eval={"at_start": False},
                         logging={"progress": False, "tensorboard": False, "every_steps": 1})
    env = {**os.environ, "FTLAUNCH_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    children = [subprocess.Popen([sys.executable, "-m", "launcher", str(recipe)], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny", "tiny-2"]
    for name in runs:
        assert [r["step"] for r in metrics(tmp_path / "runs" / name, "train")] == [1, 2, 3, 4]
        assert run_status(tmp_path / "runs" / name).state == "COMPLETED"
