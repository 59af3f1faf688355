"""`launch status` of a local run read from its files: the step, the last loss and the last evaluation's metrics; a
failed run's error and the time a run ran (on real run directories of the tiny model)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from cluster.local import LocalExecutor
from cluster.runs import run_status, status_table
from launcher.config.recipe import load_recipe
from launcher.plan.resources import Resources

IDLE_S = 1.0
"""Between a failed attempt and the next: longer than the rounding of the times compared."""


def test_status_shows_the_last_evaluation(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"nodes": 1, "world_size": 1,
                                                    "recipe": {"optim": {"max_steps": 20}}}))
    (tmp_path / "logs").mkdir()
    rows = [{"kind": "eval", "step": 0, "eval_loss": 3.0, "eval_accuracy": 0.2},
            {"kind": "train", "step": 10, "loss": 1.5},
            {"kind": "eval", "step": 10, "eval_loss": 1.25, "eval_accuracy": 0.75, "eval_f1_macro": 0.5},
            {"kind": "train", "step": 11, "loss": 1.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "ev')
    status = run_status(tmp_path)
    assert (status.step, status.last_loss, status.eval_step) == (11, 1.4, 10)
    assert status.eval == {"eval_loss": 1.25, "eval_accuracy": 0.75, "eval_f1_macro": 0.5}
    assert json.loads(json.dumps(status.to_json()))["eval"]["eval_accuracy"] == 0.75
    console = Console(record=True, width=200)
    console.print(status_table(status))
    text = console.export_text()
    assert "last eval (step 10)" in text and "accuracy 0.75" in text and "f1_macro 0.5" in text


def tiny_recipe(root: Path, model_dir: Path, data: Path) -> Path:
    """Two steps of LoRA on the tiny model, no evaluation: a run of a few seconds."""
    recipe = {"name": "tiny", "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
              "data": {"train": {"path": str(data), "format": "messages"}, "max_length": 64},
              "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
              "optim": {"lr": 1e-3, "micro_batch": 2, "max_steps": 2, "seed": 3}, "eval": {"at_start": False},
              "logging": {"progress": False, "tensorboard": False}, "output": {"root": str(root / "runs")}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_a_failed_run_shows_its_error_and_elapsed_is_the_time_its_attempts_ran(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails on a bad row shows the row's error; fixed and run again after an idle pause, it completes:
    no error any more (the first attempt's stays in the log), and its elapsed time is its two attempts', not the
    pause."""
    from launcher.common.exits import EXIT_BAD_INPUT
    from launcher.train.job import run_job

    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": "not a list"}\n')
    run_dir = LocalExecutor(Resources()).prepare(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, data))).run_dir
    started = time.monotonic()
    assert run_job(run_dir) == EXIT_BAD_INPUT
    first = time.monotonic() - started
    status = run_status(run_dir)
    assert (status.state, status.exit_code) == ("FAILED", EXIT_BAD_INPUT)
    assert status.error == ["train.jsonl: row 1: field 'messages': expected a non-empty list of messages. Fix: "
                            "messages rows need `messages`: [{role, content}, ...] (OpenAI) or `conversations`: "
                            "[{from, value}, ...] (ShareGPT)".replace("train.jsonl", str(data))]
    console = Console(record=True, width=400)
    console.print(status_table(status))
    text = console.export_text()
    assert "error" in text and "[{role, content}, ...]" in text

    time.sleep(IDLE_S)  # the run sits failed: not running time
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("red", "blue", "green", "cat") * 4]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    started = time.monotonic()
    assert run_job(run_dir) == 0
    second = time.monotonic() - started
    status = run_status(run_dir)
    assert (status.state, status.error) == ("COMPLETED", [])
    assert "ERROR" in (run_dir / "logs" / "rank0.log").read_text()  # the first attempt's, not this one's
    assert status.elapsed_s is not None and 0.5 * second < status.elapsed_s <= first + second
    assert status.elapsed == f"00:00:{int(status.elapsed_s):02d}"
