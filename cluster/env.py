"""Where am I in the job? Rank, world size and rendezvous address from torchrun, Slurm or submitit.

Standard library only: the planning side imports `cluster/` on login nodes without torch, and every rank
calls :func:`detect_dist_env` before anything heavy is imported.

Sources, checked in this order (the first that applies wins):

* ``torchrun`` -- ``RANK`` and ``WORLD_SIZE`` are set: torchrun / torchelastic, or anything else that
  launches ranks for ``init_process_group("env://")`` (our local executor does). Checked first because
  torchrun inside a Slurm job also sees ``SLURM_*``, and there ``SLURM_PROCID`` numbers nodes, not ranks.
* ``submitit`` -- ``SUBMITIT_EXECUTOR`` is ``slurm`` (values come from ``SLURM_*``, as submitit's own
  ``JobEnvironment`` reads them) or ``local`` (``SUBMITIT_LOCAL_*``).
* ``slurm`` -- a task of a job step started by ``srun`` (``SLURM_PROCID`` and ``SLURM_STEP_ID`` set).
* ``single`` -- everything else, including the batch script of an ``sbatch`` job: it is one process even
  when the job has ``--ntasks=4``, and treating it as rank 0 of 4 would hang in rendezvous.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

Source = Literal["torchrun", "slurm", "submitit", "single"]

#: Ports derived from a Slurm job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the registered
#: ports most services use and below Linux's default ephemeral range (32768+), so a derived port is not
#: taken by some outgoing connection's local port.
PORT_BASE = 20000
PORT_SPAN = 10000
#: torch's own default, used when nothing else gives a port.
DEFAULT_MASTER_PORT = 29500
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a distributed job."""

    rank: int
    """Global rank, 0 .. world_size-1."""
    local_rank: int
    """Rank among the processes on this node (picks the GPU)."""
    world_size: int
    """Number of processes in the job."""
    local_world_size: int
    """Number of processes on this node."""
    node_rank: int
    """Index of this node, 0 .. num_nodes-1."""
    num_nodes: int
    """Number of nodes in the job."""
    master_addr: str
    """Host that rank 0 runs on (the rendezvous address)."""
    master_port: int
    """TCP port of the rendezvous store on master_addr."""
    source: Source
    """Which launcher's variables these came from."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0, which alone writes shared files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process to talk to."""
        return self.world_size > 1

    def torch_env(self) -> dict[str, str]:
        """The variables ``torch.distributed.init_process_group("env://")`` and torchrun-style code read."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def as_dict(self) -> dict[str, object]:
        """Plain dict, for logs and plan.json."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- node lists

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list into host names, in Slurm's order.

    ``"g100n[040-041],gpu[1,3-4]-ib,a"`` -> ``g100n040, g100n041, gpu1-ib, gpu3-ib, gpu4-ib, a``.
    Ranges keep the zero padding of their lower bound (``[08-10]`` -> 08, 09, 10; ``[8-10]`` -> 8, 9, 10),
    several bracket groups multiply with the first varying slowest (``rack[1-2]-node[01-02]`` ->
    rack1-node01, rack1-node02, rack2-node01, rack2-node02), duplicates are kept and empty items skipped,
    as ``scontrol show hostnames`` does.

    Why not shell out to ``scontrol show hostnames``: this must work where there is no Slurm at all (unit
    tests, CI, a laptop, the planning side), scontrol needs a readable slurm.conf even to parse a string,
    and a subprocess per rank at start-up is slow and one more thing to fail. It is also stricter:
    scontrol 22.05 rejects ``gpu[1,3-4]-ib`` and turns an unclosed ``n[1-2`` into ``n]``; we accept the
    first and raise on the second. tests/cluster/test_env.py cross-checks us against scontrol where it exists.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_host_pattern(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets; raise on unbalanced or nested brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise ValueError(f"nested '[' at position {i} in node list {text!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"unmatched ']' at position {i} in node list {text!r}")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_host_pattern(pattern: str) -> list[str]:
    """Expand one comma-free (at top level) pattern such as ``rack[1-2]-node[01,03]``."""
    # re.split with a capture group alternates literal, bracket body, literal, ...
    pieces = re.split(r"\[([^\]]*)\]", pattern)
    choices: list[list[str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if any(c in piece for c in "[], \t"):
                raise ValueError(f"bad host name {piece!r} in {pattern!r}")
            choices.append([piece])
        else:
            choices.append(_expand_bracket(piece, pattern))
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_bracket(body: str, pattern: str) -> list[str]:
    """Expand the inside of one bracket group: ``01-03,7`` -> 01, 02, 03, 7."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"bad range {part!r} in [{body}] of {pattern!r}")
        lo_text, hi_text = m.group(1), m.group(2)
        lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
        if hi < lo:
            raise ValueError(f"descending range {part!r} in [{body}] of {pattern!r}")
        width = len(lo_text)  # Slurm pads to the width of the lower bound as written
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE``-style counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"bad tasks-per-node entry {part!r} in {value!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# ---------------------------------------------------------------------------------------------- detection


def detect_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Work out this process's rank, world and rendezvous address from its environment.

    ``environ`` defaults to ``os.environ``; tests pass plain dicts. Raises ValueError, naming the
    variables and their values, when the environment contradicts itself (e.g. ``SLURM_PROCID(5) >=
    SLURM_NTASKS(4)``): starting a rank with a wrong world size hangs in rendezvous instead of failing.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        result = _from_torchrun(env)
    elif env.get("SUBMITIT_EXECUTOR") == "slurm" and _in_slurm_step(env):
        result = _from_slurm(env, source="submitit")
    elif env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        result = _from_submitit_local(env)
    elif _in_slurm_step(env):
        result = _from_slurm(env, source="slurm")
    else:
        result = _single(env)
    _check(result)
    return result


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """True for a task started by srun; false for an sbatch batch script or an salloc shell."""
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


class _Reader:
    """Reads integers from the environment and remembers which variable each value came from."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def int(self, *names: str, default: int | None = None) -> tuple[int, str]:
        """First of ``names`` that is set, as (value, name); ``default`` if none is."""
        for name in names:
            if name in self.env:
                raw = self.env[name]
                try:
                    return int(raw), name
                except ValueError:
                    raise ValueError(f"{name}={raw!r} is not an integer") from None
        if default is None:
            raise ValueError(f"none of {', '.join(names)} is set")
        return default, f"default({default})"

    def first(self, *names: str) -> tuple[str, str] | None:
        """First of ``names`` that is set, as (value, name)."""
        for name in names:
            if name in self.env:
                return self.env[name], name
        return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"inconsistent distributed environment: {message}")


def _less(a: tuple[int, str], b: tuple[int, str]) -> None:
    """Check 0 <= a < b, naming both variables: ``SLURM_PROCID(5) >= SLURM_NTASKS(4)``."""
    _require(a[0] >= 0, f"{a[1]}({a[0]}) < 0")
    _require(a[0] < b[0], f"{a[1]}({a[0]}) >= {b[1]}({b[0]})")


def _port(env: Mapping[str, str], job_id: str | None) -> int:
    """MASTER_PORT if set; else one derived from the job id, so that concurrent jobs sharing a node
    (and every rank of one job, without talking to each other) agree on a port; else torch's default."""
    if "MASTER_PORT" in env:
        port, _ = _Reader(env).int("MASTER_PORT")
        _require(0 < port < 65536, f"MASTER_PORT({port}) is not a TCP port")
        return port
    if job_id is not None:
        digits = re.sub(r"\D", "", job_id)  # array/het job ids may carry "_" or "+"
        if digits:
            return PORT_BASE + int(digits) % PORT_SPAN
    return DEFAULT_MASTER_PORT


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    r = _Reader(env)
    rank, world = r.int("RANK"), r.int("WORLD_SIZE")
    _require(world[0] >= 1, f"WORLD_SIZE({world[0]}) < 1")
    _less(rank, world)
    # Hand-made env:// launches may set only RANK/WORLD_SIZE: assume one node then.
    local_world = r.int("LOCAL_WORLD_SIZE", default=world[0])
    _require(local_world[0] >= 1, f"{local_world[1]}({local_world[0]}) < 1")
    local_rank = r.int("LOCAL_RANK", default=rank[0] % local_world[0])
    _less(local_rank, local_world)
    _require(local_world[0] <= world[0], f"{local_world[1]}({local_world[0]}) > WORLD_SIZE({world[0]})")
    nodes = r.int("GROUP_WORLD_SIZE", default=-(-world[0] // local_world[0]))
    node = r.int("GROUP_RANK", "NODE_RANK", default=rank[0] // local_world[0])
    _less(node, nodes)
    addr = env.get("MASTER_ADDR")
    _require(addr is not None or nodes[0] == 1, f"MASTER_ADDR is not set but {nodes[1]}({nodes[0]}) > 1")
    return DistEnv(
        rank=rank[0], local_rank=local_rank[0], world_size=world[0], local_world_size=local_world[0],
        node_rank=node[0], num_nodes=nodes[0], master_addr=addr or LOCALHOST,
        master_port=_port(env, None), source="torchrun",
    )


def _from_slurm(env: Mapping[str, str], source: Source) -> DistEnv:
    """A task of an srun step. Step-level variables win over job-level ones: a step may use only
    part of the allocation (``srun -n2`` inside a 4-task job)."""
    r = _Reader(env)
    rank = r.int("SLURM_PROCID")
    world = r.int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    _require(world[0] >= 1, f"{world[1]}({world[0]}) < 1")
    _less(rank, world)
    nodes = r.int("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
    node = r.int("SLURM_NODEID", default=0)
    _less(node, nodes)
    local_rank = r.int("SLURM_LOCALID", default=0)
    local_world = _slurm_local_world(r, node, nodes, world)
    _less(local_rank, local_world)
    return DistEnv(
        rank=rank[0], local_rank=local_rank[0], world_size=world[0], local_world_size=local_world[0],
        node_rank=node[0], num_nodes=nodes[0], master_addr=_slurm_master_addr(r, nodes),
        master_port=_port(env, env.get("SLURM_JOB_ID")), source=source,
    )


def _slurm_local_world(r: _Reader, node: tuple[int, str], nodes: tuple[int, str],
                       world: tuple[int, str]) -> tuple[int, str]:
    """Tasks on this node, from the per-node counts; checked against the node and task totals."""
    found = r.first("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if found is None:
        # No per-node counts: assume an even split, which is what --ntasks-per-node gives.
        _require(world[0] % nodes[0] == 0,
                 f"{world[1]}({world[0]}) is not divisible by {nodes[1]}({nodes[0]}) and no tasks-per-node is set")
        return world[0] // nodes[0], f"{world[1]}/{nodes[1]}"
    value, name = found
    counts = parse_tasks_per_node(value)
    _require(len(counts) == nodes[0], f"{name}({value}) lists {len(counts)} nodes but {nodes[1]}({nodes[0]})")
    _require(sum(counts) == world[0], f"{name}({value}) sums to {sum(counts)} but {world[1]}({world[0]})")
    return counts[node[0]], f"{name}[{node[0]}]"


def _slurm_master_addr(r: _Reader, nodes: tuple[int, str]) -> str:
    """MASTER_ADDR if set, else the first host of the step's node list: Slurm numbers nodes (and with
    them ranks) in node-list order, so global rank 0 runs there."""
    explicit = r.first("MASTER_ADDR")
    if explicit is not None:
        return explicit[0]
    found = r.first("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
    if found is None:
        _require(nodes[0] == 1, f"no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to find rank 0's host on {nodes[0]} nodes")
        return LOCALHOST
    value, name = found
    hosts = expand_nodelist(value)
    _require(len(hosts) == nodes[0], f"{name}({value}) has {len(hosts)} hosts but {nodes[1]}({nodes[0]})")
    return hosts[0]


def _from_submitit_local(env: Mapping[str, str]) -> DistEnv:
    """submitit's LocalExecutor: N tasks on this machine, ids in SUBMITIT_LOCAL_*."""
    r = _Reader(env)
    rank, world = r.int("SUBMITIT_LOCAL_GLOBALID"), r.int("SUBMITIT_LOCAL_NTASKS")
    _less(rank, world)
    local_rank = r.int("SUBMITIT_LOCAL_LOCALID", default=rank[0])
    _less(local_rank, world)
    return DistEnv(
        rank=rank[0], local_rank=local_rank[0], world_size=world[0], local_world_size=world[0],
        node_rank=0, num_nodes=1, master_addr=env.get("MASTER_ADDR", LOCALHOST),
        master_port=_port(env, env.get("SUBMITIT_LOCAL_JOB_ID")), source="submitit",
    )


def _single(env: Mapping[str, str]) -> DistEnv:
    """One process. Inside an sbatch script the job id still picks the port, so that two
    single-process jobs on one node do not both take 29500."""
    return DistEnv(
        rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
        master_addr=env.get("MASTER_ADDR", LOCALHOST), master_port=_port(env, env.get("SLURM_JOB_ID")),
        source="single",
    )


def _check(e: DistEnv) -> None:
    """Invariants every source must satisfy (a last line of defence behind the per-source checks)."""
    _require(0 <= e.rank < e.world_size, f"rank {e.rank} not in [0, world_size {e.world_size})")
    _require(0 <= e.local_rank < e.local_world_size <= e.world_size,
             f"local_rank {e.local_rank}, local_world_size {e.local_world_size}, world_size {e.world_size}")
    _require(0 <= e.node_rank < e.num_nodes <= e.world_size,
             f"node_rank {e.node_rank}, num_nodes {e.num_nodes}, world_size {e.world_size}")
    _require(0 < e.master_port < 65536, f"master_port {e.master_port}")
