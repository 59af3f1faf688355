"""The quantization part of a plan: `quant_storage: auto` resolved for the strategy, checks and warnings for
quantized bases (`method: qlora`) and for the bitsandbytes optimizers.

Planning side: pydantic only, no torch and no bitsandbytes import (what bitsandbytes does on CPU was measured, see
tests/test_quant.py, and is encoded here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config.recipe import Problem
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


def quant_problems(recipe: Recipe, strategy: str) -> list[Problem]:
    """Quantization settings that cannot work. Each names the key and the fix.

    The sharding rules shared with FSDP (8-bit weights under fsdp; a quant_storage other than the model dtype under
    fsdp/zero3) live in `launcher.plan.strategy_config.check_strategy` with the rest of the strategy checks; this adds the ones
    it leaves: 8-bit weights under ZeRO-3, a storage dtype given for 8-bit weights, and bitsandbytes optimizers
    under FSDP.
    """
    problems: list[Problem] = []
    if recipe.optim.name != "adamw" and strategy_spec(strategy).dtensor_parameters:
        # Measured (torch 2.13, bitsandbytes 0.50.2): under fully_shard the parameters are DTensors and bitsandbytes'
        # update ops have no sharding rule ("got mixed torch.Tensor and DTensor" / "no sharding strategy").
        problems.append(Problem("optim.name", f"{recipe.optim.name} (bitsandbytes) cannot update FSDP's sharded "
                                "DTensor parameters", hint="use optim.name: adamw with fsdp, or strategy.name: "
                                "ddp/zero1/zero2/zero3 for the 8-bit or paged optimizer"))
    method = recipe.method
    if not isinstance(method, QLoraMethod) or method.bits != 8:
        return problems
    if method.quant_storage != "auto":
        problems.append(Problem("method.quant_storage", "quant_storage applies to packed 4-bit weights only; 8-bit "
                                "weights are stored as int8", hint="remove method.quant_storage, or set bits: 4"))
    if strategy == "zero3":
        problems.append(Problem("method.bits", "8-bit (LLM.int8) weights cannot be partitioned by zero3: it "
                                "partitions floating-point parameters only",
                                hint="use bits: 4 (quant_storage auto shards them), or strategy ddp/zero1/zero2"))
    return problems


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
