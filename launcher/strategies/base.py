"""The interface every strategy implements: build, wrap, backward, optimizer step, save, load.

The trainer calls these hooks and never looks at a strategy's name. The hooks exist because the strategies differ in
exactly these places: DeepSpeed's engine owns accumulation, clipping and the optimizer step; FSDP holds sharded
DTensor parameters (clipping needs a global norm, the weights must be gathered to be saved); ranks of a sharded
strategy may build the model without weights (meta device) and receive them from rank 0.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from launcher.strategies.registry import StrategySpec


def init_one_rank_group(device: torch.device) -> None:
    """A process group of one rank for a single-process sharded run (FSDP's mesh, DTensors, DCP and DeepSpeed's
    collectives are built on one), unless the job already made one.

    Its store lives in this process (`HashStore`), not on MASTER_PORT: two one-rank jobs on one machine (two xdist
    workers in CI, two single-GPU runs on a workstation) would otherwise both listen on 29500 and the second fail
    with EADDRINUSE."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


class Strategy(ABC):
    """How the model is distributed across ranks, and how its state is saved and restored.

    Checkpoint directories are created, published and pruned by `launcher.train.checkpoint`; a strategy only writes and
    reads its own files inside the directory it is given (every rank calls save/load).
    """

    name: str

    can_skip_step: bool = True
    """A step's gradients can be dropped without applying them (`discard_gradients`). False for DeepSpeed, whose
    engine keeps reduced gradient partitions and optimizer bookkeeping of its own."""

    @property
    def spec(self) -> "StrategySpec":
        """This strategy's registry entry: its capabilities (launcher/strategies/__init__.py)."""
        from launcher.strategies.registry import spec

        return spec(self.name)

    def __init__(self, world_size: int, rank: int, device: torch.device, config: dict[str, Any] | None = None) -> None:
        self.world_size = world_size
        self.rank = rank
        self.device = device
        self.config = config or {}
        """The plan's resolved `strategy_config` (DeepSpeed JSON, FSDP settings), empty for DDP."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------ building
    @property
    def meta_init(self) -> bool:
        """Build this rank's model on the meta device (no weights in memory); `wrap` fills it from rank 0."""
        return False

    def load_device(self) -> torch.device:
        """Where this rank loads the pretrained weights (the training device unless the strategy moves them)."""
        return self.device

    def weights_dtype(self, model_dtype: str) -> str:
        """The dtype the model's weights are loaded and kept in (the plan's `weights_dtype`: float32 masters under
        mixed precision), `model_dtype` when the plan says nothing (DeepSpeed; plans written before it existed)."""
        return str(self.config.get("weights_dtype") or model_dtype)

    def share_quantized_layout(self, model: torch.nn.Module) -> None:
        """Called once the quantized base is loaded (or built on meta), before adapters wrap it (collective). Ranks
        that built on meta take rank 0's 4-bit layers here (`launcher.train.quant_layout`); nothing to do for
        strategies where every rank loads the weights itself."""

    def model_init(self) -> ContextManager[Any]:
        """Context around model construction (ZeRO-3 partitions weights while `from_pretrained` loads them)."""
        return contextlib.nullcontext()

    @abstractmethod
    def wrap(self, model: torch.nn.Module,
             make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Distribute the model and build its optimizer over the (possibly sharded) trainable parameters.

        The optimizer returned is the torch optimizer whose param_groups carry the learning rate (the trainer's
        LR scheduler drives it), even where an engine wraps it.
        """

    # ---------------------------------------------------------------------------------------------------- step
    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool) -> ContextManager[None]:
        """Context for a micro batch's forward and backward; `last_micro_batch`: the optimizer step follows it.
        Strategies skip gradient communication, or mark the accumulation boundary, here."""
        return contextlib.nullcontext()

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """Backward of one micro batch's (already normalised) loss."""
        loss.backward()

    def optimizer_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
        """Clip, step, zero the gradients; return the global gradient norm before clipping. A non-finite norm (the
        same on every rank: it is reduced over all of them) is not applied: the gradients are dropped."""
        norm = self.clip_grad_norm(model, max_norm)
        if math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def weights_finite(self, model: torch.nn.Module) -> bool:
        """Whether every trainable weight is finite on every rank (collective). Sharded parameters are checked
        through this rank's shard; ZeRO-3's placeholders are empty and pass."""
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        for param in model.parameters():
            if param.requires_grad:
                local = param.to_local() if hasattr(param, "to_local") else param
                if local.numel() and not bool(torch.isfinite(local).all()):
                    bad += 1
                    break
        return float(self.all_reduce_sum(bad)) == 0.0

    def discard_gradients(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients without applying them (a step with a non-finite loss)."""
        model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float | None) -> float:
        """Clip the global gradient norm (over every rank's gradients); return the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)

    # ---------------------------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (label-token counts, eval sums)."""
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ----------------------------------------------------------------------------------------------- checkpoints
    @abstractmethod
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Write this rank's part of the model and optimizer state into `directory` (collective)."""

    @abstractmethod
    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Restore model and optimizer state written by `save`, possibly by another world size (collective)."""

    @abstractmethod
    def full_trainable_state(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Trainable tensors, unsharded, for export (rank 0 consumes them)."""
