"""The strategy registry: every entry builds, reads its checkpoints, covers the schema's names and the memory
planner's rows, and importing it loads no torch (the planning side reads it on login nodes)."""

from __future__ import annotations

import typing

import pytest

from launcher.plan import memory_model as mem
from launcher.config.schema import StrategyConfig
from launcher.strategies import STRATEGIES, spec, strategy_of_memory_row


def test_registry_names_are_the_schemas() -> None:
    names = typing.get_args(StrategyConfig.model_fields["name"].annotation)
    assert set(STRATEGIES) == set(names) - {"auto"}


def test_every_memory_row_runs_as_a_strategy() -> None:
    rows = {row for row, *_ in mem._candidates(nodes=2, gpus_per_node=8, optimizer="adamw")}
    assert {row: strategy_of_memory_row(row) for row in rows} == {
        "ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "fsdp": "fsdp", "fsdp_hybrid": "fsdp", "zero3": "zero3",
        "zero3_offload_optimizer": "zero3", "zero3_offload": "zero3"}
    with pytest.raises(ValueError, match="belongs to no strategy"):
        strategy_of_memory_row("tp")


def test_unknown_strategy_names_the_implemented_ones() -> None:
    with pytest.raises(ValueError, match=r"'tp' is not implemented .*ddp, fsdp, zero1, zero2, zero3"):
        spec("tp")


def test_capabilities_are_consistent() -> None:
    for entry in STRATEGIES.values():
        if entry.shards_parameters or entry.dtensor_parameters:
            assert entry.exports_from_checkpoint and entry.collective_forward, entry.name
        assert (entry.zero_stage is not None) == (entry.options == "deepspeed"), entry.name


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_entry_names_a_real_implementation(name: str) -> None:
    import importlib

    from launcher.strategies.base import Strategy

    entry = spec(name)
    module = importlib.import_module(entry.module)
    assert issubclass(getattr(module, entry.class_name), Strategy)
    assert callable(module.read_checkpoint)
