"""Every cross-field check of a plan, in one place: combinations of recipe, resources and strategy that can never
work (a Problem each, naming the key, what is wrong with the values, and the fix), and what this version cannot run
yet although the recipe is valid (`unsupported`).

Single fields are validated by the schema (launcher/config/schema.py); these need several fields, the resources or
the resolved strategy. `make_plan` runs them all and raises one RecipeError listing every problem, each located at
the YAML file:line of the key it names (LoadedRecipe.with_locations). Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from launcher.common import hub_data
from launcher.config.recipe import Problem
from launcher.config.schema import (OTHER_ADAPTER_METHODS, PEFT_PROMPT_METHODS, TASK_FIELDS, DataSource, FreezeMethod,
                                    LoraFields, QLoraMethod, QuantFields, Recipe)
from launcher.plan.eval_metrics import metric_problems, task_type
from launcher.plan.resources import Resources
from launcher.strategies import STRATEGIES
from launcher.strategies import spec as strategy_spec

IMPLEMENTED_STRATEGIES = tuple(STRATEGIES)
"""Strategies whose rank-side implementation exists (the registry). Others accepted by the schema can be planned, and
are refused with a clear message rather than failing after a job has queued for hours."""

def _missing_data_hint(path: Path, key: str) -> str:
    """Where relative paths come from, and what to do when the path was meant as a Hub dataset name: name it with
    `hub:` instead of `path:` (launcher/common/hub_data.py)."""
    hint = ("check the path (it was resolved to this: a relative path in a recipe is relative to the recipe file that "
            "names it, one in a command-line override to the current directory)")
    owner, name = path.parent.name, path.name
    if not path.parent.exists() and not path.suffix and owner and name and "." not in owner:
        hint += (f"; if `{owner}/{name}` is a Hugging Face Hub dataset, name it with hub instead of path: "
                 f"`{key.removesuffix('.path')}: {{hub: {owner}/{name}, split: train}}` (`launch` downloads it into "
                 "the Hub cache, the job reads it from there)")
    return hint


def sources(recipe: Recipe) -> Iterator[tuple[str, DataSource]]:
    """(`data.train.0`, source) for every data source, train then eval."""
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, split)):
            yield f"data.{split}.{i}", source


def hub_problems(recipe: Recipe) -> list[Problem]:
    """Hub datasets (`data.train.N.hub`) that are neither in the local Hub cache nor downloadable from here: the Hub
    is asked (once, briefly) only for those not cached, and not at all with HF_HUB_OFFLINE set. `launch plan` fails
    on them, since the job could not start; one that is downloadable is fetched by `launch` (Executor.prepare)."""
    found: list[Problem] = []
    for key, source in sources(recipe):
        if source.hub is None or hub_data.local_snapshot(source.hub, source.revision) is not None:
            continue
        why = hub_data.probe(source.hub, source.revision)
        if why is not None:
            revision = f" at revision {source.revision}" if source.revision else ""
            found.append(Problem(f"{key}.hub", f"{source.hub}{revision} is not in the Hub cache "
                                 f"({hub_data.repo_cache(source.hub)}) and cannot be downloaded: {why}",
                                 hint=hub_data.fix_hint(source)))
    return found


def data_problems(recipe: Recipe) -> list[Problem]:
    """Data files that are not there or cannot be read, from this machine (the login node sees the storage the
    ranks read), and cached Hub datasets without the subset or split asked for. `launch plan` prints them as
    warnings (sizing a recipe needs no data); a run is not created with them (Executor.prepare), so a typo fails in
    a second instead of in a queued job."""
    found: list[Problem] = []
    for prefix, source in sources(recipe):
        if source.hub is not None:
            found += _hub_data_problems(prefix, source)
            continue
        path = Path(source.path or "")  # the schema: a source without hub has a path
        key = f"{prefix}.path"
        if not path.exists():
            found.append(Problem(key, f"{path} does not exist", hint=_missing_data_hint(path, key)))
        elif not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
            found.append(Problem(key, f"{path} is not readable by this user", hint="check its permissions"))
        elif path.is_file() and path.stat().st_size == 0:
            found.append(Problem(key, f"{path} is empty", hint="point at a file with rows"))
    return found


def _hub_data_problems(prefix: str, source: DataSource) -> list[Problem]:
    """A cached Hub dataset without the subset or split asked for, or stored in files ftlaunch does not read. One
    not cached is hub_problems' (plan) or the download's (`launch`) to report."""
    assert source.hub is not None
    snapshot = hub_data.local_snapshot(source.hub, source.revision)
    if snapshot is None:
        return []
    try:
        hub_data.data_files(snapshot, source)
    except hub_data.HubDataError as err:
        hint = {"subset": "set subset to one of its configurations", "split": "set split to one it has"}.get(
            err.field, "save the rows as .jsonl or .parquet and set path to the file instead of hub")
        return [Problem(f"{prefix}.{err.field}", f"{source.hub} ({snapshot}): {err}", hint=hint)]
    return []


def data_source_problems(recipe: Recipe) -> list[Problem]:
    """What the data section asks that cannot work: prompt_style alpaca without alpaca rows (it would change
    nothing, silently), Hub datasets that cannot be had (hub_problems)."""
    found: list[Problem] = []
    if recipe.data.prompt_style == "alpaca" and not any(s.format == "alpaca" for _, s in sources(recipe)):
        found.append(Problem("data.prompt_style", "alpaca renders the rows of format: alpaca sources with the "
                             "Alpaca prompt, and no data source has that format",
                             hint="set format: alpaca on the sources holding instruction/input/output rows, or "
                                  "remove data.prompt_style (chat)"))
    return found + hub_problems(recipe)


def problems(recipe: Recipe, resources: Resources, strategy: str) -> list[Problem]:
    """All of them, in the order a reader meets the keys: recipe-wide, then strategy, then quantization."""
    return recipe_problems(recipe, resources) + data_source_problems(recipe) + task_problems(recipe) \
        + strategy_problems(recipe, resources, strategy) + quant_problems(recipe, strategy)


def uses_fused_ce(recipe: Recipe) -> bool:
    return recipe.kernels == "all" or "fused_ce" in recipe.kernels


def recipe_problems(recipe: Recipe, resources: Resources) -> list[Problem]:
    """Recipe/resource combinations that can never work, whatever the strategy. Each names what to change."""
    problems: list[Problem] = []
    optim = recipe.optim
    if optim.global_batch is not None and isinstance(optim.micro_batch, int):
        actual = optim.micro_batch * optim.grad_accum * resources.world_size
        if actual != optim.global_batch:
            problems.append(Problem(
                "optim.global_batch",
                f"micro_batch({optim.micro_batch}) * grad_accum({optim.grad_accum}) * world_size"
                f"({resources.world_size}) = {actual} != global_batch({optim.global_batch})",
                hint=f"set optim.grad_accum={max(1, optim.global_batch // (optim.micro_batch * resources.world_size))}"
                     " or change micro_batch"))
    if recipe.early_stopping is not None and recipe.eval.every_steps is None:
        problems.append(Problem("early_stopping", "early stopping needs periodic evaluation",
                                hint="set eval.every_steps"))
    problems += schedule_problems(recipe)
    if recipe.eval.exact_match and not recipe.data.eval and recipe.data.eval_fraction == 0:
        problems.append(Problem("eval.exact_match", "exact match needs held-out data",
                                hint="add data.eval sources or set data.eval_fraction"))
    if resources.device == "cpu" and recipe.model.dtype == "float16":
        problems.append(Problem("model.dtype", "float16 training is not supported on CPU",
                                hint="use float32 (or bfloat16) on CPU"))
    fused_ce = uses_fused_ce(recipe)
    lora_head = isinstance(recipe.method, LoraFields) and (
        "lm_head" in recipe.method.modules_to_save
        or (isinstance(recipe.method.target_modules, list) and "lm_head" in recipe.method.target_modules))
    if fused_ce and lora_head:
        problems.append(Problem("kernels", "fused_ce computes the loss from lm_head's plain weight, but the method "
                                "wraps lm_head (modules_to_save or a LoRA target)",
                                hint="drop fused_ce from kernels, or leave lm_head out of the adapter"))
    if recipe.model.attn_implementation == "flash_attention_2" and resources.device == "cpu":
        problems.append(Problem("model.attn_implementation", "flash_attention_2 needs a GPU",
                                hint="use sdpa on CPU"))
    return problems + method_problems(recipe)


def method_problems(recipe: Recipe) -> list[Problem]:
    """What prompt tuning, prefix tuning and bottleneck adapters cannot be combined with, whatever the strategy."""
    problems: list[Problem] = []
    name = recipe.method.name
    if name in PEFT_PROMPT_METHODS and recipe.data.packing:
        # Packed rows carry position_ids instead of an attention mask; PEFT drops position ids for prompt tuning
        # (examples of a pack would see each other) and shifts them for prefix tuning, whose cache the packed
        # block mask does not cover.
        problems.append(Problem("data.packing", f"{name} prepends virtual tokens to every sequence, which breaks "
                                "the per-example attention of packed rows (PEFT drops or shifts their position ids)",
                                hint="set data.packing: false"))
    if name == "prefix_tuning" and recipe.model.gradient_checkpointing:
        # transformers' GradientCheckpointingLayer sets past_key_values=None in training, which would drop the
        # prefix; PEFT (0.21) refuses the combination when it builds the model ("does not work with gradient
        # checkpointing"), after the job has started. Refused here instead.
        problems.append(Problem("model.gradient_checkpointing", "prefix tuning passes its prefix as past key "
                                "values, which transformers' checkpointed layers drop while training (the prefix "
                                "would get no gradient)", hint="set model.gradient_checkpointing: false, or use "
                                "prompt_tuning"))
    if recipe.output.merge and (name in PEFT_PROMPT_METHODS or name == "adapter"):
        why = "adds virtual tokens, not weight updates" if name != "adapter" else \
            "adds nonlinear layers, which fold into no weight"
        problems.append(Problem("output.merge", f"{name} cannot be merged into the model: it {why}",
                                hint="set output.merge: false (the adapter is saved under RUN_DIR/adapter)"))
    return problems



def method_strategy_problems(recipe: Recipe, strategy: str) -> list[Problem]:
    """The methods beside LoRA under strategies that shard parameters (fsdp, zero3): not verified in this version
    (PEFT's prompt encoders sit outside the decoder layers the strategies wrap, and generation under them is
    untested), so refused rather than risked on a queued job."""
    if recipe.method.name not in OTHER_ADAPTER_METHODS or not strategy_spec(strategy).shards_parameters:
        return []
    return [Problem("strategy.name", f"method {recipe.method.name} is not verified under {strategy}, which shards "
                    "parameters", hint="use strategy.name: ddp, zero1 or zero2 (every rank then holds the whole "
                    "frozen base), or method lora, which fsdp and zero3 shard")]

CLASSIFICATION_TASKS = ("sequence_classification", "token_classification")


def model_is_encoder_decoder(recipe: Recipe) -> bool | None:
    """Whether the model's config.json says it is an encoder-decoder (T5, BART, ...); None when it cannot be read
    here (a GGUF not converted yet, a directory without config.json): the run's loading then says what is wrong."""
    import json

    from launcher.plan.memory import model_config_dir

    directory = model_config_dir(recipe)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8")) if directory else None
    except (OSError, ValueError):
        return None
    return bool(config.get("is_encoder_decoder", False)) if isinstance(config, dict) else None


def task_problems(recipe: Recipe) -> list[Problem]:
    """`task:` combinations that cannot work, whatever the strategy (issue 13). Each names the key and the fix."""
    task = recipe.task
    problems: list[Problem] = []
    # Values, not `model_fields_set`: a recipe read back from plan.json has every field set.
    changed = {name for name, field in type(task).model_fields.items() if getattr(task, name) != field.default}
    for name in sorted(changed - {"type"} - set(TASK_FIELDS[task.type])):
        problems.append(Problem(f"task.{name}", f"task.{task.type} does not read {name}",
                                hint=f"remove task.{name}, or set task.type to the task that reads it"))
    if task.type == "causal_lm":
        return problems
    if recipe.data.packing:
        problems.append(Problem("data.packing", f"packing concatenates causal-LM examples; {task.type} examples each "
                                "carry their own label(s) and cannot share a row", hint="set data.packing: false"))
    if recipe.eval.exact_match and task.type in CLASSIFICATION_TASKS:
        problems.append(Problem("eval.exact_match", f"{task.type} predicts labels, it generates no text to match "
                                "(its accuracy / F1 are computed at every evaluation)",
                                hint="set eval.exact_match: false"))
    if recipe.method.name in OTHER_ADAPTER_METHODS:
        problems.append(Problem("method.name", f"method {recipe.method.name} is verified with causal_lm only; with "
                                f"{task.type} it is not (prompt tuning's virtual tokens would shift token labels, "
                                "the bottleneck adapters and IA3 defaults are placed for decoder LMs)",
                                hint="use method lora, dora, qlora, freeze or full for this task"))
    if recipe.kernels:
        problems.append(Problem("kernels", f"the fused kernels patch decoder language models (fused_ce replaces the "
                                f"LM loss) and are not verified with {task.type} models", hint="set kernels: []"))
    encoder_decoder = model_is_encoder_decoder(recipe)
    if task.type == "seq2seq" and encoder_decoder is False:
        problems.append(Problem("task.type", "seq2seq trains an encoder-decoder model (AutoModelForSeq2SeqLM), but "
                                "the model's config.json has no is_encoder_decoder: true",
                                hint="use an encoder-decoder model (T5, BART), or task.type: causal_lm with "
                                     "prompt_completion data for a decoder-only model"))
    if task.type in CLASSIFICATION_TASKS and encoder_decoder:
        problems.append(Problem("task.type", f"{task.type} heads are built on encoder or decoder models here; an "
                                "encoder-decoder model's classification head is not supported",
                                hint="use an encoder (BERT-like) or a decoder model, or task.type: seq2seq with "
                                     "the label as target text"))
    if task.type == "seq2seq" and isinstance(recipe.method, FreezeMethod) and recipe.method.trainable_layers:
        problems.append(Problem("method.trainable_layers", "an encoder-decoder model has two stacks of layers, so "
                                "'the top N layers' is ambiguous", hint="name them with method.trainable_patterns "
                                "(e.g. 'decoder\\.block\\.[5-7]\\.')"))
    if isinstance(recipe.method, QLoraMethod) and recipe.output.merge:
        problems.append(Problem("output.merge", f"merging a QLoRA adapter reloads the base as a causal LM; it is not "
                                f"implemented for {task.type}", hint="set output.merge: false (the adapter loads with "
                                "PeftModel.from_pretrained onto the base)"))
    return problems


def schedule_problems(recipe: Recipe) -> list[Problem]:
    """Watched metrics (early stopping, keep_best) that no evaluation writes, and per-layer schedules that cannot
    apply."""
    problems: list[Problem] = []
    if recipe.early_stopping is not None:
        problems += metric_problems(recipe, "early_stopping.metric", recipe.early_stopping.metric)
    ckpt = recipe.checkpoint
    if ckpt.keep_best is not None:
        problems += metric_problems(recipe, "checkpoint.keep_best", ckpt.keep_best)
        if recipe.eval.every_steps is None:
            problems.append(Problem("checkpoint.keep_best", "keeping the best checkpoint needs periodic evaluation "
                                    "(without it the only evaluation is the last step's)",
                                    hint="set eval.every_steps"))
    if ckpt.final_from_best and ckpt.keep_best is None:
        problems.append(Problem("checkpoint.final_from_best", "final outputs from the best checkpoint need a best "
                                "checkpoint", hint="set checkpoint.keep_best: METRIC (e.g. eval_loss)"))
    unfreeze = getattr(recipe.method, "unfreeze", None)
    layered = [key for key, on in (("optim.layer_lr_decay", recipe.optim.layer_lr_decay is not None),
                                   ("method.unfreeze", unfreeze is not None)) if on]
    if layered and task_type(recipe) == "seq2seq":
        # An encoder-decoder has two stacks of layers: "depth below the top" has no single meaning there.
        problems += [Problem(key, "per-layer schedules need one stack of layers; a seq2seq model has an encoder and "
                             "a decoder stack", hint=f"remove {key}") for key in layered]
    return problems


def strategy_problems(recipe: Recipe, resources: Resources, strategy: str) -> list[Problem]:
    """Combinations of strategy, options, method and kernels that cannot work. Each says what to change."""
    problems: list[Problem] = []
    ds, fsdp, method = recipe.strategy.deepspeed, recipe.strategy.fsdp, recipe.method
    capabilities = strategy_spec(strategy)
    stage = capabilities.zero_stage
    explicit = recipe.strategy.name != "auto"

    if recipe.task.type != "causal_lm" and (capabilities.shards_parameters or capabilities.exports_from_checkpoint):
        # Not known to fail, but not run: heads under sharding (FSDP units, ZeRO partitions), their export from the
        # checkpoint, and collective generation of seq2seq models were not tested. Refused rather than risked.
        problems.append(Problem("strategy.name", f"{recipe.task.type} is verified with ddp only; {strategy} "
                                "(sharded or engine-owned weights) has not been tested with task heads or "
                                "encoder-decoder models", hint="use strategy.name: ddp"))

    # Options for a strategy that is not the one running are silently ignored otherwise.
    if explicit and capabilities.options != "deepspeed" and ds.model_fields_set:
        problems.append(Problem("strategy.deepspeed", f"DeepSpeed options are set but strategy.name is {strategy}",
                                hint="remove strategy.deepspeed, or set strategy.name to zero1, zero2 or zero3"))
    if explicit and capabilities.options != "fsdp" and fsdp.model_fields_set:
        problems.append(Problem("strategy.fsdp", f"FSDP options are set but strategy.name is {strategy}",
                                hint="remove strategy.fsdp, or set strategy.name: fsdp"))

    if stage is not None:
        if stage < 3 and ds.offload_params != "none":
            problems.append(Problem(
                "strategy.deepspeed.offload_params",
                f"ZeRO-{stage} keeps a full copy of the weights on every rank, so offload_params "
                f"({ds.offload_params}) would be ignored",
                hint="set strategy.name: zero3, or strategy.deepspeed.offload_params: none"))
        if stage < 3 and ds.offload_optimizer == "nvme":
            problems.append(Problem(
                "strategy.deepspeed.offload_optimizer",
                f"NVMe optimizer offload (ZeRO-Infinity) needs ZeRO-3; ZeRO-{stage} would silently use CPU memory",
                hint="set strategy.name: zero3, or strategy.deepspeed.offload_optimizer: cpu"))
        uses_nvme = "nvme" in (ds.offload_optimizer, ds.offload_params)
        if uses_nvme and not ds.nvme_path:
            problems.append(Problem("strategy.deepspeed.nvme_path", "nvme offload needs a directory",
                                    hint="set strategy.deepspeed.nvme_path to a directory on a local NVMe disk"))
        if ds.nvme_path and not uses_nvme:
            problems.append(Problem("strategy.deepspeed.nvme_path", "nvme_path is set but nothing is offloaded to nvme",
                                    hint="set offload_optimizer/offload_params: nvme, or remove nvme_path"))
        if resources.device == "cpu" and (ds.offload_optimizer != "none" or ds.offload_params != "none"):
            problems.append(Problem("strategy.deepspeed", "offloading to CPU/NVMe needs GPUs (on CPU everything "
                                    "already lives in CPU memory)", hint="set offload_optimizer/offload_params: none"))
        if stage == 3 and uses_fused_ce(recipe):
            problems.append(Problem(
                "kernels",
                "fused_ce reads lm_head.weight directly inside the loss, so ZeRO-3 never gathers the partitioned "
                "weight (it only gathers around a module's forward): the loss would use an empty tensor",
                hint="remove fused_ce from kernels, or use strategy.name: zero2 / fsdp"))

    if capabilities.options == "fsdp":
        world = resources.world_size
        if fsdp.hybrid_shard_size is not None and (world % fsdp.hybrid_shard_size or fsdp.hybrid_shard_size > world):
            problems.append(Problem("strategy.fsdp.hybrid_shard_size",
                                    f"hybrid_shard_size({fsdp.hybrid_shard_size}) must divide the world size({world})",
                                    hint=f"use a divisor of {world}, e.g. the GPUs per node"))
        if fsdp.cpu_offload and resources.device == "cpu":
            problems.append(Problem("strategy.fsdp.cpu_offload", "cpu_offload needs GPUs (on CPU the shards are "
                                    "already in CPU memory)", hint="set strategy.fsdp.cpu_offload: false"))
        if "float16" in (recipe.model.dtype, fsdp.param_dtype):
            problems.append(Problem("strategy.fsdp.param_dtype", "float16 under FSDP needs a sharded gradient "
                                    "scaler, which this trainer does not have", hint="use bfloat16"))
        # Our FSDP wrap keeps lm_head in the root unit, whose parameters stay gathered for the whole forward, so a
        # fused CE reading lm_head.weight sees the full tensor. Tied embeddings are in the root unit too.

    if getattr(method, "unfreeze", None) is not None and not capabilities.trainable_set_may_change:
        why = ("its engine flattens and partitions the parameters that are trainable when it starts"
               if capabilities.zero_stage is not None else
               "its sharded gradient reduction is not verified with parameters frozen and unfrozen between steps")
        problems.append(Problem(
            "method.unfreeze", f"gradual unfreezing changes which parameters train between steps; {strategy} "
            f"cannot follow: {why}", hint="use strategy.name: ddp, or remove method.unfreeze"))

    problems += method_strategy_problems(recipe, strategy)
    if isinstance(method, QuantFields):
        if method.bits == 8 and capabilities.dtensor_parameters:
            problems.append(Problem(
                "method.bits", "8-bit weights (LLM.int8 Int8Params with their SCB statistics) cannot be sharded by "
                "FSDP", hint="use method.bits: 4 with quant_storage matching model.dtype, or strategy.name: ddp"))
        elif capabilities.shards_parameters and method.quant_storage not in ("auto", recipe.model.dtype):
            problems.append(Problem(
                "method.quant_storage",
                f"{strategy} shards the packed 4-bit weights as {method.quant_storage} tensors, but the other weights "
                f"are {recipe.model.dtype}: every sharded tensor of a unit must share one dtype",
                hint=f"set method.quant_storage: {recipe.model.dtype} (or auto)"))
    return problems


def quant_problems(recipe: Recipe, strategy: str) -> list[Problem]:
    """Quantization settings that cannot work. Each names the key and the fix.

    The sharding rules shared with FSDP (8-bit weights under fsdp; a quant_storage other than the model dtype under
    fsdp/zero3) are in `strategy_problems` with the rest of the strategy checks; these are the ones it leaves:
    8-bit weights under ZeRO-3, a storage dtype given for 8-bit weights, and bitsandbytes optimizers under FSDP.
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


def unsupported(recipe: Recipe, strategy: str, world_size: int = 1) -> list[str]:
    """What this version cannot run yet, although the recipe is valid (planning and sizing still work)."""
    reasons = []
    if strategy not in IMPLEMENTED_STRATEGIES:
        reasons.append(f"strategy.name: strategy {strategy!r} is not implemented in this version "
                       f"(implemented: {', '.join(IMPLEMENTED_STRATEGIES)}; `auto` without --gpu-mem picks ddp)")
    return reasons


def incompatible_rows(recipe: Recipe, resources: Resources, row_names: list[str]) -> dict[str, str]:
    """Memory row -> the first reason the rest of the recipe rules its strategy out (what `launch plan` would refuse
    with it), so that `auto` picks only among strategies the run can use."""
    from launcher.plan.quant import resolve_quant_storage
    from launcher.strategies import strategy_of_memory_row

    out: dict[str, str] = {}
    for name in row_names:
        strategy = strategy_of_memory_row(name)
        resolved = resolve_quant_storage(recipe, strategy)
        found = strategy_problems(resolved, resources, strategy) + quant_problems(resolved, strategy)
        if found:
            first = found[0]
            out[name] = f"{first.path}: {first.message}" + (f" ({first.hint})" if first.hint else "")
        elif not_run := unsupported(resolved, strategy, resources.world_size):
            out[name] = not_run[0]
    return out
