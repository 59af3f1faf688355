"""Resolve a Recipe and the resources it runs on into a Plan: layout, strategy, per-rank command, checks.

A Plan is plain data (it is written to RUN_DIR/plan.json and read back by every rank), so it is a frozen dataclass of
JSON types. Planning imports no torch: it must answer on a login node in well under a second.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config.recipe import LoadedRecipe, Problem, RecipeError
from launcher.plan.resources import Resources
from launcher.config.schema import Recipe
from launcher.strategies import STRATEGIES

if TYPE_CHECKING:
    from launcher.plan.memory import MemoryPlan

PLAN_VERSION = 1

@dataclass(frozen=True)
class Plan:
    """Everything a rank needs to run, resolved. Serialised to RUN_DIR/plan.json."""

    run_dir: str
    """Absolute run directory."""

    recipe_file: str
    """The recipe file that was loaded."""

    overrides: list[str]
    """Command-line overrides applied to it."""

    recipe: dict[str, Any]
    """The resolved recipe (all defaults filled in, paths absolute)."""

    nodes: int
    gpus_per_node: int
    procs_per_node: int
    world_size: int
    device: str
    """`cpu` or `cuda`."""

    backend: str
    """torch.distributed backend: gloo on CPU, nccl on GPUs."""

    strategy: str
    """The resolved strategy (never `auto`)."""

    strategy_reason: str
    """Why this strategy was chosen."""

    command: list[str]
    """The command that starts the job on this machine (torchrun for several local ranks)."""

    rank_command: list[str]
    """The command each rank runs (what srun starts on a cluster)."""

    warnings: list[str] = field(default_factory=list)
    """Things worth knowing that do not stop the run."""

    unsupported: list[str] = field(default_factory=list)
    """Why this version cannot run the plan (it can still be planned and sized). Empty = runnable."""

    memory: dict[str, Any] | None = None
    """Per-GPU memory estimate per strategy (launcher/plan/memory_model.py), when the model's config.json is readable."""

    strategy_config: dict[str, Any] | None = None
    """Resolved strategy settings (launcher/plan/strategy_config.py): the complete DeepSpeed JSON for zero1/2/3 (also written to
    RUN_DIR/ds_config.json), the FSDP settings for fsdp, None for ddp."""

    sbatch: str | None = None
    """The equivalent Slurm batch script (also RUN_DIR/job.sbatch) when the plan targets Slurm (`--nodes N > 1` or
    `--cluster NAME`); rendered by cluster/slurm.py from the cluster profile + the recipe's `cluster:` section."""

    schedules: dict[str, Any] | None = None
    """Per-layer schedules when the recipe asks for them (launcher/plan/schedules.py): the lr of each depth
    (`optim.layer_lr_decay`) and the order of gradual unfreezing (`method.unfreeze`); None otherwise."""

    @property
    def runnable(self) -> bool:
        return not self.unsupported

    version: int = PLAN_VERSION

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "runnable": self.runnable}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Plan":
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan.json version {data.get('version')} != {PLAN_VERSION}: re-plan this run")
        return Plan(**{k: v for k, v in data.items() if k != "runnable"})

    def typed_recipe(self) -> Recipe:
        return Recipe.model_validate(self.recipe)


def local_gpu_count() -> int:
    """GPUs visible on this machine, without importing torch (nvidia-smi, honouring CUDA_VISIBLE_DEVICES)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def resolve_strategy(recipe: Recipe, resources: Resources, memory: "MemoryPlan | None") -> tuple[str, str]:
    """The concrete strategy and the reason for it.

    `auto` takes the memory planner's choice (fastest strategy that fits, in the order of
    `launcher.plan.memory_model.DEFAULT_STRATEGY_ORDER`) when the GPU memory and the model's dimensions are known; otherwise
    DDP, which is correct on any world size and fastest whenever a full copy of the model states fits.
    """
    requested = recipe.strategy.name
    if requested != "auto":
        return requested, f"set in the recipe (strategy.name: {requested})"
    if memory is not None and memory.chosen is not None:
        return memory.chosen_strategy, f"auto, by memory: {memory.reason}"
    if memory is not None and resources.gpu_mem_bytes is not None:
        return "ddp", f"auto: {memory.reason}"
    if resources.world_size == 1:
        return "ddp", "auto: one rank, nothing to shard (DDP with world size 1 is plain training)"
    return "ddp", (f"auto: {resources.world_size} ranks and no GPU memory given (--gpu-mem): DDP, each rank holding "
                   "full weights, gradients and optimizer states")


def rank_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launcher.train.job", str(run_dir)]


def local_command(run_dir: Path, resources: Resources) -> list[str]:
    if resources.procs_per_node == 1 and resources.nodes == 1:
        return rank_command(run_dir)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={resources.procs_per_node}", "-m", "launcher.train.job", str(run_dir)]


def make_plan(loaded: LoadedRecipe, resources: Resources, run_dir: Path) -> Plan:
    """Resolve a loaded recipe on the given resources. Raises RecipeError when a check fails."""
    from launcher.plan.checks import incompatible_rows
    from launcher.plan.memory import plan_memory  # stdlib-only planner

    recipe = loaded.recipe
    memory, memory_problems = plan_memory(recipe, resources, incompatible_rows)
    if memory is not None and memory.micro_batch is not None and recipe.optim.micro_batch == "auto":
        recipe = recipe.model_copy(update={"optim": recipe.optim.model_copy(update={"micro_batch": memory.micro_batch})})
    strategy, reason = resolve_strategy(recipe, resources, memory)
    from launcher.plan import checks
    from launcher.plan.quant import quant_warnings, resolve_quant_storage
    from launcher.plan.strategy_config import strategy_config
    from launcher.plan.schedules import plan_schedules

    recipe = resolve_quant_storage(recipe, strategy)  # plan.json holds the concrete packed-weight dtype
    problems = memory_problems + checks.problems(recipe, resources, strategy)
    if problems:
        raise RecipeError(loaded.with_locations(problems), source=f"{loaded.source} (plan)")
    warnings: list[str] = list(memory.warnings) if memory is not None else []
    warnings += quant_warnings(recipe, resources, memory)
    warnings += [f"{p.path}: {p.message} (`launch` refuses to start without it)" for p in checks.data_problems(recipe)]
    if memory is None:
        warnings.append("memory: no estimate (the model's config.json is not readable here; a GGUF model is sized "
                        "after its first conversion)")
    return Plan(
        run_dir=str(run_dir.resolve()),
        recipe_file=str(loaded.source),
        overrides=list(loaded.overrides),
        recipe=recipe.model_dump(mode="json"),
        nodes=resources.nodes,
        gpus_per_node=resources.gpus_per_node,
        procs_per_node=resources.procs_per_node,
        world_size=resources.world_size,
        device=resources.device,
        backend="nccl" if resources.device == "cuda" else "gloo",
        strategy=strategy,
        strategy_reason=reason,
        command=local_command(run_dir.resolve(), resources),
        rank_command=rank_command(run_dir.resolve()),
        warnings=warnings,
        unsupported=checks.unsupported(recipe, strategy, resources.world_size),
        memory=memory.to_json() if memory is not None else None,
        strategy_config=strategy_config(recipe, resources, strategy, memory.chosen if memory is not None else None),
        schedules=plan_schedules(recipe),
    )


def replan_for_resume(previous: Plan, resources: Resources, run_dir: Path | None = None) -> Plan:
    """The plan of a run resumed on other resources: same recipe, same strategy, same global batch.

    The global batch (micro_batch x grad_accum x world_size) is what the optimizer and the LR schedule were tuned for;
    keeping it makes a resumed run continue the uninterrupted curve (measured in tests/integration/test_strategies.py:
    FSDP and ZeRO 2 -> 1 rank within 3e-7). grad_accum absorbs the change; where it cannot (the global batch is not a
    multiple of micro_batch x new world size) this refuses and names the world sizes that can. The strategy stays:
    its checkpoint format (DCP, DeepSpeed, full state) is what the run directory holds. `run_dir`: where the run
    is now, when it was moved or copied since it was planned.
    """
    recipe = previous.typed_recipe()
    optim = recipe.optim
    micro = int(optim.micro_batch)  # plan.json holds a concrete value: `auto` was resolved when the run was planned
    global_batch = micro * optim.grad_accum * previous.world_size
    per_step = micro * resources.world_size
    if global_batch % per_step:
        fits = [w for w in range(1, global_batch // micro + 1) if (global_batch // micro) % w == 0]
        raise RecipeError([Problem(
            "optim.grad_accum",
            f"the run's global batch {global_batch} (micro_batch({micro}) * grad_accum({optim.grad_accum}) * "
            f"world_size({previous.world_size})) is not a multiple of micro_batch({micro}) * world_size"
            f"({resources.world_size}): resuming would change the batch the run was trained with",
            hint=f"resume on a world size that divides {global_batch // micro}: {', '.join(map(str, fits))}")],
            source=f"{previous.run_dir} (resume)")
    # Rebuilt from its non-default values: a recipe read back from plan.json has every field "set", which would
    # defeat the checks and choices that depend on what the user wrote (options of an unused strategy, auto offload).
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data["optim"] = {**data.get("optim", {}), "grad_accum": global_batch // per_step}
    if optim.global_batch is not None:
        data["optim"]["global_batch"] = global_batch
    options = data.get("strategy", {})
    own = STRATEGIES[previous.strategy].options
    data["strategy"] = {"name": previous.strategy, **({own: options[own]} if own in options else {})}
    recipe = Recipe.model_validate(data)
    loaded = LoadedRecipe(recipe=recipe, source=Path(previous.recipe_file), overrides=list(previous.overrides))
    plan = make_plan(loaded, resources, run_dir or Path(previous.run_dir))
    if resources.world_size != previous.world_size:
        note = (f"resume: {previous.world_size} -> {resources.world_size} ranks; grad_accum {optim.grad_accum} -> "
                f"{recipe.optim.grad_accum} keeps the global batch {global_batch}")
        plan = replace(plan, warnings=[note, *plan.warnings])
    return plan
