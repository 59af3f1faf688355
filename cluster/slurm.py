"""Slurm executor: cluster profiles, the equivalent `job.sbatch`, pre-flight checks, submission through submitit.

    profile (cluster/profiles/NAME.yaml)  <  recipe `cluster:` section  <  --nodes/--gpus-per-node/--partition/--time

Submission goes through submitit (`AutoExecutor`, a fresh folder under RUN_DIR/submitit per submission). Every task
runs :class:`RankTask`, which starts the rank entry point `python -m launcher.train.job RUN_DIR` as a child process and
waits for it. Why a child process rather than calling `launcher.train.job.run_job` in the submitit process: submitit owns
that process's signal handlers (SIGTERM is bypassed, the preemption signal requeues and exits at once), while our
trainer installs its own to checkpoint at the next step boundary. In separate processes both work as designed:

* Slurm sends the preemption/time-limit signal (SIGUSR1, both for submitit and for the plain sbatch file) to every
  process of the step. The trainers stop at the next step boundary, write a checkpoint and exit 3.
* submitit's handler on global rank 0 calls :meth:`RankTask.checkpoint`, which forwards SIGUSR1 to its trainer (in
  case only the task was signalled) and *waits for it to exit*, so the checkpoint is complete before submitit runs
  `scontrol requeue`. The requeued job starts the trainers again, and they resume from RUN_DIR/checkpoints/latest.
* A requeue without warning (`scontrol requeue`, node failure) sends SIGTERM: the trainers checkpoint if they
  can within KillWait; otherwise the requeued job resumes from the last periodic checkpoint.

Standard library + yaml at module level (planning side, login nodes); submitit is imported when submitting.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cluster.errors import SubmitError
from cluster.events import EXIT_INTERRUPTED, JOBS_FILE, SIGNAL_DELAY_S, record_event  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from launcher.config.schema import ClusterConfig

#: The signal Slurm sends before a time limit (`--signal=USR1@90`) and submitit treats as preemption. One signal
#: for both paths; the trainer's StopFlag handles it. (submitit reads SUBMITIT_PREEMPT_SIGNAL when imported.)
PREEMPT_SIGNAL = "USR1"
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "local"
SBATCH_FILE = "job.sbatch"
CLUSTER_FILE = "cluster.json"
#: File systems every node of a cluster sees. Anything else is local to one node unless a profile says otherwise.
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "cephfs", "glusterfs",
              "fuse.glusterfs", "fuse.sshfs", "panfs", "pvfs2", "orangefs", "wekafs", "fuse.weka", "9p", "afs",
              "fuse.juicefs", "vast", "daos")
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "vfat", "ramfs")

_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d{1,2})(?::(?P<c>\d{1,2}))?)?)$")


class SlurmError(SubmitError):
    """A problem found before submitting (no Slurm, unknown partition, too many nodes, ...): says what to change."""


# --------------------------------------------------------------------------------------------------- settings
def parse_time_minutes(text: str) -> int:
    """Minutes in a Slurm time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`), rounded up.

    Raises SlurmError naming the accepted formats (`1h`, `90m` are not Slurm formats)."""
    m = _TIME.fullmatch(text)  # no strip: `30\n` would pass and then break the #SBATCH line
    if not m:
        raise SlurmError(f"bad time limit {text!r}: use a Slurm format, MM, HH:MM:SS or D-HH:MM:SS (e.g. 30, "
                         "04:00:00, 1-12:00:00)")
    if m.group("d") is not None:
        seconds = (int(m.group("d")) * 86400 + int(m.group("dh")) * 3600 + int(m.group("dm") or 0) * 60
                   + int(m.group("ds") or 0))
    elif m.group("c") is not None:  # H:M:S
        seconds = int(m.group("a")) * 3600 + int(m.group("b")) * 60 + int(m.group("c"))
    else:  # M or M:S
        seconds = int(m.group("a")) * 60 + int(m.group("b") or 0)
    if seconds <= 0:
        raise SlurmError(f"bad time limit {text!r}: must be more than zero")
    return -(-seconds // 60)


@dataclass(frozen=True)
class SlurmSettings:
    """Resolved Slurm settings of one run (profile + recipe + flags). Secret values are not held here."""

    profile: str
    nodes: int
    gpus_per_node: int
    ranks_per_node: int
    cpus_per_task: int
    time: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch_options: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    container_image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Non-secret variables, written to job.sbatch."""
    secret_env: list[str] = field(default_factory=list)
    """Names passed from the submitting environment only (never written)."""
    max_requeues: int = 3
    shared_roots: list[str] = field(default_factory=list)
    tokenize_first: bool = True
    """Submit a CPU job that tokenizes the data first when it is not cached (launcher/train/prepare.py)."""
    prepare_partition: str | None = None
    """Partition of that CPU-only job; None: the training partition."""
    prepare_tasks: int = 1
    """Tasks (one per node) of that CPU-only job, each tokenizing 1/N of the shards."""

    @property
    def tasks_per_node(self) -> int:
        """One rank per GPU, or ranks_per_node on CPU."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.ranks_per_node

    @property
    def timeout_min(self) -> int:
        return parse_time_minutes(self.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def profile_dirs() -> list[Path]:
    """Where profiles are looked up: $FTLAUNCH_PROFILES (colon-separated), ~/.config/ftlaunch/profiles, shipped."""
    extra = [Path(p) for p in os.environ.get("FTLAUNCH_PROFILES", "").split(os.pathsep) if p]
    return [*extra, Path.home() / ".config" / "ftlaunch" / "profiles", PROFILE_DIR, PROFILE_DIR / "examples"]


def local_profile_warning(profile_name: str | None, gpus_per_node: int) -> str | None:
    """The default profile is this machine's loopback test cluster (partition debug, 20 minutes, gloo on `lo`):
    applying it to a GPU job is almost never what was meant, so it is said, not done silently."""
    if profile_name is None and default_profile() == DEFAULT_PROFILE and gpus_per_node > 0:
        return (f"no cluster profile named: the default `{DEFAULT_PROFILE}` profile (the loopback test cluster of "
                "slurm/local-cluster.sh: partition debug, 00:20:00, GLOO_SOCKET_IFNAME=lo) is applied to this "
                f"{gpus_per_node}-GPU-per-node job; name your cluster's with --cluster NAME or $FTLAUNCH_CLUSTER "
                "(examples: cluster/profiles/examples/)")
    return None


def default_profile() -> str:
    """$FTLAUNCH_CLUSTER, else `local` (the cluster slurm/local-cluster.sh runs)."""
    return os.environ.get("FTLAUNCH_CLUSTER") or DEFAULT_PROFILE


def load_profile(name: str) -> "ClusterConfig":
    """The named profile, validated with the recipe's `cluster:` schema (so a typo fails with its key)."""
    from launcher.config.schema import ClusterConfig

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SlurmError(f"bad cluster profile name {name!r}")
    for folder in profile_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            try:
                return ClusterConfig.model_validate(data)
            except ValueError as err:
                raise SlurmError(f"cluster profile {path}: {err}") from None
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise SlurmError(f"unknown cluster profile {name!r} (known: {', '.join(known) or 'none'}; profiles are "
                     f"looked up in {', '.join(str(d) for d in profile_dirs())})")


def resolve_settings(profile_name: str | None, recipe_cluster: "ClusterConfig", *, nodes: int,
                     gpus_per_node: int | None = None, partition: str | None = None, time_limit: str | None = None,
                     procs: int | None = None) -> SlurmSettings:
    """Merge profile < recipe `cluster:` < flags into SlurmSettings; validate the flags as the schema validates the
    recipe's values (the same limits whichever way a value arrives)."""
    import re

    from launcher.config.schema import SLURM_NAME_PATTERN

    if nodes < 1:
        raise SlurmError(f"--nodes must be >= 1 (got {nodes})")
    if gpus_per_node is not None and gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be >= 0 (got {gpus_per_node})")
    if procs is not None and procs < 1:
        raise SlurmError(f"--procs must be >= 1 (got {procs})")
    if partition is not None and not re.fullmatch(SLURM_NAME_PATTERN, partition):
        raise SlurmError(f"--partition {partition!r} is not a partition name (letters, digits, `_.+-`)")
    name = profile_name or default_profile()
    profile = load_profile(name)

    def pick(key: str) -> Any:
        value = getattr(recipe_cluster, key)
        return value if value is not None else getattr(profile, key)

    gpus = gpus_per_node if gpus_per_node is not None else (pick("gpus_per_node") or 0)
    ranks = procs if procs is not None else (pick("ranks_per_node") or 1)
    if gpus > 0 and procs is not None and procs != gpus:
        raise SlurmError(f"--procs({procs}) != GPUs per node({gpus}): on Slurm there is one rank per GPU")
    time_text = time_limit or pick("time") or "01:00:00"
    parse_time_minutes(time_text)  # clear error for --time (the recipe's is checked by the schema)
    merged_env = {**profile.env, **recipe_cluster.env}
    from launcher.config.schema import is_secret_name

    defaults = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env = {**defaults, **{k: v for k, v in merged_env.items() if not is_secret_name(k) and v is not None}}
    # A non-secret name given as null also comes from the submitting environment (it is exported by sbatch).
    passed = sorted(k for k, v in merged_env.items() if is_secret_name(k) or v is None)
    options = [*profile.sbatch_options, *recipe_cluster.sbatch_options]
    for option in options:
        _sbatch_option_pair(option)  # clear error now rather than from sbatch later
    return SlurmSettings(
        profile=name, nodes=nodes, gpus_per_node=gpus, ranks_per_node=ranks,
        cpus_per_task=pick("cpus_per_task") or 1, time=time_text,
        partition=partition or pick("partition"), account=pick("account"), qos=pick("qos"), mem=pick("mem"),
        constraint=pick("constraint"), exclusive=bool(pick("exclusive")), sbatch_options=options,
        setup=[*profile.setup, *recipe_cluster.setup], container_image=pick("container_image"),
        env=env, secret_env=passed,
        max_requeues=pick("max_requeues") if pick("max_requeues") is not None else 3,
        shared_roots=[*profile.shared_roots, *recipe_cluster.shared_roots],
        tokenize_first=pick("tokenize_first") is not False, prepare_partition=pick("prepare_partition"),
        prepare_tasks=pick("prepare_tasks") or 1,
    )


def secret_values(settings: SlurmSettings, recipe_cluster: "ClusterConfig", profile: "ClusterConfig | None" = None,
                  environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Values of the pass-through variables for the submitting process's environment, and the names not set.

    A value given in the recipe (or profile) wins over the submitting environment; it lives only in memory."""
    environ = dict(os.environ) if environ is None else environ
    given = {**(profile.env if profile is not None else {}), **recipe_cluster.env}
    values, missing = {}, []
    for name in settings.secret_env:
        value = given.get(name) if given.get(name) is not None else environ.get(name)
        if value is None:
            missing.append(name)
        else:
            values[name] = value
    return values, missing


def _sbatch_option_pair(option: str) -> tuple[str, str | bool]:
    """`--reservation=big` -> ("reservation", "big"); `--requeue` -> ("requeue", True)."""
    m = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(.*))?", option, flags=re.S)
    if not m:
        raise SlurmError(f"cluster.sbatch_options: {option!r} is not a long sbatch option (--name or --name=value)")
    return m.group(1), (m.group(2) if m.group(2) is not None else True)


# ----------------------------------------------------------------------------------------------------- sbatch
INHERITED_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                       "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")
"""torch.distributed launch variables a submitting shell may hold (a notebook under torchrun, an earlier in-process
run). sbatch exports the submitting environment, and a rank that finds RANK and WORLD_SIZE takes them over Slurm's
(cluster/env.py: torchrun is checked first): every task would be "rank 0 of 1". Removed before submitting, and
unset in job.sbatch."""


def srun_command(settings: SlurmSettings, run_dir: str, python: str = sys.executable) -> list[str]:
    """The job step that starts every rank (one task per rank; job.sbatch runs it, and `launch plan` shows it as the
    launch command of a Slurm plan)."""
    container = [f"--container-image={settings.container_image}"] if settings.container_image else []
    return ["srun", *container, python, "-m", "launcher.train.job", run_dir]


def render_sbatch(settings: SlurmSettings, run_dir: str, job_name: str, python: str = sys.executable,
                  recipe_file: str | None = None) -> str:
    """The equivalent batch script, for `sbatch RUN_DIR/job.sbatch`.

    Every value from a recipe or profile is shell-quoted (sbatch unquotes `#SBATCH` values the same way); setup lines
    are shell code by design and written verbatim. Secrets are named, never written: the script checks they are set
    and sbatch's `--export=ALL` brings them from the submitting shell."""
    q = shlex.quote
    from launcher.config.schema import sbatch_unsafe

    for what, value in (("the run directory", run_dir), ("the job name", job_name)):  # in #SBATCH lines
        if (why := sbatch_unsafe(value)) is not None:
            raise SlurmError(f"{what} {value!r} {why}: it cannot be written into job.sbatch")
    for what, value in (("the python path", python), ("the recipe path", recipe_file or "")):  # shell-quoted
        if any(ord(ch) < 32 for ch in value):
            raise SlurmError(f"{what} {value!r} holds a control character: it cannot be written into job.sbatch")
    directives: list[tuple[str, str | bool]] = [
        ("job-name", job_name), ("nodes", str(settings.nodes)), ("ntasks-per-node", str(settings.tasks_per_node)),
        ("cpus-per-task", str(settings.cpus_per_task)), ("time", settings.time),
    ]
    if settings.gpus_per_node:
        directives.append(("gpus-per-node", str(settings.gpus_per_node)))
    for key in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(settings, key)
        if value is not None:
            directives.append((key, value))
    if settings.exclusive:
        directives.append(("exclusive", True))
    # In RUN_DIR itself: Slurm fails a job whose output directory does not exist yet, and logs/ appears only
    # when the ranks start.
    directives += [("output", f"{run_dir}/slurm-%j.out"), ("open-mode", "append"),
                   ("signal", f"{PREEMPT_SIGNAL}@{SIGNAL_DELAY_S}"), ("requeue", True), ("export", "ALL")]
    directives += [_sbatch_option_pair(o) for o in settings.sbatch_options]
    for key, value in directives:  # defence in depth: the schema and resolve_settings refuse these first
        if value is not True and (why := sbatch_unsafe(str(value))) is not None:
            raise SlurmError(f"--{key}={value!r} {why}")
    lines = ["#!/bin/bash",
             f"# Generated by ftlaunch (cluster profile {settings.profile!r}); the run directory is the contract.",
             f"# Recipe: {q(recipe_file)}" if recipe_file else "# Recipe: (see plan.json)",
             f"# Submit: sbatch {q(run_dir + '/' + SBATCH_FILE)}   (`launch` submits the same job through submitit)"]
    lines += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={q(str(v))}" for k, v in directives]
    lines += ["", "set -euo pipefail"]
    if settings.setup:
        lines += ["", "# setup (verbatim from the profile / recipe)", *settings.setup]
    lines += ["", "# environment of the ranks (torch.distributed variables exported from the submitting shell would",
              "# override Slurm's: every task would be rank 0 of 1)", f"unset {' '.join(INHERITED_DIST_VARS)}"]
    lines += [f"export {k}={q(v)}" for k, v in sorted(settings.env.items())]
    for name in settings.secret_env:  # names match [A-Za-z_][A-Za-z0-9_]* (schema), safe unquoted
        lines.append(f': "${{{name}:?export {name} in the shell that runs sbatch (never written to files)}}"')
    lines += ["",
              "# run history for `launch status` (the job id is digits)",
              f'printf \'{{"event": "started", "job_id": "%s", "restart": %s, "time": %s, "via": "sbatch"}}\\n\' '
              f'"$SLURM_JOB_ID" "${{SLURM_RESTART_COUNT:-0}}" "$(date +%s)" >> {q(run_dir + "/" + JOBS_FILE)}',
              "", "# one task per rank; ranks find rank 0 on the first node of the allocation (cluster/env.py)"]
    lines += [f"rc=0; {shlex.join(srun_command(settings, run_dir, python))} || rc=$?"]
    lines += [f"# exit {EXIT_INTERRUPTED}: stopped by SIGUSR1 (time limit) after a checkpoint: requeue, "
              "the ranks resume from it",
              f'if [ "$rc" -eq {EXIT_INTERRUPTED} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {settings.max_requeues} ]; then',
              '    scontrol requeue "$SLURM_JOB_ID"',
              "fi",
              'exit "$rc"', ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- pre-flight
@dataclass(frozen=True)
class PartitionInfo:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    max_minutes: int | None
    """None: no limit."""


#: How long `launch plan` waits for sinfo. An unreachable controller makes sinfo retry for ~9 s (measured); the
#: plan then reports the cluster as not checked, which is all a login-node preview needs.
PLAN_SINFO_TIMEOUT_S = 3.0


def sinfo_partitions(sinfo: str = "sinfo", timeout: float = 30) -> dict[str, PartitionInfo]:
    """Partitions as `sinfo` reports them: node count, CPUs and GPUs per node (largest node), time limit."""
    out = _run([sinfo, "-h", "-o", "%R|%D|%c|%G|%l"], timeout=timeout)
    found: dict[str, PartitionInfo] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        name, count, cpus, gres, limit = line.split("|")
        gpus = max((int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres)), default=0)
        minutes = None if limit.strip() in ("infinite", "n/a", "") else _limit_minutes(limit.strip())
        old = found.get(name)
        found[name] = PartitionInfo(
            name=name, nodes=int(count) + (old.nodes if old else 0),
            cpus_per_node=max(int(cpus.rstrip("+")), old.cpus_per_node if old else 0),
            gpus_per_node=max(gpus, old.gpus_per_node if old else 0), max_minutes=minutes)
    return found


def _limit_minutes(text: str) -> int | None:
    try:
        return parse_time_minutes(text)
    except SlurmError:
        return None


def default_partition(sinfo: str = "sinfo") -> str | None:
    """The partition marked `*` by sinfo, if any."""
    for line in _run([sinfo, "-h", "-o", "%P"]).splitlines():
        if line.strip().endswith("*"):
            return line.strip().rstrip("*")
    return None


def require_slurm() -> None:
    """Raise SlurmError when the Slurm client commands are not on PATH."""
    missing = [c for c in ("sbatch", "sinfo", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"Slurm not found: {', '.join(missing)} not on PATH. Submit from a Slurm login node, or "
                         "train on this machine with `launch RECIPE` (no --nodes/--cluster)")


def check_resources(settings: SlurmSettings, partitions: dict[str, PartitionInfo], partition: str | None) -> None:
    """Raise SlurmError when the request cannot fit the partition (the job would pend forever)."""
    if partition is None:
        raise SlurmError("no partition given and the cluster has no default: set --partition or cluster.partition")
    if partition not in partitions:
        raise SlurmError(f"unknown partition {partition!r}; sinfo lists: {', '.join(sorted(partitions)) or 'none'}")
    info = partitions[partition]
    if settings.nodes > info.nodes:
        raise SlurmError(f"--nodes {settings.nodes} but partition {partition!r} has {info.nodes} node(s)")
    if settings.gpus_per_node > info.gpus_per_node:
        raise SlurmError(f"{settings.gpus_per_node} GPUs per node requested but nodes of partition {partition!r} "
                         f"have {info.gpus_per_node}")
    cpus = settings.tasks_per_node * settings.cpus_per_task
    if cpus > info.cpus_per_node:
        raise SlurmError(f"{settings.tasks_per_node} ranks x {settings.cpus_per_task} CPUs per node requested but "
                         f"nodes of partition {partition!r} have {info.cpus_per_node} CPUs")
    if info.max_minutes is not None and settings.timeout_min > info.max_minutes:
        raise SlurmError(f"time limit {settings.time} ({settings.timeout_min} min) exceeds partition {partition!r}'s "
                         f"limit of {info.max_minutes} min")


def filesystem_type(path: Path) -> str | None:
    """The file system type holding `path`, from /proc/mounts (longest mount point prefix); None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best = str(path.resolve()), (-1, None)
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > best[0]:
            best = (len(point), parts[2])
    return best[1]


def check_shared_storage(run_dir: Path, settings: SlurmSettings) -> str | None:
    """None when the run directory is on storage every node sees; a warning when that cannot be told.

    Raises SlurmError when it is on a node-local file system of a multi-node job (ranks on other nodes would not
    find plan.json, and checkpoints would be split across nodes)."""
    resolved = run_dir.resolve()
    for root in settings.shared_roots:
        root_path = Path(root).resolve()
        if resolved == root_path or root_path in resolved.parents:
            return None
    fs = filesystem_type(resolved)
    if fs is not None and (fs in NETWORK_FS or fs.split(".")[-1] in NETWORK_FS):
        return None
    if fs in LOCAL_FS and settings.nodes > 1:
        raise SlurmError(f"run directory {resolved} is on a node-local {fs} file system, which the other nodes "
                         "cannot see: set output.root to shared storage, or list it in the profile's shared_roots")
    if fs in LOCAL_FS:
        return (f"run directory {resolved} is on a local {fs} file system: fine for one node, but resubmitted "
                "jobs must land on this node")
    return f"could not tell whether {resolved} is on shared storage (file system {fs or 'unknown'})"


def preflight(settings: SlurmSettings, run_dir: Path, *, need_cluster: bool = True) -> tuple[SlurmSettings, list[str]]:
    """All checks before submitting; returns settings with the partition filled in, and warnings.

    need_cluster=False (`launch plan`): an unreachable controller is a warning, not an error."""
    require_slurm()
    try:
        partitions = sinfo_partitions(timeout=30 if need_cluster else PLAN_SINFO_TIMEOUT_S)
    except SlurmError as err:
        if need_cluster:
            raise
        return settings, [f"cluster not checked: {err}"]
    partition = settings.partition or default_partition()
    check_resources(settings, partitions, partition)
    if settings.prepare_partition is not None and settings.prepare_partition not in partitions:
        raise SlurmError(f"unknown cluster.prepare_partition {settings.prepare_partition!r}; sinfo lists: "
                         f"{', '.join(sorted(partitions)) or 'none'}")
    prepare_on = settings.prepare_partition or partition
    if settings.prepare_tasks > partitions[prepare_on].nodes:
        raise SlurmError(f"cluster.prepare_tasks {settings.prepare_tasks} (one per node) but partition "
                         f"{prepare_on!r} has {partitions[prepare_on].nodes} node(s). Fix: at most "
                         f"{partitions[prepare_on].nodes}, or another cluster.prepare_partition")
    warning = check_shared_storage(run_dir, settings)
    from dataclasses import replace

    return replace(settings, partition=partition), [warning] if warning else []


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"Slurm not found: {cmd[0]} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(cmd)} did not answer in {timeout:.0f} s: is slurmctld up?") from None
    if proc.returncode != 0:
        raise SlurmError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------- run history
# -------------------------------------------------------------------------------------------------- submission
def _executor(run_dir: Path, settings: SlurmSettings, secrets: dict[str, str], job_name: str, *, nodes: int,
              tasks_per_node: int, gpus_per_node: int, partition: str | None, dependency: str | None,
              max_requeues: int, exclusive: bool, srun_args: list[str] | None = None) -> Any:
    """A submitit executor with the run's account/qos/setup/container, for a job of the given shape."""
    # submitit reads the preemption signal's name when it is imported; the job's submitit reads it from the
    # exported environment (sbatch --export=ALL is the default) and from the setup line below.
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL
    os.environ.update(secrets)  # reaches the job through sbatch's exported environment, never a file
    for name in INHERITED_DIST_VARS:  # this process only submits; its ranks get theirs from Slurm
        os.environ.pop(name, None)
    import submitit

    folder = run_dir / "submitit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
    additional: dict[str, Any] = dict(_sbatch_option_pair(o) for o in settings.sbatch_options)
    for key in ("account", "qos", "mem", "constraint"):
        if getattr(settings, key) is not None:
            additional[key] = getattr(settings, key)
    if exclusive:
        additional["exclusive"] = True
    additional["requeue"] = True
    if dependency:
        additional["dependency"] = dependency
        # A failed dependency would otherwise leave the job pending forever (DependencyNeverSatisfied).
        additional["kill_on_invalid_dep"] = "yes"
    setup = [*settings.setup, f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"]
    params: dict[str, Any] = dict(
        nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=settings.cpus_per_task,
        timeout_min=settings.timeout_min, name=job_name, slurm_partition=partition,
        slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_setup=setup, slurm_additional_parameters=additional,
    )
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    srun = [*(srun_args or []), *([f"--container-image={settings.container_image}"] if settings.container_image else [])]
    if srun:
        params["slurm_srun_args"] = srun
    executor.update_parameters(**params)
    return executor


def submit(run_dir: Path, settings: SlurmSettings, secrets: dict[str, str], job_name: str,
           dependency: str | None = None) -> str:
    """Submit the run through submitit; return the job id. Records the submission in RUN_DIR/jobs.jsonl."""
    executor = _executor(run_dir, settings, secrets, job_name, nodes=settings.nodes,
                         tasks_per_node=settings.tasks_per_node, gpus_per_node=settings.gpus_per_node,
                         partition=settings.partition, dependency=dependency, max_requeues=settings.max_requeues,
                         exclusive=settings.exclusive)
    from cluster.slurm_task import RankTask

    job = executor.submit(RankTask(str(run_dir), settings.env))
    record_event(run_dir, "submitted", job_id=str(job.job_id), via="submitit", kind="train",
                 submitit_folder=str(executor.folder), nodes=settings.nodes, tasks_per_node=settings.tasks_per_node,
                 partition=settings.partition, dependency=dependency)
    return str(job.job_id)


def submit_array(folder: Path, run_dirs: list[Path], settings: SlurmSettings, secrets: dict[str, str], job_name: str,
                 max_parallel: int | None = None, dependency: str | None = None) -> list[str]:
    """Submit one Slurm job array, one element per run directory (a sweep's trials: same shape, their own run
    directories), at most `max_parallel` running at once (`--array=0-N%max_parallel`). Each element is the same
    RankTask as a single run, so it checkpoints, requeues and resumes on its own. Returns the element ids
    (`ARRAY_INDEX`), recorded in each run directory's jobs.jsonl."""
    executor = _executor(folder, settings, secrets, job_name, nodes=settings.nodes,
                         tasks_per_node=settings.tasks_per_node, gpus_per_node=settings.gpus_per_node,
                         partition=settings.partition, dependency=dependency, max_requeues=settings.max_requeues,
                         exclusive=settings.exclusive)
    if max_parallel is not None:
        executor.update_parameters(slurm_array_parallelism=max_parallel)
    from cluster.slurm_task import RankTask

    with executor.batch():
        jobs = [executor.submit(RankTask(str(run_dir), settings.env)) for run_dir in run_dirs]
    ids = [str(job.job_id) for job in jobs]
    for run_dir, job_id in zip(run_dirs, ids):
        record_event(run_dir, "submitted", job_id=job_id, via="submitit", kind="train", array=True,
                     submitit_folder=str(executor.folder), nodes=settings.nodes,
                     tasks_per_node=settings.tasks_per_node, partition=settings.partition, dependency=dependency)
    return ids


def submit_prepare(run_dir: Path, settings: SlurmSettings, secrets: dict[str, str], job_name: str,
                   reason: str) -> str:
    """Submit the CPU-only job that converts the model and tokenizes the data (launcher/train/prepare.py):
    `prepare_tasks` tasks, one per node, no GPU, each with the CPUs a node's training tasks would have, on
    `prepare_partition` (else the training partition). Returns its job id; the training job is submitted with
    `dependency=afterok:<id>`. One failed task ends them all (`srun --kill-on-bad-exit`): the first task would
    otherwise wait for a part that never comes."""
    from dataclasses import replace

    tasks = settings.prepare_tasks
    shape = replace(settings, cpus_per_task=settings.cpus_per_task * settings.tasks_per_node)
    executor = _executor(run_dir, shape, secrets, f"{job_name}-prepare", nodes=tasks, tasks_per_node=1,
                         gpus_per_node=0, partition=settings.prepare_partition or settings.partition,
                         dependency=None, max_requeues=0, exclusive=False, srun_args=["--kill-on-bad-exit=1"])
    from cluster.slurm_task import PrepareTask

    job = executor.submit(PrepareTask(str(run_dir), settings.env))
    record_event(run_dir, "submitted", job_id=str(job.job_id), via="submitit", kind="prepare",
                 submitit_folder=str(executor.folder), reason=reason, nodes=tasks,
                 partition=settings.prepare_partition or settings.partition)
    return str(job.job_id)
