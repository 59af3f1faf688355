"""End-to-end tests on the real two-node Slurm cluster from slurm/local-cluster.sh.

Each check is something the Slurm executor relies on: srun places tasks on both "nodes", cluster.env
turns a Slurm step's variables into a working gloo rendezvous, submitit sees job states through sacct,
and fake GPUs satisfy --gpus-per-node.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cluster.env import DistEnv, detect_dist_env

if TYPE_CHECKING:  # conftest modules are not imported by tests at run time
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_srun_spreads_tasks_over_both_nodes(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "-n4", "--label", "hostname")
    by_rank = dict(line.split(": ", 1) for line in out.split("\n") if line)
    # Block distribution: ranks 0-1 on node1, 2-3 on node2 (each slurmd has its own hostname).
    assert by_rank == {"0": "node1", "1": "node1", "2": "node2", "3": "node2"}


# Runs on every task of the sbatch job: rendezvous through cluster.env, then all_reduce the ranks.
_ALL_REDUCE = """
import datetime, json, socket, sys
import torch, torch.distributed as dist
from cluster.env import detect_dist_env
env = detect_dist_env()
dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                        rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=90))
total = torch.tensor([float(env.rank)])
dist.all_reduce(total)
dist.destroy_process_group()
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
    json.dump({"env": env.as_dict(), "host": socket.gethostname(), "sum": total.item()}, f)
"""


def test_sbatch_gloo_all_reduce_across_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"srun {shlex.quote(sys.executable)} -c {shlex.quote(_ALL_REDUCE)} {shlex.quote(str(tmp_path))}\n"
    )
    state = slurm_cluster.sbatch_and_wait("--nodes=2", "--ntasks-per-node=2", "--time=5",
                                          f"--output={tmp_path}/job.out", str(script), cwd=tmp_path)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()
    results = {}
    for rank in range(4):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote nothing; job output:\n{(tmp_path / 'job.out').read_text()}"
        results[rank] = json.loads(path.read_text())
    for rank, r in results.items():
        assert r["sum"] == 6.0  # 0 + 1 + 2 + 3
        assert r["host"] == ("node1" if rank < 2 else "node2")
        env = DistEnv(**r["env"])
        assert (env.source, env.world_size, env.num_nodes, env.local_world_size) == ("slurm", 4, 2, 2)
        assert (env.node_rank, env.local_rank, env.master_addr) == (rank // 2, rank % 2, "node1")


def test_submitit_job_completes_and_sacct_sees_it(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    submitit = pytest.importorskip("submitit")
    from cluster.slurm import INHERITED_DIST_VARS

    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)  # submitit's sbatch exports this process's environment
    for key in INHERITED_DIST_VARS:  # as a clean shell's (what `launch` does before it submits: cluster/slurm.py)
        monkeypatch.delenv(key, raising=False)
    # A fresh folder per job: job ids restart at 1 when the cluster's state is wiped, and submitit
    # would return an old result file with the same id.
    executor = submitit.AutoExecutor(folder=tmp_path / f"submitit-{uuid.uuid4().hex[:8]}", cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=2, timeout_min=5, slurm_partition="debug")
    job = executor.submit(detect_dist_env)
    envs = job.results()  # one result per task
    assert [e.rank for e in envs] == [0, 1, 2, 3]
    assert {e.source for e in envs} == {"submitit"} and {e.master_addr for e in envs} == {"node1"}
    # job.state comes from sacct; accounting lags the job's end by a moment.
    deadline = time.monotonic() + 60
    while job.state != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert job.state == "COMPLETED", f"sacct says {job.state}:\n{slurm_cluster.log_tail('slurmdbd.log')}"
    sacct = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", str(job.job_id), "-o", "State")
    assert sacct.split() == ["COMPLETED"]


def test_gpus_per_node_uses_fake_gpus(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "--ntasks-per-node=1", "--gpus-per-node=2",
                            "bash", "-c", 'echo "$(hostname) $CUDA_VISIBLE_DEVICES"')
    assert sorted(out.split("\n")[:-1]) == ["node1 0,1", "node2 0,1"]


def test_more_gpus_than_a_node_has_is_rejected(slurm_cluster: SlurmCluster) -> None:
    proc = subprocess.run(
        ["srun", "-N1", "--gpus-per-node=3", "true"], env=slurm_cluster.env, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode != 0 and "Requested node configuration is not available" in proc.stderr


def test_submit_to_running_latency(slurm_cluster: SlurmCluster, integration_timings: dict[str, str],
                                   tmp_path: Path) -> None:
    """Measure (print, not assert) how long a job takes from sbatch to its first instruction.
    Also the one place `sbatch --wait` itself is exercised (a short job: its first poll catches the end)."""
    stamp = tmp_path / "started"
    t0 = time.time()
    slurm_cluster.run("sbatch", "-N1", "-n1", "--wait", f"--output={tmp_path}/out",
                      "--wrap", f"date +%s.%N > {stamp}", timeout=120, cwd=tmp_path)
    t_end = time.time()
    latency = float(stamp.read_text()) - t0
    integration_timings["sbatch -> job running"] = f"{latency:.2f} s (sbatch --wait returned after {t_end - t0:.1f} s)"
    assert latency >= 0


# What reaches #SBATCH lines and is accepted (names take only their own characters; backslashes and control
# characters are refused before this): quotes, `#`, spaces, option look-alikes, shell syntax.
SBATCH_PAYLOADS = ["it's #1", 'say "hi" --comment=INJECTED #', "a  b --wrap=touch /tmp/x", "$(id) `id`; x && y",
                   "#SBATCH --wrap=x", "'\"'\"", "--qos=evil"]


def test_sbatch_reads_back_every_value_job_sbatch_holds(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The real sbatch's parser (`--test-only -v` lists the options it defined) sees exactly the options written,
    each with the value the recipe held: nothing injected, nothing cut."""
    from cluster.slurm import render_sbatch, resolve_settings
    from launcher.config.schema import ClusterConfig

    for i, payload in enumerate(SBATCH_PAYLOADS):
        cluster = ClusterConfig(partition="debug", constraint="a&b", sbatch_options=[f"--comment={payload}"])
        settings = resolve_settings("local", cluster, nodes=1, time_limit="5")
        run_dir = tmp_path / f"run {i} {payload.replace('/', '_')}"
        script = tmp_path / f"job{i}.sbatch"
        script.write_text(render_sbatch(settings, str(run_dir), f"ftlaunch-t{i}"))
        proc = subprocess.run(["sbatch", "--test-only", "-v", str(script)], env=slurm_cluster.env,
                              capture_output=True, text=True, timeout=60)
        section = proc.stderr.split("defined options", 1)[-1].split("end of defined options", 1)[0]
        defined = dict(line.removeprefix("sbatch: ").split(" : ", 1) for line in section.splitlines()
                       if " : " in line)
        defined = {k.strip(): v for k, v in defined.items()}
        assert set(defined) == {"job-name", "nodes", "ntasks-per-node", "cpus-per-task", "time", "partition",
                                "constraint", "output", "open-mode", "signal", "requeue", "export", "comment",
                                "test-only", "verbose"}, (payload, proc.stderr)
        assert defined["comment"] == payload, proc.stderr
        assert defined["output"] == f"{run_dir}/slurm-%j.out" and defined["job-name"] == f"ftlaunch-t{i}"
        assert (defined["partition"], defined["constraint"]) == ("debug", "a&b")
