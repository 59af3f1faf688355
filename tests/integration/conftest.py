"""Fixtures for integration tests: a real two-node Slurm cluster on loopback (slurm/local-cluster.sh).

The cluster is started once per session and stopped at the end, unless it was already up (then it is
left running, so repeated local runs skip the start). Without root or without the Slurm packages the
tests are skipped, with the reason; with FTLAUNCH_REQUIRE_SLURM=1 (CI) they fail instead, so a broken
set-up cannot pass as "skipped".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "srun", "sacct")

#: Timings the integration tests measure (Slurm, strategies); printed in the terminal summary, never asserted.
TIMINGS: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject.toml so that this directory is self-contained.
    config.addinivalue_line("markers", "slurm: needs the local Slurm cluster (slurm/local-cluster.sh)")


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: tests/conftest.py prints them in the controller's summary
        workeroutput["integration_timings"] = dict(TIMINGS)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS and not hasattr(terminalreporter.config, "workeroutput"):
        terminalreporter.section("integration timings (measured, not asserted)")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {value}")


def _required() -> bool:
    return os.environ.get("FTLAUNCH_REQUIRE_SLURM", "") not in ("", "0")


def _unavailable(reason: str) -> None:
    """Skip, or fail when CI requires Slurm."""
    if _required():
        pytest.fail(f"FTLAUNCH_REQUIRE_SLURM is set but {reason}", pytrace=False)
    pytest.skip(reason)


def _script(action: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)


@dataclass
class SlurmCluster:
    """Handle on the running cluster: its state directory and an environment for jobs."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> str:
        """Run a Slurm command with the job environment; return stdout, fail with stderr on error."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def sbatch_and_wait(self, *args: str, timeout: float = 240, cwd: Path | None = None) -> str:
        """Submit a batch job and poll until it ends; return its final state (COMPLETED, FAILED, ...).

        Used instead of ``sbatch --wait``, whose polling interval doubles (2, 4, 8, 16 s ...): an 11 s
        job returned after 42 s on a loaded box. slurmctld keeps finished jobs for MinJobAge (60 s),
        so ``scontrol show job`` sees the end at once, before accounting does.
        """
        job_id = self.run("sbatch", "--parsable", *args, cwd=cwd).strip().split(";")[0]
        deadline, state = time.monotonic() + timeout, "not yet seen"
        while time.monotonic() < deadline:
            out = self.run("scontrol", "show", "job", "-o", job_id)
            state = out.split("JobState=", 1)[1].split()[0]
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING"):
                return state
            time.sleep(0.5)
        self.run("scancel", job_id)
        raise AssertionError(f"job {job_id} still {state} after {timeout} s")

    def log_tail(self, name: str, lines: int = 30) -> str:
        """Last lines of a daemon log, for assertion messages."""
        path = self.state_dir / "log" / name
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else f"(no {path})"


def _job_env(state_dir: Path) -> dict[str, str]:
    # A clean shell's: an in-process run earlier in this worker set RANK, WORLD_SIZE, MASTER_* (launcher.train.job),
    # which sbatch would export to every task (the product removes them before it submits: cluster/slurm.py).
    from cluster.slurm import INHERITED_DIST_VARS

    env = {k: v for k, v in os.environ.items() if k not in INHERITED_DIST_VARS}
    env.update(
        SLURM_CONF=str(state_dir / "etc" / "slurm.conf"),  # even if /etc/slurm holds another config
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH")])),
        GLOO_SOCKET_IFNAME="lo",  # test traffic stays on loopback
        OMP_NUM_THREADS="1",  # four ranks share two cores
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


@pytest.fixture(scope="module", autouse=True)
def _one_slurm_module_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Two xdist workers may reach two Slurm modules at once; their jobs would queue behind each other's on the
    cluster's two nodes and run into their timeouts. The second waits for the first here (an flock, released when
    the module ends)."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "ftlaunch-slurm-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def integration_timings() -> dict[str, str]:
    """Where tests put timings to print in the terminal summary."""
    return TIMINGS


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the local cluster for the session (see module docstring)."""
    if os.geteuid() != 0:
        _unavailable("the local Slurm cluster needs root (daemons, /etc/hosts, mknod)")
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing and _required():
        install = _script("install", timeout=600)
        assert install.returncode == 0, f"slurm/local-cluster.sh install failed:\n{install.stderr}"
        missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (run: slurm/local-cluster.sh install)")

    state_dir = Path(os.environ.get("FTLAUNCH_SLURM_DIR", "/tmp/ftlaunch-slurm"))
    with _cluster_users_lock(state_dir) as users:
        # Shared for the whole session; blocks only while a finishing session is stopping the cluster.
        # Concurrent starts are serialized by local-cluster.sh itself.
        fcntl.flock(users, fcntl.LOCK_SH)
        was_up = _script("status").returncode == 0
        fresh = not (state_dir / "mysql" / "data").exists()  # first start also initialises the database
        t0 = time.perf_counter()
        started = _script("start")
        elapsed = time.perf_counter() - t0
        if started.returncode != 0:
            pytest.fail(f"slurm/local-cluster.sh start failed:\n{started.stderr}", pytrace=False)
        marker = state_dir / "run" / "started-by-pytest"
        if not was_up:
            marker.touch()
        how = "already running" if was_up else "fresh state dir" if fresh else "existing state dir"
        TIMINGS["cluster start"] = f"{elapsed:.1f} s ({how})"
        yield SlurmCluster(state_dir=state_dir, env=_job_env(state_dir))
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still uses the cluster; the last one out stops it
        if marker.exists():
            _script("stop")
            marker.unlink(missing_ok=True)


@contextlib.contextmanager
def _cluster_users_lock(state_dir: Path) -> Iterator[int]:
    """A file lock that every pytest session using the cluster holds shared.

    Several pytest sessions (other engineers', CI shards) may run the Slurm tests at once on one machine.
    A session that finds the cluster down starts it and leaves a marker; at the end, a session that can
    take the lock exclusively (no other session still holds it) stops the cluster if the marker is there.
    A cluster someone started by hand (no marker) is left running.
    """
    fd = os.open(f"{state_dir}.users", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)  # releases the lock
