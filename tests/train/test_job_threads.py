"""How many intra-op threads a CPU rank takes (launcher.train.job.cpu_threads)."""

from __future__ import annotations

import os

import pytest

from launcher.train.job import cpu_threads


def test_an_explicit_omp_num_threads_wins_over_the_core_count() -> None:
    # Under Slurm with one rank per node, local_world_size is 1 whatever else runs on the machine: the profile's
    # OMP_NUM_THREADS=1 must hold, not cores // 1.
    assert cpu_threads(1, {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "4"}) == 1
    assert cpu_threads(1, {"OMP_NUM_THREADS": "3"}) == 3


def test_slurm_cpus_per_task_then_the_allowed_cpus_shared_by_the_ranks() -> None:
    assert cpu_threads(2, {"SLURM_CPUS_PER_TASK": "4"}) == 4
    allowed = len(os.sched_getaffinity(0))
    assert cpu_threads(1, {}) == allowed
    assert cpu_threads(allowed * 2, {}) == 1  # never 0


@pytest.mark.parametrize("value", ["", "0", "-2", "two"])
def test_unusable_values_are_ignored(value: str) -> None:
    assert cpu_threads(1, {"OMP_NUM_THREADS": value}) == len(os.sched_getaffinity(0))


def test_local_ranks_share_the_cpus_unless_the_user_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun sets OMP_NUM_THREADS=1 for every rank when it is unset; the local executor sets the node's CPUs //
    ranks first (at least 1), and leaves a value the user exported alone."""
    from types import SimpleNamespace

    from cluster.local import rank_environment

    plan = SimpleNamespace(device="cpu", world_size=2, procs_per_node=2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert rank_environment(plan)["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rank_environment(plan)["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "OMP_NUM_THREADS" not in rank_environment(SimpleNamespace(device="cpu", world_size=1, procs_per_node=1))
