"""Distribution strategies behind one small interface (`Strategy`): wrap, accumulate, step, save, load.

The trainer never branches on a strategy's name; it asks the strategy object.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from launcher.strategies.base import Strategy

if TYPE_CHECKING:
    import torch


def get_strategy(name: str, world_size: int, rank: int, device: "object",
                 config: dict[str, Any] | None = None) -> Strategy:
    """The strategy object for a resolved plan strategy name and its resolved `strategy_config`."""
    if name == "ddp":
        from launcher.strategies.ddp import DDPStrategy

        return DDPStrategy(world_size=world_size, rank=rank, device=device, config=config)
    if name == "fsdp":
        from launcher.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(world_size=world_size, rank=rank, device=device, config=config)
    if name in ("zero1", "zero2", "zero3"):
        from launcher.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(world_size=world_size, rank=rank, device=device, config=config)
    raise ValueError(f"strategy {name!r} is not implemented in this version")


def checkpoint_tensors(strategy: str, directory: Path, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Unsharded tensors of a checkpoint written by `strategy`, one at a time, on one CPU process (export)."""
    if strategy == "ddp":
        from launcher.strategies.ddp import read_checkpoint
    elif strategy == "fsdp":
        from launcher.strategies.fsdp import read_checkpoint
    elif strategy in ("zero1", "zero2", "zero3"):
        from launcher.strategies.deepspeed import read_checkpoint
    else:
        raise ValueError(f"checkpoint {directory} was written by unknown strategy {strategy!r}")
    return read_checkpoint(directory, trainable_only)


__all__ = ["Strategy", "checkpoint_tensors", "get_strategy"]
