"""`launch status` of a local run read from its files: the step, the last loss and the last evaluation's metrics."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from cluster.runs import run_status, status_table


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
