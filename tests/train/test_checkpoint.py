"""launcher/train/checkpoint.py on its own, one process: what a checkpoint holds, when it becomes visible, which one a
resume picks, and how a data position moves to another world size. The multi-rank formats (FSDP DCP, ZeRO) are
checked end to end in tests/integration/test_strategies.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from launcher.strategies.ddp import DDPStrategy
from launcher.train.checkpoint import (COMPLETE, LATEST, SCHEDULER_FILE, TrainerState, _rescale_data_position,
                                       checkpoints_dir, load_checkpoint, resumable_checkpoints, save_checkpoint,
                                       step_name)


class Parts:
    """A model with a frozen and a trainable layer, its AdamW, a linear-decay schedule: what the trainer checkpoints."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        self.model[0].requires_grad_(False)
        self.strategy = DDPStrategy(1, 0, torch.device("cpu"))
        self.model, self.optimizer = self.strategy.wrap(
            self.model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 - step / 100)

    def train_steps(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(torch.randn(3, 4)).square().mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()

    def save(self, run_dir: Path, step: int, keep_last: int = 3, **state: object) -> Path:
        return save_checkpoint(run_dir, self.strategy, self.model, self.optimizer, self.scheduler,
                               TrainerState(step=step, **state), keep_last)  # type: ignore[arg-type]

    def load(self, run_dir: Path) -> TrainerState | None:
        return load_checkpoint(run_dir, self.strategy, self.model, self.optimizer, self.scheduler)


def test_round_trip_restores_weights_optimizer_schedule_state_and_rng(tmp_path: Path) -> None:
    first = Parts(seed=0)
    first.train_steps(3)
    first.save(tmp_path, 3, epoch=1, batch_in_epoch=5, tokens_seen=123, history=[{"step": 3, "eval_loss": 1.5}])
    draw_after_save = torch.rand(4)
    first.train_steps(2)
    uninterrupted = [p.detach().clone() for p in first.model.parameters()]

    frozen = Parts(seed=0).model[0].state_dict()  # frozen weights are not checkpointed: they come from the base
    second = Parts(seed=1)  # other weights, other optimizer state, other RNG state
    second.model[0].load_state_dict(frozen)
    state = second.load(tmp_path)
    assert state is not None and (state.step, state.epoch, state.batch_in_epoch, state.tokens_seen) == (3, 1, 5, 123)
    assert state.history == [{"step": 3, "eval_loss": 1.5}]
    assert torch.equal(torch.rand(4), draw_after_save)  # the RNG continues where the save left it
    assert second.scheduler.last_epoch == 3
    # Two more steps from the restored weights, Adam moments, schedule and RNG land exactly where the
    # uninterrupted run did.
    second.train_steps(2)
    for got, want in zip(second.model.parameters(), uninterrupted):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_complete_checkpoints_count_and_latest_moves_last(tmp_path: Path) -> None:
    parts = Parts(seed=0)
    final = parts.save(tmp_path, 2)
    root = checkpoints_dir(tmp_path)
    assert final == root / step_name(2) and (final / COMPLETE).is_file() and (final / SCHEDULER_FILE).is_file()
    assert json.loads((final / COMPLETE).read_text()) == {"world_size": 1, "strategy": "ddp"}
    assert (root / LATEST).read_text().strip() == "step-00000002"
    # A save killed before its COMPLETE marker: a partial directory (and a stale .tmp) are never picked.
    (root / step_name(4)).mkdir()
    (root / step_name(4) / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (root / ".step-00000006.tmp").mkdir()
    assert [p.name for p in resumable_checkpoints(tmp_path)] == ["step-00000002"]
    assert parts.load(tmp_path).step == 2  # type: ignore[union-attr]
    parts.save(tmp_path, 8)
    assert not (root / ".step-00000006.tmp").exists()  # cleaned by the next save


def test_retention_keeps_the_newest_and_a_resaved_step_replaces_its_directory(tmp_path: Path) -> None:
    parts = Parts(seed=0)
    for step in (1, 2, 3, 4):
        parts.save(tmp_path, step, keep_last=2)
    assert [p.name for p in resumable_checkpoints(tmp_path)] == ["step-00000004", "step-00000003"]
    parts.train_steps(1)
    parts.save(tmp_path, 4, keep_last=2, tokens_seen=99)  # e.g. an interrupt right after a periodic save
    assert parts.load(tmp_path).tokens_seen == 99  # type: ignore[union-attr]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    parts = Parts(seed=0)
    parts.save(tmp_path, 1)
    parts.save(tmp_path, 2)
    (checkpoints_dir(tmp_path) / step_name(2) / SCHEDULER_FILE).write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        state = Parts(seed=1).load(tmp_path)
    assert state is not None and state.step == 1
    assert "step-00000002 is damaged" in caplog.text


def test_latest_pointing_nowhere_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parts = Parts(seed=0)
    parts.save(tmp_path, 1)
    parts.save(tmp_path, 2)
    (checkpoints_dir(tmp_path) / LATEST).write_text("step-00000009\n")
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in resumable_checkpoints(tmp_path)] == ["step-00000002", "step-00000001"]
    assert "not a complete checkpoint" in caplog.text
    assert Parts(seed=0).load(tmp_path / "elsewhere") is None  # no checkpoints at all: a fresh start


@pytest.mark.parametrize(("batches", "written_by", "resumed_on", "expected", "repeated"), [
    (3, 2, 1, 6, False),   # 6 rank micro batches of 1 rank cover what 3 of 2 ranks did
    (6, 1, 2, 3, False),
    (3, 2, 4, 1, True),    # 6 / 4: one whole micro batch, 2 rank micro batches seen again
    (0, 4, 3, 0, False),
])
def test_data_position_moves_to_another_world_size(batches: int, written_by: int, resumed_on: int, expected: int,
                                                   repeated: bool, caplog: pytest.LogCaptureFixture) -> None:
    state = TrainerState(batch_in_epoch=batches, world_size=written_by)
    with caplog.at_level(logging.WARNING):
        _rescale_data_position(state, resumed_on)
    assert (state.batch_in_epoch, state.world_size) == (expected, resumed_on)
    assert ("repeated" in caplog.text) == repeated
