"""The strategy registry: each strategy's name, implementation and capabilities, and how to build one or read its
checkpoints. Torch-free (the planning side reads it on login nodes); implementations are imported only when a rank
builds one. See launcher/strategies/__init__.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StrategySpec:
    """One strategy's name, implementation and capabilities."""

    name: str
    """The name a recipe's `strategy.name` and plan.json use."""

    module: str
    """Module holding the implementation (`<class_name>` and `read_checkpoint`)."""

    class_name: str
    """The `Strategy` subclass in `module`."""

    options: str | None
    """The recipe's `strategy.<options>` section this strategy reads (`fsdp`, `deepspeed`), or None."""

    zero_stage: int | None = None
    """DeepSpeed ZeRO stage, None outside DeepSpeed."""

    shards_parameters: bool = False
    """Parameters are flattened or partitioned across ranks (FSDP, ZeRO-3): every parameter, packed 4-bit weights
    included, must share one floating dtype."""

    dtensor_parameters: bool = False
    """Parameters are DTensors (FSDP2): optimizers without sharding rules (bitsandbytes' 8-bit ones) cannot step them."""

    broadcasts_from_rank0: bool = False
    """Ranks other than 0 build the model on the meta device and receive rank 0's weights as plain tensors (so
    quantization state, which is not a tensor, does not travel)."""

    exports_from_checkpoint: bool = False
    """The final outputs are written from the last checkpoint (weights sharded, or owned by an engine), not from
    rank 0's in-memory model."""

    collective_forward: bool = False
    """A forward pass communicates (parameters gathered on the fly), so every rank must run the same number of
    forwards in evaluation and generation."""

    trainable_set_may_change: bool = False
    """Parameters may be frozen and unfrozen between steps (gradual unfreezing, `method.unfreeze`): DDP, which then
    finds the parameters that got no gradient each step (`find_unused_parameters`)."""

    memory_rows: tuple[str, ...] = ()
    """The memory planner's rows (launcher/plan/memory_model.py) that run as this strategy."""


STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in (
    StrategySpec("ddp", "launcher.strategies.ddp", "DDPStrategy", options=None, trainable_set_may_change=True,
                 memory_rows=("ddp",)),
    StrategySpec("fsdp", "launcher.strategies.fsdp", "FSDPStrategy", options="fsdp", shards_parameters=True,
                 dtensor_parameters=True, broadcasts_from_rank0=True, exports_from_checkpoint=True,
                 collective_forward=True, memory_rows=("fsdp", "fsdp_hybrid")),
    # DeepSpeed's forwards are treated as collective at every stage, as they always have been here; only ZeRO-3's
    # are known to need it (ZeRO-1/2 keep whole weights on every rank).
    StrategySpec("zero1", "launcher.strategies.deepspeed", "DeepSpeedStrategy", options="deepspeed", zero_stage=1,
                 exports_from_checkpoint=True, collective_forward=True, memory_rows=("zero1",)),
    StrategySpec("zero2", "launcher.strategies.deepspeed", "DeepSpeedStrategy", options="deepspeed", zero_stage=2,
                 exports_from_checkpoint=True, collective_forward=True, memory_rows=("zero2",)),
    StrategySpec("zero3", "launcher.strategies.deepspeed", "DeepSpeedStrategy", options="deepspeed", zero_stage=3,
                 shards_parameters=True, exports_from_checkpoint=True, collective_forward=True,
                 memory_rows=("zero3", "zero3_offload_optimizer", "zero3_offload")),
)}


def spec(name: str) -> StrategySpec:
    """The registry entry of a resolved strategy name; a ValueError naming the implemented ones otherwise."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is not implemented in this version (implemented: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def strategy_of_memory_row(row: str) -> str:
    """The strategy that runs a memory-planner row (`fsdp_hybrid` -> fsdp, `zero3_offload` -> zero3, ...)."""
    for entry in STRATEGIES.values():
        if row in entry.memory_rows:
            return entry.name
    raise ValueError(f"memory row {row!r} belongs to no strategy")


def _module(name: str) -> Any:
    return importlib.import_module(spec(name).module)


def get_strategy(name: str, world_size: int, rank: int, device: "torch.device",
                 config: dict[str, Any] | None = None) -> Any:
    """The `launcher.strategies.base.Strategy` for a resolved plan strategy name and its resolved `strategy_config`
    (typed Any: the registry must not import the implementations, which import it)."""
    cls = getattr(_module(name), spec(name).class_name)
    return cls(world_size=world_size, rank=rank, device=device, config=config)


def checkpoint_tensors(strategy: str, directory: Path, trainable_only: bool) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Unsharded tensors of a checkpoint written by `strategy`, one at a time, on one CPU process (export)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"checkpoint {directory} was written by unknown strategy {strategy!r}")
    return _module(strategy).read_checkpoint(directory, trainable_only)
