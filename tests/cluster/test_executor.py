"""The executor interface (cluster/executor.py) without a scheduler: what `prepare` writes and what it leaves when
refused, a resume re-planned on other resources, and a Slurm request completed from what a run was submitted with.
Submission to a real Slurm is tested in tests/integration/test_slurm_launch.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.errors import SubmitError
from cluster.executor import PreparedRun
from cluster.local import LocalExecutor
from cluster.slurm import CLUSTER_FILE
from cluster.slurm_executor import SlurmRequest
from launcher.common.rundir import PLAN_FILE, PLAN_HISTORY_DIR
from launcher.config.recipe import load_recipe
from launcher.plan.files import load_plan, write_plan
from launcher.plan.resources import Resources


def recipe(tmp_path: Path, **optim: object) -> Path:
    data = {"name": "t", "model": {"path": "m"}, "data": {"train": {"path": "t.jsonl"}},
            "optim": {"micro_batch": 2, "grad_accum": 2, **optim}, "output": {"root": str(tmp_path / "runs")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')  # a run is not created without its data
    return path


def test_prepare_claims_a_fresh_directory_per_run(tmp_path: Path) -> None:
    executor = LocalExecutor(Resources())
    first = executor.prepare(load_recipe(recipe(tmp_path)))
    second = executor.prepare(load_recipe(recipe(tmp_path)))
    assert (first.run_dir.name, second.run_dir.name) == ("t", "t-2")
    # the plan names the directory it was written to, after the name was claimed
    assert load_plan(second.run_dir).run_dir == str(second.run_dir)


class RefusingExecutor(LocalExecutor):
    """A check that fails after the run directory was claimed (e.g. Slurm's preflight, a missing secret)."""

    def check(self, run: PreparedRun) -> PreparedRun:
        raise SubmitError("partition 'gpu' has 2 nodes, 4 asked")


def test_a_refused_submission_leaves_no_run_directory(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match="4 asked"):
        RefusingExecutor(Resources()).prepare(load_recipe(recipe(tmp_path)))
    assert list((tmp_path / "runs").iterdir()) == []
    # a planned-only directory (`launch plan`) that the refused submission reused is left as it was
    planned, _ = LocalExecutor(Resources()).dry_run(load_recipe(recipe(tmp_path)), out=tmp_path / "runs" / "t")
    with pytest.raises(SubmitError):
        RefusingExecutor(Resources()).prepare(load_recipe(recipe(tmp_path)))
    assert [p.name for p in planned.run_dir.iterdir()] == [PLAN_FILE]


def test_resume_on_another_world_size_replans_and_keeps_the_old_plan(tmp_path: Path) -> None:
    two_ranks = LocalExecutor(Resources(procs_per_node=2))
    run = two_ranks.prepare(load_recipe(recipe(tmp_path)))
    before = load_plan(run.run_dir)
    resumed = LocalExecutor(Resources()).prepare_resume(run.run_dir)
    assert resumed.resumed and resumed.plan.world_size == 1
    assert resumed.plan.typed_recipe().optim.grad_accum == 4  # the global batch 2 * 2 * 2 is kept
    assert any(note.startswith("resume: 2 -> 1 ranks") for note in resumed.notes)
    history = json.loads((run.run_dir / PLAN_HISTORY_DIR / "001.json").read_text())
    assert history == before.to_json()
    assert load_plan(run.run_dir) == resumed.plan

    same = LocalExecutor(Resources(procs_per_node=2)).prepare_resume(run.run_dir, replan=False)
    assert same.plan == resumed.plan and same.notes == []  # not re-planned: plan.json is the contract
    assert len(list((run.run_dir / PLAN_HISTORY_DIR).iterdir())) == 1


def test_resume_refuses_a_world_size_that_changes_the_global_batch(tmp_path: Path) -> None:
    from launcher.config.recipe import RecipeError

    run = LocalExecutor(Resources(procs_per_node=2)).prepare(load_recipe(recipe(tmp_path, grad_accum=1)))
    with pytest.raises(RecipeError, match="resume on a world size that divides 2: 1, 2"):
        LocalExecutor(Resources(procs_per_node=3)).prepare_resume(run.run_dir)
    assert not (run.run_dir / PLAN_HISTORY_DIR).exists()


def test_a_slurm_request_takes_the_recorded_layout_for_what_is_not_given(tmp_path: Path) -> None:
    (tmp_path / CLUSTER_FILE).write_text(json.dumps({"profile": "big", "nodes": 4, "gpus_per_node": 8,
                                                     "ranks_per_node": 8, "partition": "gpu", "time": "02:00:00"}))
    assert SlurmRequest().recorded(tmp_path) == SlurmRequest(profile="big", nodes=4, gpus_per_node=8,
                                                             partition="gpu", time="02:00:00")
    asked = SlurmRequest(nodes=2, partition="debug").recorded(tmp_path)
    assert (asked.nodes, asked.partition, asked.gpus_per_node, asked.profile) == (2, "debug", 8, "big")
    (tmp_path / CLUSTER_FILE).write_text(json.dumps({"nodes": 2, "gpus_per_node": 0, "ranks_per_node": 3}))
    assert SlurmRequest().recorded(tmp_path).procs == 3  # CPU nodes: the same ranks per node
    assert SlurmRequest(nodes=1).recorded(tmp_path).procs is None  # a new layout named: its own default
    assert SlurmRequest().recorded(tmp_path / "never-submitted").nodes == 1


def test_write_plan_keeps_history_only_when_asked(tmp_path: Path) -> None:
    plan = LocalExecutor(Resources()).plan(load_recipe(recipe(tmp_path)), tmp_path / "run")
    (tmp_path / "run").mkdir()
    write_plan(tmp_path / "run", plan)
    write_plan(tmp_path / "run", plan)
    assert not (tmp_path / "run" / PLAN_HISTORY_DIR).exists()
    write_plan(tmp_path / "run", plan, keep_previous=True)
    assert [p.name for p in (tmp_path / "run" / PLAN_HISTORY_DIR).iterdir()] == ["001.json"]


def test_plan_writes_nothing_unless_asked(tmp_path: Path) -> None:
    executor = LocalExecutor(Resources())
    for _ in range(3):
        run, warnings = executor.dry_run(load_recipe(recipe(tmp_path)))
        assert run.run_dir == tmp_path / "runs" / "t" and warnings == []
    assert not (tmp_path / "runs").exists()  # `launch runs` does not fill with plans
