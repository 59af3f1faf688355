"""Atomic checkpoints of the whole training state, the `latest` pointer, retention, and export.

Layout under RUN_DIR/checkpoints/:

    step-00000040/              a complete checkpoint
        COMPLETE                written last, by rank 0, after every rank finished (its presence = usable)
        trainer_state.json      step, data position, early-stopping state, world size, metrics
        scheduler.pt
        rng-rank{R}.pt          each rank's RNG states (python, numpy, torch, cuda)
        ...                     the strategy's files (weights/adapter and optimizer, maybe sharded)
    latest                      text: the name of the newest complete checkpoint (replaced atomically)
    best.json                   with checkpoint.keep_best: the best evaluation's checkpoint, metric, value and step
                                (replaced atomically after `latest`; that checkpoint is never pruned)
    .step-00000060.tmp/         a checkpoint being written; never read

Why: a rank killed while writing leaves only a `.tmp` directory, which is ignored and cleaned by the next save; the
previous checkpoint and `latest` are untouched. A checkpoint whose files are damaged is skipped with a warning and the
previous one is used.

The best checkpoint: `best.json` is written after the checkpoint it names is complete and `latest` points at the new
one, and pruning (which comes last) spares what it names, so a crash at any point leaves it naming a complete
checkpoint. The best record is also in trainer_state.json (`best`), so a resume continues with it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from launcher.common.rundir import write_json_atomic, write_text_atomic
from launcher.strategies.base import Strategy

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"
SCHEDULER_FILE = "scheduler.pt"


class WriteError(Exception):
    """The run directory could not be written (a checkpoint, metrics): what, where, and what is still intact."""


@dataclass
class TrainerState:
    """What the loop needs, besides weights and optimizer, to continue exactly where it stopped."""

    step: int = 0
    """Optimizer steps done."""

    epoch: int = 0
    """Current pass over the training data."""

    batch_in_epoch: int = 0
    """Micro batches of this epoch already consumed (per rank)."""

    tokens_seen: int = 0
    """Input tokens processed so far (all ranks)."""

    best_metric: float | None = None
    """Best early-stopping metric so far."""

    evals_without_improvement: int = 0
    """Early-stopping patience counter."""

    world_size: int = 1
    """World size that wrote the checkpoint."""

    best: dict[str, Any] | None = None
    """Best evaluation by `checkpoint.keep_best` so far: {metric, mode, value, step, checkpoint}."""

    unfrozen_groups: int = 0
    """Gradual unfreezing: groups trainable now (0: not recorded; the schedule's position follows from `step`)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    """Evaluation results so far."""

    def final_results(self) -> dict[str, Any]:
        """The step and the latest evaluation's results: what model cards report."""
        return {"step": self.step, **(self.history[-1] if self.history else {})}


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, strategy: Strategy, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState, keep_last: int,
                    best: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of every rank's state; publish it only when all ranks are done. Collective call. `best`:
    the keep_best record (its `checkpoint` this one or an older complete one) for best.json, spared by pruning.

    A rank that cannot write (disk full, quota, a read-only or vanished file system) does not leave the others
    waiting: every rank learns of the failure and raises WriteError together; the partial directory is removed (its
    room is what a full disk lacks) and `latest` still names the previous checkpoint."""
    root = checkpoints_dir(run_dir)
    final = root / step_name(state.step)
    tmp = root / f".{final.name}.tmp"
    failure: BaseException | None = None
    if strategy.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a rank killed during an earlier save
            tmp.mkdir()
        except OSError as err:
            failure = err
    _raise_if_any_failed(strategy, failure, tmp, root)
    try:
        strategy.save(model, optimizer, tmp)
        torch.save(_rng_state(), tmp / f"rng-rank{strategy.rank}.pt")
        if strategy.is_main:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    except Exception as err:  # noqa: BLE001 (only write failures are kept; anything else is raised as it is)
        failure = _write_failure(err)
    # every rank's files are on disk (or every rank knows one failed) before the checkpoint becomes visible
    _raise_if_any_failed(strategy, failure, tmp, root)
    if strategy.is_main:
        try:
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text(json.dumps({"world_size": strategy.world_size, "strategy": strategy.name}))
            if final.exists():  # same step saved again (e.g. interrupt right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / LATEST, final.name + "\n")  # moves last
            if best is not None:
                write_json_atomic(root / BEST_FILE, best)
            _prune(root, keep_last, best)
        except Exception as err:  # noqa: BLE001
            failure = _write_failure(err)
    _raise_if_any_failed(strategy, failure, tmp, root)
    return final


def _write_failure(err: Exception) -> Exception:
    """`err` when it says that a file could not be written, else raise it: OSError (ENOSPC, EDQUOT, EROFS, ...), and
    what safetensors (SafetensorError) and torch.save (RuntimeError "file write failed") raise for a full disk."""
    text = str(err).lower()
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError" or (
            isinstance(err, RuntimeError) and ("write" in text or "space" in text)):
        return err
    raise err


def _raise_if_any_failed(strategy: Strategy, failure: BaseException | None, tmp: Path, root: Path) -> None:
    """Collective: all ranks raise WriteError when any rank's write failed (a barrier when none did)."""
    flag = torch.tensor([1.0 if failure is not None else 0.0], device=strategy.device)
    if float(strategy.all_reduce_sum(flag)) == 0:
        return
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    complete = complete_checkpoints(root)
    intact = f"the last complete checkpoint, {complete[-1].name}, is intact" if complete else "no checkpoint yet"
    what = f"{type(failure).__name__}: {failure}" if failure is not None else "another rank's write failed"
    raise WriteError(f"checkpoint {tmp.name.strip('.').removesuffix('.tmp')} could not be written to {root} "
                     f"({what}); {intact}. Free space (or fix the file system), then resume: launch --resume "
                     f"{root.parent}")


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep_last: int, best: dict[str, Any] | None = None) -> None:
    """Remove complete checkpoints older than the last `keep_last`, except the best one, and stale partial ones."""
    complete = complete_checkpoints(root)
    spared = best["checkpoint"] if best is not None else None
    for old in complete[:-keep_last]:
        if old.name != spared:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def mark_best(run_dir: Path, best: dict[str, Any], keep_last: int) -> None:
    """Point best.json at an existing complete checkpoint (an evaluation after that step's checkpoint was written
    improved on the best), then prune what it no longer spares. Rank 0 only."""
    root = checkpoints_dir(run_dir)
    if not (root / best["checkpoint"] / COMPLETE).is_file():
        raise FileNotFoundError(f"{root / best['checkpoint']} is not a complete checkpoint; best.json not moved")
    write_json_atomic(root / BEST_FILE, best)
    _prune(root, keep_last, best)


def write_best(run_dir: Path, best: dict[str, Any]) -> None:
    """Point best.json at the checkpoint a resumed state names as best, when it is complete (rank 0; no pruning:
    the checkpoints newer than the one resumed from are still on disk)."""
    root = checkpoints_dir(run_dir)
    if (root / best["checkpoint"] / COMPLETE).is_file():
        write_json_atomic(root / BEST_FILE, best)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The best checkpoint's record (best.json) when it names a complete checkpoint; None otherwise."""
    path = checkpoints_dir(run_dir) / BEST_FILE
    try:
        best = json.loads(path.read_text())
        complete = (checkpoints_dir(run_dir) / best["checkpoint"] / COMPLETE).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return best if complete else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).is_file())


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    """Candidates to resume from, best first: `latest`, then every other complete checkpoint, newest first."""
    root = checkpoints_dir(run_dir)
    complete = complete_checkpoints(root)
    ordered = list(reversed(complete))
    latest_file = root / LATEST
    if latest_file.is_file():
        pointed = root / latest_file.read_text().strip()
        if pointed in ordered:
            ordered.remove(pointed)
            ordered.insert(0, pointed)
        else:
            log.warning("checkpoints/latest points at %s, which is not a complete checkpoint; ignoring it", pointed.name)
    return ordered


def load_checkpoint(run_dir: Path, strategy: Strategy, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    prepare: Callable[[TrainerState], None] | None = None) -> TrainerState | None:
    """Restore the newest usable checkpoint; a damaged one is skipped with a warning. None when there is none.
    `prepare(state)` runs before the weights load: the trainable set must be the one the checkpoint was saved with
    (gradual unfreezing), since strategies save and load the parameters that require grad."""
    for candidate in resumable_checkpoints(run_dir):
        try:
            state = TrainerState(**json.loads((candidate / STATE_FILE).read_text()))
            if prepare is not None:
                prepare(state)
            strategy.load(model, optimizer, candidate)
            scheduler.load_state_dict(torch.load(candidate / SCHEDULER_FILE, weights_only=False))
            rng_file = candidate / f"rng-rank{strategy.rank}.pt"
            if rng_file.is_file() and state.world_size == strategy.world_size:
                _set_rng_state(torch.load(rng_file, weights_only=False))
            else:
                log.warning("resuming on world size %d from a checkpoint written by %d ranks: RNG streams restart",
                            strategy.world_size, state.world_size)
        except Exception as err:  # noqa: BLE001 — any damage means "try the previous one"
            log.warning("checkpoint %s is damaged (%s: %s); trying the previous one", candidate.name,
                        type(err).__name__, err)
            continue
        if state.world_size != strategy.world_size:
            _rescale_data_position(state, strategy.world_size)
        log.info("resumed from %s (step %d)", candidate.name, state.step)
        return state
    return None


def _rescale_data_position(state: TrainerState, world_size: int) -> None:
    """Resume on another world size: keep the position in the epoch's example order (launcher.train.trainer.micro_batches).

    A rank's micro batch j covers examples [j*B*W, (j+1)*B*W) of the epoch's permutation, so `batch_in_epoch`
    micro batches per rank on W ranks are batch_in_epoch*W/W' on W' ranks. When that is not whole, the partial
    micro batch is seen again.
    """
    consumed = state.batch_in_epoch * state.world_size
    if consumed % world_size:
        log.warning("resuming %d ranks' position on %d ranks: %d rank micro batches are repeated", state.world_size,
                    world_size, consumed % world_size)
    state.batch_in_epoch = consumed // world_size
    state.world_size = world_size
