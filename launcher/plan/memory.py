"""The memory part of a plan: the recipe mapped onto `launcher.plan.memory_model`'s arguments, a row per strategy.

Kept apart from plan.py because the mapping (recipe field -> planner argument) is its own small contract, and the
planner itself stays independent of the recipe schema. Stdlib + pydantic only (planning side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from launcher.plan import memory_model as mem
from launcher.plan import method_params
from launcher.config.recipe import Problem
from launcher.config.schema import (AdapterMethod, FreezeMethod, IA3Method, LoraFields, PrefixTuningMethod,
                                    PromptTuningMethod, QuantFields, Recipe)
from launcher.strategies import strategy_of_memory_row

if TYPE_CHECKING:
    from launcher.plan.resources import Resources



@dataclass
class MemoryPlan:
    """Estimates for every strategy, and the auto choice when the GPU memory is known."""

    params_total: int
    params_active: int
    trainable: int
    rows: list[dict[str, Any]]
    chosen: str | None
    """Row name chosen by `launcher.plan.memory_model.choose_strategy` (may carry offload), or None."""
    reason: str
    gpu_mem_bytes: int | None
    micro_batch: int | None = None
    """Resolved `micro_batch: auto`, when asked."""
    warnings: list[str] = field(default_factory=list)

    @property
    def chosen_strategy(self) -> str:
        return strategy_of_memory_row(self.chosen) if self.chosen else "ddp"

    def to_json(self) -> dict[str, Any]:
        return {"params_total": self.params_total, "params_active": self.params_active, "trainable": self.trainable,
                "gpu_mem_bytes": self.gpu_mem_bytes, "chosen": self.chosen, "reason": self.reason,
                "micro_batch": self.micro_batch, "strategies": self.rows}


def model_config_dir(recipe: Recipe) -> Path | None:
    """Where the model's config.json can be read without loading weights (a GGUF only once converted)."""
    if recipe.model.path is not None:
        return Path(recipe.model.path)
    try:
        from launcher.common.gguf import is_complete
        from launcher.common.model_files import gguf_converted

        converted = gguf_converted(recipe.model)
        return converted if converted is not None and is_complete(converted) else None
    except Exception:  # noqa: BLE001 — sizing is best effort for GGUF; the run itself reports real errors
        return None


def training_arguments(recipe: Recipe, counts: mem.ParamCounts) -> dict[str, Any]:
    """`estimate_memory` keyword arguments from the recipe (except strategy/world layout and micro_batch)."""
    method = recipe.method
    args: dict[str, Any] = {
        "optimizer": recipe.optim.name,
        "param_dtype": recipe.model.dtype,
        "seq_len": recipe.data.max_length,
        "activation_checkpointing": recipe.model.gradient_checkpointing,
        "fused_ce": recipe.kernels == "all" or "fused_ce" in recipe.kernels,
        "flash_attention": recipe.model.attn_implementation != "eager",
        "master_weights": recipe.model.master_weights,
    }
    if isinstance(method, QuantFields):
        args["method"] = "int8" if method.bits == 8 else "qlora"
        args["double_quant"] = method.double_quant
    else:
        args["method"] = method.name
    if isinstance(method, LoraFields):
        args["lora_rank"] = method.r
        args["lora_targets"] = method.target_modules
        args["lora_dropout"] = method.dropout
    if isinstance(method, FreezeMethod):
        args["trainable_params"] = mem.last_layers_params(counts, method.trainable_layers or 0)
    args.update(other_method_arguments(recipe, counts.dims))
    return args


def other_method_arguments(recipe: Recipe, dims: mem.ModelDims) -> dict[str, Any]:
    """`estimate_memory` arguments of prompt_tuning, prefix_tuning, ia3 and adapter (launcher/plan/method_params.py):
    the trainable count, what their modules save per token, and prompt tuning's longer sequences. Empty for the
    other methods."""
    method = recipe.method
    if isinstance(method, PromptTuningMethod):
        return {"trainable_params": method_params.prompt_tuning_params(dims, method.num_virtual_tokens),
                "seq_len": recipe.data.max_length + method.num_virtual_tokens}
    if isinstance(method, PrefixTuningMethod):
        # The prefix adds n keys and values per layer to attention: O(n) per sequence, not per token; not counted.
        return {"trainable_params": method_params.prefix_tuning_params(
            dims, method.num_virtual_tokens, method.projection, method.encoder_hidden_size)}
    if isinstance(method, IA3Method):
        modules = method_params.ia3_modules(dims.model_type, method.target_modules, method.feedforward_modules)
        if modules is None:
            raise ValueError(f"method.target_modules: no (IA)^3 defaults for model type {dims.model_type!r}")
        return {"trainable_params": method_params.ia3_params(dims, *modules)
                + method_params.modules_to_save_params(dims, method.modules_to_save),
                "extra_activation_per_token": method_params.ia3_activation_bytes_per_token(dims, *modules)}
    if isinstance(method, AdapterMethod):
        bottleneck = method_params.adapter_bottleneck(dims.hidden_size, method.bottleneck, method.reduction_factor)
        places = len(method.placement)
        return {"trainable_params": method_params.adapter_params(dims, bottleneck, places),
                "extra_activation_per_token": method_params.adapter_activation_bytes_per_token(dims, bottleneck,
                                                                                               places)}
    return {}


RulesOut = Callable[[Recipe, "Resources", list[str]], dict[str, str]]
"""Memory row name -> why the rest of the recipe rules its strategy out (launcher.plan.checks.incompatible_rows)."""


def plan_memory(recipe: Recipe, resources: "Resources",
                rules_out: RulesOut | None = None) -> tuple[MemoryPlan | None, list[Problem]]:
    """Memory rows for the recipe on the resources; problems when `micro_batch: auto` cannot be resolved. With
    `rules_out`, `auto` chooses only among strategies the rest of the recipe can run with."""
    problems: list[Problem] = []
    auto_batch = recipe.optim.micro_batch == "auto"
    config_dir = model_config_dir(recipe)
    if config_dir is None or not (config_dir / "config.json").is_file():
        if auto_batch:
            problems.append(Problem("optim.micro_batch", "`auto` needs the model's config.json to size the batch",
                                    hint="set a number, or point model.path at a directory with config.json"))
        return None, problems
    try:
        return _plan_rows(recipe, resources, mem.count_parameters(mem.read_model_config(config_dir)), problems,
                          rules_out)
    except UNREADABLE_CONFIG as err:  # a broken (or hostile) config.json is a problem to report, not a traceback
        if recipe.task.type != "causal_lm" and not auto_batch:
            # Task models (BERT-like encoders, T5) are outside the planner's decoder families: the plan goes on
            # without a memory estimate (a warning says so) instead of refusing a model the run can train.
            return None, []
        return None, [Problem("model.path", f"cannot size the model from {config_dir / 'config.json'}: "
                              f"{type(err).__name__}: {err}",
                              hint="sizing supports Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-NeoX, Mixtral, Qwen-MoE")]


UNREADABLE_CONFIG = (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError, RecursionError)
"""What reading and sizing a config.json can raise when the file is not what it claims to be."""


def _plan_rows(recipe: Recipe, resources: "Resources", counts: mem.ParamCounts, problems: list[Problem],
               rules_out: RulesOut | None) -> tuple[MemoryPlan | None, list[Problem]]:
    auto_batch = recipe.optim.micro_batch == "auto"
    args = training_arguments(recipe, counts)
    gpus = max(1, resources.gpus_per_node)
    gpu_mem = resources.gpu_mem_bytes
    micro_batch: int | None = None
    if auto_batch:
        if gpu_mem is None:
            problems.append(Problem("optim.micro_batch", "`auto` needs the GPU memory",
                                    hint="pass --gpu-mem 80GiB (or set a number)"))
            return None, problems
        micro_batch = _auto_batch(recipe, counts, resources, args, gpu_mem)
        if micro_batch == 0:
            problems.append(Problem("optim.micro_batch", "not even micro_batch 1 fits in the GPU memory with any strategy",
                                    hint="use LoRA/QLoRA, gradient checkpointing, a shorter max_length, or more GPUs"))
            return None, problems
    rows = mem.plan_strategies(counts, nodes=resources.nodes, gpus_per_node=gpus,
                               gpu_mem_bytes=gpu_mem if gpu_mem is not None else 2**62,
                               micro_batch=micro_batch or int(recipe.optim.micro_batch), **args)
    if gpu_mem is not None:
        incompatible = rules_out(recipe, resources, [r.name for r in rows]) \
            if rules_out is not None and recipe.strategy.name == "auto" else {}
        chosen, reason = mem.choose_strategy(rows, incompatible=incompatible)
    else:
        chosen, reason = None, "no GPU memory given (--gpu-mem): estimates only"
    trainable = _trainable(recipe, counts, args)
    out_rows = [{"name": r.name, "strategy": r.strategy, "offload_optimizer": r.offload_optimizer,
                 "offload_params": r.offload_params, "fits": r.fits if gpu_mem is not None else None,
                 "bytes": r.estimate.to_dict(), "host_per_node": r.host_per_node} for r in rows]
    return MemoryPlan(counts.total, counts.active, trainable, out_rows, chosen, reason, gpu_mem, micro_batch), problems


def _auto_batch(recipe: Recipe, counts: mem.ParamCounts, resources: "Resources", args: dict[str, Any],
                gpu_mem: int) -> int:
    """Largest power-of-two micro batch that fits with the strategy the recipe asks for (or the best for auto)."""
    gpus = max(1, resources.gpus_per_node)
    names = [recipe.strategy.name] if recipe.strategy.name != "auto" else ["ddp", "zero1", "zero2", "fsdp", "zero3"]
    best = 0
    for name in names:
        best = max(best, mem.largest_micro_batch(counts, gpu_mem_bytes=gpu_mem, strategy=name,
                                                 world_size=resources.nodes * gpus, gpus_per_node=gpus, **args))
        if best:
            break  # the first strategy (cheapest) that fits any batch decides, as `auto` would
    return best


def _trainable(recipe: Recipe, counts: mem.ParamCounts, args: dict[str, Any]) -> int:
    method = recipe.method
    if isinstance(method, LoraFields):
        return mem.lora_trainable_params(counts, rank=method.r, targets=method.target_modules,
                                         dora=method.name == "dora")
    if "trainable_params" in args:  # freeze and the other adapter methods
        return int(args["trainable_params"])
    return counts.total
