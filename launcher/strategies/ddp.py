"""DDP: every rank holds the whole model; gradients are averaged by all-reduce. World size 1 is plain training.

Checkpoints hold only the trainable parameters (an adapter stays small) and the optimizer state, written by rank 0:
every rank has identical copies, so any world size can load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from launcher.strategies.base import Strategy

WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: torch.nn.Module,
             make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        return model, make_optimizer(_inner(model))

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool) -> ContextManager[None]:
        if isinstance(model, DistributedDataParallel) and not last_micro_batch:
            return model.no_sync()
        return super().no_sync(model, last_micro_batch)

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        if not self.is_main:
            return
        state = {name: t.detach().contiguous().cpu() for name, t in self.full_trainable_state(model)}
        save_file(state, str(directory / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        state = load_file(str(directory / WEIGHTS_FILE))
        params = dict(_inner(model).named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]} (was the recipe's method or model changed?)")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True))

    def full_trainable_state(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in _inner(model).named_parameters():
            if param.requires_grad:
                yield name, param


def read_checkpoint(directory: Path, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainable tensors of a DDP checkpoint (DDP checkpoints hold nothing else)."""
    yield from load_file(str(directory / WEIGHTS_FILE)).items()
