"""Distribution strategies behind one small interface (`Strategy`): wrap, accumulate, step, save, load.

The trainer never branches on a strategy's name; it asks the strategy object.
"""

from __future__ import annotations

from launcher.strategies.base import Strategy


def get_strategy(name: str, world_size: int, rank: int, device: "object") -> Strategy:
    """The strategy object for a resolved plan strategy name."""
    if name == "ddp":
        from launcher.strategies.ddp import DDPStrategy

        return DDPStrategy(world_size=world_size, rank=rank, device=device)
    raise ValueError(f"strategy {name!r} is not implemented in this version")


__all__ = ["Strategy", "get_strategy"]
