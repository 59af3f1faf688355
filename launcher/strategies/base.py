"""The interface every strategy implements."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist


class Strategy(ABC):
    """How the model is distributed across ranks, and how its state is saved and restored.

    Checkpoint directories are created, published and pruned by `launcher.checkpoint`; a strategy only writes and
    reads its own files inside the directory it is given (every rank calls save/load).
    """

    name: str

    def __init__(self, world_size: int, rank: int, device: torch.device) -> None:
        self.world_size = world_size
        self.rank = rank
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def wrap(self, model: torch.nn.Module,
             make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Distribute the model and build its optimizer over the (possibly sharded) trainable parameters."""

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool) -> ContextManager[None]:
        """Context for a micro batch's backward: skip gradient communication unless it is the last one."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float | None) -> float:
        """Clip the global gradient norm (over every rank's gradients); return the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (label-token counts, eval sums)."""
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @abstractmethod
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Write this rank's part of the model and optimizer state into `directory`."""

    @abstractmethod
    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Restore model and optimizer state written by `save` (possibly on another world size)."""

    @abstractmethod
    def full_trainable_state(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Trainable tensors, unsharded, for export (rank 0 consumes them)."""
