"""Unit tests of cluster.env: node-list expansion and rank/world detection from fake environments."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.env import (
    DEFAULT_MASTER_PORT,
    PORT_BASE,
    PORT_SPAN,
    DistEnv,
    detect_dist_env,
    expand_nodelist,
    parse_tasks_per_node,
)

# ------------------------------------------------------------------------------------------- expand_nodelist


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("g100n[040-041],gpu[1,3-4]-ib,a",
         ["g100n040", "g100n041", "gpu1-ib", "gpu3-ib", "gpu4-ib", "a"]),
        ("node[1-2]", ["node1", "node2"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("x[008-010]", ["x008", "x009", "x010"]),
        ("n[01-3]", ["n01", "n02", "n03"]),  # width of the lower bound, as Slurm does
        ("n[1-03]", ["n1", "n2", "n3"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("a,b,a", ["a", "b", "a"]),
        ("a,,b", ["a", "b"]),
        ("single", ["single"]),
        ("n[00]", ["n00"]),
        ("n[1-1]", ["n1"]),
        ("", []),
        ("node-1.cluster.local", ["node-1.cluster.local"]),
        ("[1-2]x", ["1x", "2x"]),
    ],
)
def test_expand_nodelist_examples(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n[1-2]]", "n]1", "n[[1]]", "n[]", "n[a-b]", "n[3-1]", "n[1-]", "a b"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="node list|range|host name"):
        expand_nodelist(bad)


# A node-list pattern as data: literal texts alternating with bracket groups of (lo, hi, width) ranges.
# The expected expansion is computed here independently of the parser (nested loops, explicit padding).
_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-.", min_size=1, max_size=6)
_range = st.tuples(st.integers(0, 120), st.integers(0, 4), st.integers(1, 4)).map(
    lambda t: (t[0], t[0] + t[1], t[2])
)
_group = st.lists(_range, min_size=1, max_size=3)
_pattern = st.tuples(_name, st.lists(st.tuples(_group, st.text(alphabet="abc-", max_size=3)), max_size=2))


def _render(pattern: tuple) -> str:
    prefix, groups = pattern
    text = prefix
    for ranges, suffix in groups:
        items = [f"{lo:0{w}d}" if lo == hi else f"{lo:0{w}d}-{hi}" for lo, hi, w in ranges]
        text += "[" + ",".join(items) + "]" + suffix
    return text


def _expected(pattern: tuple) -> list[str]:
    prefix, groups = pattern
    hosts = [prefix]
    for ranges, suffix in groups:
        values = [f"{n:0{w}d}" for lo, hi, w in ranges for n in range(lo, hi + 1)]
        hosts = [h + v + suffix for h in hosts for v in values]
    return hosts


@settings(max_examples=300, deadline=None)
@given(st.lists(_pattern, min_size=1, max_size=4))
def test_expand_nodelist_round_trips_generated_lists(patterns: list) -> None:
    nodelist = ",".join(_render(p) for p in patterns)
    assert expand_nodelist(nodelist) == [h for p in patterns for h in _expected(p)]


@settings(max_examples=200, deadline=None)
@given(st.lists(_name, min_size=1, max_size=8))
def test_plain_host_lists_come_back_unchanged(hosts: list[str]) -> None:
    assert expand_nodelist(",".join(hosts)) == hosts


def _scontrol_hostnames(nodelist: str) -> list[str] | None:
    """scontrol's expansion, or None where scontrol rejects the list (22.05 refuses some we accept)."""
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if proc.returncode != 0 or "Invalid" in proc.stdout + proc.stderr:
        return None
    return proc.stdout.split()


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize(
    "nodelist",
    ["g100n[040-041]", "gpu[1,3-4]", "rack[1-2]-node[01-02]", "n[8-10],x[008-010]", "a,b,a", "n[01-3]",
     "n[1-03]", "node[001-005,010],login1", "g100n[040-041],gpu[1,3-4],a"],
)
def test_expand_nodelist_agrees_with_scontrol(nodelist: str) -> None:
    # Every list here is one scontrol 22.05 accepts (it needs no config to parse). It rejects some we accept,
    # e.g. `gpu[1,3-4]-ib` (a bracket followed by a suffix); those are covered by the examples above.
    theirs = _scontrol_hostnames(nodelist)
    assert theirs is not None, f"scontrol rejects {nodelist!r}: pick a list it accepts"
    assert expand_nodelist(nodelist) == theirs


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="bad tasks-per-node"):
        parse_tasks_per_node("2(3)")


# ------------------------------------------------------------------------------------------- detect_dist_env


def _slurm_step(procid: int, **extra: str) -> dict[str, str]:
    """Variables srun gives task `procid` of a 2-node x 2-task step (as measured on the local cluster)."""
    env = {
        "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 2), "SLURM_NODEID": str(procid // 2), "SLURM_NTASKS": "4",
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)",
    }
    env.update(extra)
    return env


def test_nothing_set_is_single_process() -> None:
    env = detect_dist_env({})
    assert env == DistEnv(0, 0, 1, 1, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single")
    assert env.is_main and not env.is_distributed


def test_default_argument_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR", "SLURM_PROCID", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect_dist_env().rank == 1


def test_torchrun_variables() -> None:
    env = detect_dist_env({
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x",
    })
    assert env == DistEnv(5, 1, 8, 4, 1, 2, "n1", 29400, "torchrun")
    assert env.torch_env()["GROUP_RANK"] == "1"


def test_torchrun_wins_over_slurm() -> None:
    # torchrun started by srun, one per node: SLURM_PROCID counts nodes, RANK counts ranks.
    env = detect_dist_env({**_slurm_step(1), "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"})
    assert (env.source, env.rank) == ("torchrun", 3)


def test_bare_env_launch_assumes_one_node() -> None:
    env = detect_dist_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert (env.local_rank, env.local_world_size, env.num_nodes, env.master_addr) == (1, 2, 1, "127.0.0.1")


def test_torchrun_multi_node_needs_master_addr() -> None:
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        detect_dist_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})


@pytest.mark.parametrize("procid", range(4))
def test_slurm_step(procid: int) -> None:
    env = detect_dist_env(_slurm_step(procid))
    assert env == DistEnv(procid, procid % 2, 4, 2, procid // 2, 2, "gpu07",
                          PORT_BASE + 1234 % PORT_SPAN, "slurm")


def test_slurm_uneven_tasks_per_node() -> None:
    env = detect_dist_env(_slurm_step(6, SLURM_NTASKS="7", SLURM_NNODES="4", SLURM_NODEID="3",
                                      SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="2(x3),1",
                                      SLURM_JOB_NODELIST="g100n[040-041],gpu[1,3]"))
    assert (env.local_world_size, env.node_rank, env.num_nodes, env.master_addr) == (1, 3, 4, "g100n040")


def test_slurm_step_variables_win_over_job_variables() -> None:
    # `srun -n3` inside a 4-task, 2-node job (values measured on the local cluster).
    env = detect_dist_env(_slurm_step(2, SLURM_STEP_NUM_TASKS="3", SLURM_STEP_NUM_NODES="2",
                                      SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_STEP_NODELIST="gpu[08,07]",
                                      SLURM_LOCALID="0"))
    assert (env.world_size, env.local_world_size, env.master_addr) == (3, 1, "gpu08")


def test_master_addr_and_port_overrides() -> None:
    env = detect_dist_env(_slurm_step(0, MASTER_ADDR="10.0.0.1", MASTER_PORT="12345"))
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 12345)


def test_port_is_deterministic_per_job_and_in_range() -> None:
    ports = {detect_dist_env(_slurm_step(r)).master_port for r in range(4)}
    assert len(ports) == 1
    for job_id in ("1", "99999", "4242_7"):
        assert PORT_BASE <= detect_dist_env(_slurm_step(0, SLURM_JOB_ID=job_id)).master_port < PORT_BASE + PORT_SPAN


def test_sbatch_batch_script_is_single_process() -> None:
    # The batch step has SLURM_PROCID=0 and SLURM_NTASKS=4 but no step id: it is one process, not rank 0 of 4.
    env_vars = _slurm_step(0)
    del env_vars["SLURM_STEP_ID"]
    env = detect_dist_env(env_vars)
    assert (env.source, env.world_size, env.master_port) == ("single", 1, PORT_BASE + 1234)


def test_submitit_on_slurm() -> None:
    env = detect_dist_env({**_slurm_step(3), "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": "/x"})
    assert (env.source, env.rank, env.node_rank, env.master_addr) == ("submitit", 3, 1, "gpu07")


def test_submitit_local() -> None:
    env = detect_dist_env({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2",
                           "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                           "SUBMITIT_LOCAL_JOB_ID": "777"})
    assert env == DistEnv(1, 1, 2, 2, 0, 1, "127.0.0.1", PORT_BASE + 777, "submitit")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (_slurm_step(5), r"SLURM_PROCID\(5\) >= SLURM_NTASKS\(4\)"),
        (_slurm_step(0, SLURM_NODEID="2"), r"SLURM_NODEID\(2\) >= SLURM_NNODES\(2\)"),
        (_slurm_step(1, SLURM_LOCALID="2"), r"SLURM_LOCALID\(2\) >= SLURM_TASKS_PER_NODE\[0\]\(2\)"),
        (_slurm_step(0, SLURM_TASKS_PER_NODE="2,1"), r"SLURM_TASKS_PER_NODE\(2,1\) sums to 3 but SLURM_NTASKS\(4\)"),
        (_slurm_step(0, SLURM_TASKS_PER_NODE="4"), r"lists 1 nodes but SLURM_NNODES\(2\)"),
        (_slurm_step(0, SLURM_JOB_NODELIST="gpu07"), r"SLURM_JOB_NODELIST\(gpu07\) has 1 hosts but SLURM_NNODES\(2\)"),
        (_slurm_step(0, SLURM_NTASKS="four"), r"SLURM_NTASKS='four' is not an integer"),
        (_slurm_step(0, MASTER_PORT="70000"), r"MASTER_PORT\(70000\)"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK\(2\) >= WORLD_SIZE\(2\)"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, r"RANK\(-1\) < 0"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
         r"LOCAL_RANK\(3\) >= LOCAL_WORLD_SIZE\(2\)"),
        ({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "2"},
         r"SUBMITIT_LOCAL_GLOBALID\(2\) >= SUBMITIT_LOCAL_NTASKS\(2\)"),
    ],
)
def test_inconsistent_environments_name_the_variables(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detect_dist_env(environ)
