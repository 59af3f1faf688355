"""Where a run executes, behind one interface: this machine (cluster/local.py) or Slurm (cluster/slurm_executor.py).

submitit's `Executor` is the model: an executor is built from the resources asked for, plans a recipe on them,
submits a run, resubmits an existing run directory on its own resources (a resume, possibly on another world size),
and reports a run's status or cancels it. The CLI only parses flags into an executor and prints what comes back.

Submitting is two calls, `prepare` then `start`, so the caller can say where the run directory is before a local
run takes the foreground. `prepare` checks everything before it writes: a refused submission leaves no run directory
behind (the name it claimed is given back while still empty).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import SubmitError
from launcher.common.rundir import claim_run_dir, is_fresh, next_run_dir, release_run_dir
from launcher.config.recipe import LoadedRecipe, Problem
from launcher.plan.build import Plan
from launcher.plan.files import write_plan

__all__ = ["Executor", "PreparedRun", "Submission", "SubmitError", "require_runnable", "resume_notes",
           "loaded_from_plan"]


@dataclass
class PreparedRun:
    """A run planned for a run directory; after `prepare`, also checked and written, not yet started."""

    run_dir: Path
    plan: Plan
    loaded: LoadedRecipe
    resumed: bool = False
    notes: list[str] = field(default_factory=list)
    """What the user should read before it starts: request warnings, resume notes (`resume: 2 -> 1 ranks ...`)."""
    context: Any = field(default=None, repr=False)
    """The executor's own state between prepare and start (Slurm settings and secrets: never printed)."""


@dataclass(frozen=True)
class Submission:
    """What starting a run gave back."""

    run_dir: Path
    job_id: str | None = None
    """The scheduler's job id (None for a run on this machine)."""
    returncode: int | None = None
    """A run on this machine ran in the foreground: its exit code (see launcher/common/exits.py)."""
    description: str = ""
    """What was submitted, in one line (`Slurm job 12: 2 node(s) x 4 rank(s), partition gpu, time 01:00:00`)."""
    notes: tuple[str, ...] = ()
    """Lines for the user, e.g. the tokenize-first job the training job waits on."""


def require_runnable(plan: Plan) -> None:
    if not plan.runnable:
        raise SubmitError("this plan cannot run in this version:\n  " + "\n  ".join(plan.unsupported))


def require_data(loaded: LoadedRecipe) -> None:
    """A run is not created while its data files are missing or unreadable (launcher/plan/checks.py). Hub datasets
    not in the local Hub cache are downloaded into it first, here on the submitting machine, since the ranks read
    them offline (launcher/common/hub_data.py); `launch plan` without --out never downloads."""
    from launcher.config.recipe import RecipeError
    from launcher.plan.checks import data_problems

    found = fetch_hub_data(loaded)
    found += data_problems(loaded.recipe)
    if found:
        raise RecipeError(loaded.with_locations(found), source=f"{loaded.source} (data)")


def fetch_hub_data(loaded: LoadedRecipe) -> list[Problem]:
    """Download each Hub dataset of the recipe that is not cached; a Problem (naming `data.train.N.hub`) for each
    that fails."""
    from launcher.common import hub_data
    from launcher.plan.checks import sources

    found: list[Problem] = []
    for key, source in sources(loaded.recipe):
        if source.hub is None or hub_data.local_snapshot(source.hub, source.revision) is not None:
            continue
        try:
            hub_data.download(source.hub, source.revision)
        except Exception as err:  # noqa: BLE001 (huggingface_hub's HTTP, connection and disk errors alike)
            found.append(Problem(f"{key}.hub", f"downloading {source.hub} into the Hub cache "
                                 f"({hub_data.repo_cache(source.hub)}) failed: {type(err).__name__}: {err}",
                                 hint=hub_data.fix_hint(source)))
    return found


def resume_notes(plan: Plan) -> list[str]:
    """The re-plan's `resume: A -> B ranks ...` warnings (replan_for_resume), which a user resuming must see."""
    return [w for w in plan.warnings if w.startswith("resume:")]


def loaded_from_plan(plan: Plan) -> LoadedRecipe:
    """The recipe a run directory's plan was made from (plan.json is the contract of a run being resumed)."""
    return LoadedRecipe(recipe=plan.typed_recipe(), source=Path(plan.recipe_file), overrides=list(plan.overrides))


def refuse_completed(run_dir: Path) -> None:
    """A completed run has nothing to resume: resuming would re-run its final evaluation and rewrite its outputs."""
    from launcher.common import outcome

    if outcome.completed(run_dir):
        raise SubmitError(f"{run_dir} completed: nothing to resume (start a new run: launch RECIPE)")


def new_run_dir(loaded: LoadedRecipe) -> Path:
    """Where the next run of this recipe goes (`output.root/name`, or the first free `name-N`)."""
    recipe = loaded.recipe
    return next_run_dir(Path(recipe.output.root).resolve(), recipe.output.name or recipe.name)


class Executor(ABC):
    """Plans and runs recipes on one kind of resources."""

    kind: str = ""
    """`local` or `slurm`."""

    # ------------------------------------------------------------------------------------- what each one says
    @abstractmethod
    def plan_run(self, loaded: LoadedRecipe, run_dir: Path) -> PreparedRun:
        """The recipe planned on this executor's resources for `run_dir`; nothing written, nothing checked that
        needs the run directory."""

    def check(self, run: PreparedRun) -> PreparedRun:
        """Checks that need the run directory or the scheduler, before anything is written. Default: none."""
        return run

    def write(self, run: PreparedRun, keep_previous: bool = False) -> None:
        """The run directory's files: plan.json, the strategy's files, and the executor's own."""
        write_plan(run.run_dir, run.plan, keep_previous)

    @abstractmethod
    def prepare_resume(self, run_dir: Path, *, replan: bool = True) -> PreparedRun:
        """An existing run directory made ready to continue from its last checkpoint on this executor's resources
        (replan=False: on the resources it was planned for, plan.json untouched)."""

    @abstractmethod
    def start(self, run: PreparedRun) -> Submission:
        """Start (or queue) a prepared run."""

    def request_warnings(self, run: PreparedRun) -> list[str]:
        """What is doubtful about the resources asked for, found without submitting (`launch plan`)."""
        return []

    # --------------------------------------------------------------------------------------- the shared flow
    def plan(self, loaded: LoadedRecipe, run_dir: Path | None = None) -> Plan:
        return self.plan_run(loaded, run_dir or new_run_dir(loaded)).plan

    def prepare(self, loaded: LoadedRecipe) -> PreparedRun:
        """A new run: plan and check everything, then claim a run directory and write it."""
        run = self.plan_run(loaded, new_run_dir(loaded))  # validate everything before a directory exists
        require_runnable(run.plan)
        require_data(loaded)
        run_dir = claim_run_dir(run.run_dir.parent, run.run_dir.name)
        try:
            if run_dir != run.run_dir:  # lost a race for the name: re-plan into the directory we own
                run = self.plan_run(loaded, run_dir)
            run = self.check(run)
            self.write(run)
        except BaseException:
            release_run_dir(run_dir)
            raise
        return run

    def dry_run(self, loaded: LoadedRecipe, out: Path | None = None) -> tuple[PreparedRun, list[str]]:
        """`launch plan`: the plan and what is doubtful about the request; nothing started, and nothing written
        unless `out` names a run directory to write (created; empty or only planned), which `launch --resume OUT`
        (or `sbatch OUT/job.sbatch`) then runs."""
        if out is None:
            run = self.plan_run(loaded, new_run_dir(loaded))
            return run, self.request_warnings(run)
        out = out.resolve()
        if out.exists() and not is_fresh(out):
            raise SubmitError(f"--out {out} is not empty (a run directory holds more than a plan there): "
                              "choose a new directory")
        run = self.plan_run(loaded, out)  # every check passes before the directory is made
        require_data(loaded)  # a written run directory is one `launch --resume` can run
        out.mkdir(parents=True, exist_ok=True)
        self.write(run)
        return run, self.request_warnings(run)

    # -------------------------------------------------------------------------------------- any run directory
    @staticmethod
    def status(run_dir: Path) -> Any:
        """The run's state (cluster/runs.py): from the scheduler for a Slurm run, from its files for a local one."""
        from cluster.runs import run_status

        return run_status(run_dir)

    @staticmethod
    def cancel(run_dir: Path) -> list[str]:
        from cluster.runs import cancel_run

        return cancel_run(run_dir)

