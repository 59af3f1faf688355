"""Slurm behind the executor interface: a recipe planned on the resolved Slurm layout, checked against the cluster
(sinfo, shared storage, pass-through secrets), written with its `job.sbatch` and `cluster.json`, and submitted
through submitit (cluster/slurm.py does each of those steps; this module orders them).

A resumed run takes what is given now and, for the rest, what it was submitted with (RUN_DIR/cluster.json).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.errors import SubmitError
from cluster.executor import (Executor, PreparedRun, Submission, loaded_from_plan, refuse_completed,
                              require_runnable, resume_notes)
from cluster.slurm import (CLUSTER_FILE, SBATCH_FILE, SlurmSettings, load_profile, local_profile_warning, preflight,
                           render_sbatch, srun_command,
                           resolve_settings, secret_values, submit, submit_array,
                           submit_prepare)
from launcher.common.rundir import write_json_atomic, write_text_atomic
from launcher.config.recipe import LoadedRecipe
from launcher.config.schema import Recipe
from launcher.plan.build import make_plan, replan_for_resume
from launcher.plan.files import load_plan
from launcher.plan.resources import Resources

MissingPreparation = Callable[[Recipe], "str | None"]
"""Why a CPU job must tokenize before training (None: the data is cached); it loads the tokenizer, so the caller
supplies it (launcher/train/prepare.py is rank side, which cluster/ never imports)."""


@dataclass(frozen=True)
class SlurmRequest:
    """The Slurm resources asked for on the command line; None means: from the profile and the recipe (or, for a
    resumed run, what it was submitted with)."""

    profile: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    procs: int | None = None
    """Ranks per node on CPU nodes (on GPU nodes there is one rank per GPU)."""
    partition: str | None = None
    time: str | None = None
    gpu_mem_bytes: int | None = None
    """Memory of one GPU, for the memory planner's fits and auto choices."""
    offline: bool = False
    """`launch plan --offline`: plan for a cluster this machine cannot reach (or is not on): no sinfo checks."""

    def recorded(self, run_dir: Path) -> "SlurmRequest":
        """Unset fields filled from RUN_DIR/cluster.json (the run's last submission)."""
        path = run_dir / CLUSTER_FILE
        recorded: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        gpus = self.gpus_per_node if self.gpus_per_node is not None else recorded.get("gpus_per_node")
        procs = self.procs
        if procs is None and not gpus and self.nodes is None:  # same CPU layout unless a new one is named
            procs = recorded.get("ranks_per_node")
        return dataclasses.replace(
            self, profile=self.profile or recorded.get("profile"),
            nodes=self.nodes if self.nodes is not None else recorded.get("nodes", 1), gpus_per_node=gpus,
            procs=procs, partition=self.partition or recorded.get("partition"), time=self.time or recorded.get("time"))


@dataclass
class SlurmContext:
    """What a prepared Slurm run carries to `start`."""

    settings: SlurmSettings
    secrets: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    prepare_reason: str | None = None


def job_name(recipe: Recipe) -> str:
    return f"ftlaunch-{recipe.output.name or recipe.name}"


class SlurmExecutor(Executor):
    kind = "slurm"

    def __init__(self, request: SlurmRequest, missing_preparation: MissingPreparation | None = None) -> None:
        self.request = request
        self.missing_preparation = missing_preparation

    def settings(self, recipe: Recipe, request: SlurmRequest | None = None) -> SlurmSettings:
        """profile < recipe `cluster:` < the request."""
        r = request or self.request
        return resolve_settings(r.profile, recipe.cluster, nodes=r.nodes or 1, gpus_per_node=r.gpus_per_node,
                                partition=r.partition, time_limit=r.time, procs=r.procs)

    def resources(self, settings: SlurmSettings) -> Resources:
        return Resources(nodes=settings.nodes, gpus_per_node=settings.gpus_per_node,
                         procs_per_node=settings.tasks_per_node, gpu_mem_bytes=self.request.gpu_mem_bytes)

    def plan_run(self, loaded: LoadedRecipe, run_dir: Path) -> PreparedRun:
        settings = self.settings(loaded.recipe)
        plan = make_plan(loaded, self.resources(settings), run_dir)
        return self._with_sbatch(PreparedRun(run_dir=run_dir, plan=plan, loaded=loaded,
                                              context=SlurmContext(settings)))

    @staticmethod
    def _with_sbatch(run: PreparedRun) -> PreparedRun:
        """The plan holding the batch script its settings render (also RUN_DIR/job.sbatch)."""
        sbatch = render_sbatch(run.context.settings, run.plan.run_dir, job_name(run.loaded.recipe),
                               recipe_file=run.plan.recipe_file)
        # The command shown as the plan's launch command is the job step job.sbatch runs, not this machine's
        # torchrun line.
        command = srun_command(run.context.settings, run.plan.run_dir)
        return dataclasses.replace(run, plan=dataclasses.replace(run.plan, sbatch=sbatch, command=command))

    def check(self, run: PreparedRun) -> PreparedRun:
        """sinfo (partition, sizes), shared storage, secrets to pass through, and whether data must be prepared."""
        settings, warnings = preflight(run.context.settings, run.run_dir)
        recipe = run.loaded.recipe
        secrets, missing = secret_values(settings, recipe.cluster, load_profile(settings.profile))
        if missing:
            raise SubmitError(f"cluster.env lists {', '.join(missing)}, to be passed from this environment, but "
                              "they are not set here: export them before `launch`")
        # Before anything is written: a tokenizer that cannot load fails here, not in a queued job.
        reason = None
        if settings.tokenize_first and self.missing_preparation is not None:
            reason = self.missing_preparation(recipe)
        # again with the sbatch: preflight may have filled in the default partition
        run = self._with_sbatch(dataclasses.replace(run, context=SlurmContext(settings, secrets, reason)))
        return dataclasses.replace(run, notes=[*run.notes, *warnings])

    def write(self, run: PreparedRun, keep_previous: bool = False) -> None:
        super().write(run, keep_previous)
        write_text_atomic(run.run_dir / SBATCH_FILE, run.plan.sbatch or "", mode=0o755)
        write_json_atomic(run.run_dir / CLUSTER_FILE, run.context.settings.to_json())

    def prepare_resume(self, run_dir: Path, *, replan: bool = True) -> PreparedRun:
        """The run re-planned on the requested (else recorded) Slurm resources; refused while a job of it is queued or
        running (two jobs would write one run directory)."""
        from cluster.runs import ACTIVE_STATES, run_status

        refuse_completed(run_dir)
        status = run_status(run_dir)
        if status.state in ACTIVE_STATES:
            raise SubmitError(f"{run_dir} still has Slurm job {status.job_id} {status.state}: two jobs would write "
                              f"one run directory; stop it first (launch cancel {run_dir})")
        previous = load_plan(run_dir)
        request = self.request.recorded(run_dir)
        settings = self.settings(previous.typed_recipe(), request)
        plan = replan_for_resume(previous, self.resources(settings), run_dir) if replan else previous
        require_runnable(plan)
        run = self._with_sbatch(PreparedRun(run_dir=run_dir, plan=plan, loaded=loaded_from_plan(plan), resumed=True,
                                            context=SlurmContext(settings)))
        run = self.check(run)
        run.notes.extend(resume_notes(plan))
        self.write(run, keep_previous=True)
        return run

    def start(self, run: PreparedRun) -> Submission:
        context: SlurmContext = run.context
        name = job_name(run.loaded.recipe)
        dependency, notes = None, []
        if context.prepare_reason is not None:
            prepare_id = submit_prepare(run.run_dir, context.settings, context.secrets, name, context.prepare_reason)
            dependency = f"afterok:{prepare_id}"
            notes.append(f"tokenize first: {context.prepare_reason}: CPU job {prepare_id} prepares it; the training "
                         f"job starts after it (--dependency={dependency})")
        job_id = submit(run.run_dir, context.settings, context.secrets, name, dependency=dependency)
        s = context.settings
        return Submission(run_dir=run.run_dir, job_id=job_id, notes=tuple(notes),
                          description=f"Slurm job {job_id}: {s.nodes} node(s) x {s.tasks_per_node} rank(s), "
                                      f"partition {s.partition}, time {s.time}")

    def start_array(self, folder: Path, name: str, runs: list[PreparedRun],
                    max_parallel: int | None) -> list[Submission]:
        """Checked and written runs of one shape (a sweep's trials) as one job array named `ftlaunch-<name>`, after
        one CPU tokenize job per distinct missing cache entry (trials that share data share it)."""
        first: PreparedRun = runs[0]
        context: SlurmContext = first.context
        reasons: dict[str, PreparedRun] = {}
        for run in runs:  # the first trial needing an entry holds its tokenize job (logs/prepare.log there)
            if run.context.prepare_reason is not None:
                reasons.setdefault(run.context.prepare_reason, run)
        prepare_ids = [submit_prepare(run.run_dir, context.settings, context.secrets, job_name(run.loaded.recipe),
                                      reason) for reason, run in reasons.items()]
        dependency = f"afterok:{':'.join(prepare_ids)}" if prepare_ids else None
        notes = (f"tokenize first: CPU job(s) {', '.join(prepare_ids)}; the array starts after them",) if prepare_ids \
            else ()
        ids = submit_array(folder, [run.run_dir for run in runs], context.settings, context.secrets,
                           f"ftlaunch-{name}", max_parallel, dependency)
        s = context.settings
        return [Submission(run_dir=run.run_dir, job_id=job_id, notes=notes,
                           description=f"Slurm array element {job_id}: {s.nodes} node(s) x {s.tasks_per_node} "
                                       f"rank(s), partition {s.partition}, time {s.time}")
                for run, job_id in zip(runs, ids)]

    def request_warnings(self, run: PreparedRun) -> list[str]:
        """`launch plan` on a machine with Slurm checks the request as `launch` would; without Slurm it says so."""
        settings = run.context.settings
        warnings = [w for w in [local_profile_warning(self.request.profile, settings.gpus_per_node)] if w]
        if self.request.offline:
            return [*warnings, "--offline: partition, node sizes and limits not checked against a Slurm controller "
                               "(`launch` checks them when it submits)"]
        if shutil.which("sinfo") is None:
            return [*warnings, "Slurm is not on PATH here: partition and sizes not checked"]
        return [*warnings, *preflight(settings, run.run_dir, need_cluster=False)[1]]
