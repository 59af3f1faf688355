"""Distribution strategies: a torch-free registry of what each one can do, and one module per implementation.

The registry (`STRATEGIES`) is what the planning side reads (plan checks, strategy configs, quantization storage,
the memory planner's rows, the report) and what the rank side uses to build a strategy (`get_strategy`) and to read
its checkpoints (`checkpoint_tensors`). Nothing else matches strategy names: code asks a `StrategySpec` for a
capability. Adding a strategy is one entry here plus one module with a `Strategy` subclass and a `read_checkpoint`.
This module imports no torch (the planning side imports it on login nodes); the implementations are imported only
when a rank builds one.
"""

from __future__ import annotations

from launcher.strategies.registry import (STRATEGIES, StrategySpec, checkpoint_tensors, get_strategy, spec,
                                          strategy_of_memory_row)

__all__ = ["STRATEGIES", "StrategySpec", "checkpoint_tensors", "get_strategy", "spec", "strategy_of_memory_row"]
