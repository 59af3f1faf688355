"""The quantization part of a plan: `quant_storage: auto` resolved for the strategy, checks and warnings for
quantized bases (`method: qlora`) and for the bitsandbytes optimizers.

Planning side: pydantic only, no torch and no bitsandbytes import (what bitsandbytes does on CPU was measured, see
tests/train/test_quant.py, and is encoded here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config.schema import QLoraMethod, Recipe
from launcher.strategies import spec as strategy_spec

if TYPE_CHECKING:
    from launcher.plan.resources import Resources
    from launcher.plan.memory import MemoryPlan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def quant_storage_for(recipe: Recipe, strategy: str) -> str:
    """The concrete storage dtype of packed 4-bit weights: the model dtype when the strategy shards parameters (so
    the packed weights shard with the rest), uint8 otherwise (bitsandbytes' native packing)."""
    # Strategies that flatten/partition parameters need every parameter, packed 4-bit weights included, in one
    # floating dtype (FSDP's flat parameters, ZeRO-3's partitions).
    return recipe.model.dtype if strategy_spec(strategy).shards_parameters else "uint8"


def resolve_quant_storage(recipe: Recipe, strategy: str) -> Recipe:
    """The recipe with `method.quant_storage: auto` replaced by its value for `strategy`, so plan.json (what every
    rank reads) holds the dtype the weights are packed in. 8-bit weights have no packing: `auto` stays."""
    method = recipe.method
    if not isinstance(method, QLoraMethod) or method.quant_storage != "auto" or method.bits != 4:
        return recipe
    resolved = method.model_copy(update={"quant_storage": quant_storage_for(recipe, strategy)})
    return recipe.model_copy(update={"method": resolved})


def quant_warnings(recipe: Recipe, resources: "Resources", memory: "MemoryPlan | None") -> list[str]:
    """What is worth knowing before a quantized / 8-bit-optimizer run, without stopping it."""
    warnings: list[str] = []
    if recipe.optim.name.startswith("paged_") and resources.device == "cpu":
        # Measured with bitsandbytes 0.50.2: it warns and keeps the states in ordinary memory; results are unchanged.
        warnings.append(f"optim.name: {recipe.optim.name} pages states through CUDA unified memory; on CPU "
                        "bitsandbytes runs it unpaged (same updates, no spill to host)")
    if isinstance(recipe.method, QLoraMethod) and recipe.output.merge:
        size = ""
        if memory is not None:
            gib = memory.params_total * DTYPE_BYTES[recipe.model.dtype] / 2**30
            size = f" (~{gib:,.0f} GiB of host RAM for this model)"
        warnings.append("output.merge: the adapter is merged into the base loaded unquantized in "
                        f"{recipe.model.dtype} on rank 0's CPU{size}, not into the quantized weights it trained on")
    return warnings
