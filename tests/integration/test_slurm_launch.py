"""`launch` on the real two-node Slurm cluster (slurm/local-cluster.sh): submission through submitit, the written
job.sbatch with plain sbatch, preemption and requeue, status/logs/cancel, hostile recipe strings, clear errors.

The cluster has 4 CPUs (2 nodes x 2); the tiny recipe runs one rank per node (`cluster.ranks_per_node: 1`), so a
job is 2 ranks on 2 nodes: multi-node, and half the CPU of 2 ranks per node on this 2-core machine. A local 2-rank
run of the same recipe (the `reference` fixture, started once per module, beside the cluster's jobs) is what every
Slurm run must reproduce: same world size, fixed seeds, so an uninterrupted, a preempted and a requeued run all end with
its losses and weights. Each test stands alone. Timings go to the terminal summary (measured, not asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pytest
import yaml

from cluster.runs import run_status
from launcher.common.exits import EXIT_JOB_CANCELLED

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
#: Losses of the Slurm run vs a local 2-rank run: measured identical (0.0) on this machine; gloo's all-reduce of
#: 2 ranks sums in the same order whether the ranks are on one host or two.
LOSS_TOLERANCE = 1e-6
#: Long enough that a signal sent at step 3 lands mid-run: a step of the tiny model takes ~40 ms, and
#: scancel -> slurmd -> submitit -> trainer takes a few hundred ms (with 8 steps the run had ended when it arrived).
STEPS = 40


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A directory with the tiny recipe (STEPS steps of 2 ranks x micro batch 2, checkpoint every 4 steps; on Slurm
    one rank on each of 2 nodes)."""
    root = tmp_path_factory.mktemp("slurm-launch")
    rows = [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in (WORDS[i % len(WORDS)] for i in range(64))]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "tiny", "model": {"path": str(tiny_model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(root / "train.jsonl"), "format": "messages"}, "max_length": 64},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"lr": 3e-3, "micro_batch": 2, "max_steps": STEPS, "warmup_steps": 2, "seed": 3},
        "eval": {"at_start": False}, "checkpoint": {"every_steps": 4, "keep_last": STEPS},
        "logging": {"progress": False, "tensorboard": False}, "output": {"root": str(root / "runs")},
        "cluster": {"ranks_per_node": 1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def env(slurm_cluster: SlurmCluster, work: Path) -> dict[str, str]:
    return {**slurm_cluster.env, "FTLAUNCH_CACHE": str(work / "cache")}


@dataclass
class LocalReference:
    """A `launch tiny.yaml --procs 2` run in the background; `run_dir()` waits for it to end."""

    proc: subprocess.Popen[str]
    path: Path
    stderr: str = ""

    def run_dir(self) -> Path:
        if self.proc.returncode is None:
            self.stderr = self.proc.communicate(timeout=300)[1]
        assert self.proc.returncode == 0, f"the local reference run failed:\n{self.stderr[-3000:]}"
        return self.path


@pytest.fixture(scope="module")
def reference(env: dict[str, str], work: Path) -> Iterator[LocalReference]:
    proc = subprocess.Popen([sys.executable, "-m", "launcher", str(work / "tiny.yaml"), "--procs", "2",
                             "output.name=local2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    yield LocalReference(proc, work / "runs" / "local2")
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def launch(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"launch {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def submit(env: dict[str, str], *args: str) -> tuple[str, Path]:
    """`launch ...` to Slurm: (job id, run directory)."""
    proc = launch(env, *args)
    run_dir = Path(proc.stderr.split("run directory ", 1)[1].splitlines()[0])
    return proc.stdout.strip().splitlines()[-1], run_dir


@dataclass
class Following:
    """A `launch ... --follow` running in the background, its output in files (read while it runs)."""

    proc: subprocess.Popen[str]
    out: Path
    err: Path

    def stderr(self) -> str:
        return self.err.read_text() if self.err.is_file() else ""

    def submitted(self) -> tuple[str, Path]:
        """(job id, run directory), once it has submitted."""
        wait_for("the submission", lambda: self.out.is_file() and self.out.read_text().strip()
                 or self.proc.poll() is not None, 120, poll=0.2)
        assert self.out.read_text().strip(), f"launch --follow exited {self.proc.poll()}:\n{self.stderr()}"
        run_dir = Path(self.stderr().split("run directory ", 1)[1].splitlines()[0])
        return self.out.read_text().splitlines()[0].strip(), run_dir

    def finished(self, timeout: float = 60) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it has exited."""
        code = self.proc.wait(timeout=timeout)
        return code, self.out.read_text(), self.stderr()


def launch_following(env: dict[str, str], name: str, *args: str) -> Following:
    out, err = (Path(env["FTLAUNCH_CACHE"]).parent / f"{name}.{kind}" for kind in ("out", "err"))
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *args, "--follow"], env=env, stdout=stdout,
                                stderr=stderr, text=True)
    return Following(proc, out, err)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 240, poll: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            rows.append(row)
    return rows


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_completed(run_dir: Path, timeout: float = 300) -> None:
    def ended() -> str | None:
        status = run_status(run_dir)
        return status.state if status.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    state = wait_for(f"{run_dir.name} to end", ended, timeout, poll=1.0)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("logs/rank0.log")))
    assert state == "COMPLETED", f"{run_dir.name}: {state}\n{logs}"
    wait_for("outputs", lambda: (run_dir / "adapter" / "adapter_model.safetensors").is_file(), 30)


def losses(run_dir: Path) -> list[float]:
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    return [r["loss"] for r in rows]


def assert_same_weights(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= 1e-6, f"final weights differ by {diff}"
    return diff


# ------------------------------------------------------------------------------------------------------ tests
def test_two_nodes_train_to_the_end_like_two_local_ranks(env: dict[str, str], work: Path,
                                                          reference: LocalReference,
                                                          integration_timings: dict[str, str]) -> None:
    """`launch recipe --nodes 2 --follow` trains to the end, printing rank 0's log and the job's states, and exits 0;
    its losses equal a local `--procs 2` run's. Meanwhile: a second submission (2 ranks per node: the CPUs the first
    job leaves cannot hold it), also followed, pends behind it and is cancelled with `launch cancel`: its follow exits
    6; `launch status/logs/runs` read real jobs."""
    recipe = str(work / "tiny.yaml")
    t0 = time.time()
    following = launch_following(env, "first", recipe, "--nodes", "2")
    job_id, run_dir = following.submitted()
    queued = launch_following(env, "queued", recipe, "--nodes", "2", "--procs", "2", "output.name=queued")
    queued_id, queued_dir = queued.submitted()
    # The second job needs both CPUs of each node while the first holds one: cancel it while it pends.
    wait_for("the queued job's follow to see it pending", lambda: "PENDING" in queued.stderr(), 30, poll=0.5)
    out = launch(env, "cancel", str(queued_dir)).stderr
    assert f"cancelled Slurm job {queued_id}" in out
    wait_for("the cancelled job's state", lambda: run_status(queued_dir).state == "CANCELLED", 60, poll=1)
    assert "CANCELLED" in launch(env, "status", str(queued_dir)).stdout
    code, _, said = queued.finished()
    assert code == EXIT_JOB_CANCELLED and f"Slurm job {queued_id}: PENDING" in said, said
    assert f"Slurm job {queued_id} ended: CANCELLED (exit code {EXIT_JOB_CANCELLED})" in said, said

    wait_for("the first training step", lambda: train_rows(run_dir), 240, poll=0.2)
    integration_timings["launch --nodes 2 -> first training step"] = f"{time.time() - t0:.1f} s"
    status = json.loads(launch(env, "status", str(run_dir), "--json").stdout)
    assert status["job_id"] == job_id and status["kind"] == "slurm" and status["world_size"] == 2
    assert status["state"] in ("RUNNING", "COMPLETING", "COMPLETED") and status["node_list"] == "node[1-2]"
    assert " rank0 " in launch(env, "logs", str(run_dir)).stdout
    launch(env, "logs", str(run_dir), "--rank", "1")  # rank 1 (on node2) logs only warnings: may be empty
    assert "ranks 0..1" in launch(env, "logs", str(run_dir), "--rank", "2", check=False).stderr
    wait_completed(run_dir)
    t_done = time.time()
    integration_timings[f"launch --nodes 2 -> done ({STEPS} steps, 2 ranks)"] = f"{t_done - t0:.1f} s"
    code, streamed, said = following.finished()
    integration_timings["job done -> launch --follow exits"] = f"{time.time() - t_done:.1f} s"
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert code == 0 and streamed.startswith(job_id + "\n") and log0 in streamed, said  # every line, in order
    assert f"step {STEPS}/{STEPS}" in streamed and "outputs:" in streamed
    assert f"Slurm job {job_id}: " in said and "RUNNING on node[1-2]" in said, said
    assert f"Slurm job {job_id} ended: COMPLETED (exit code 0)" in said, said
    follow = launch(env, "logs", str(run_dir), "--follow", timeout=30)  # returns at once: the run has ended
    assert "outputs:" in follow.stdout and "ended: COMPLETED (exit code 0)" in follow.stderr
    ran = json.loads(launch(env, "status", str(run_dir), "--json").stdout)["elapsed_s"]
    assert 0 < ran < time.time() - t0  # the attempt rank 0 recorded: not the queue, not the time since
    local_dir = reference.run_dir()
    diff = max(abs(a - b) for a, b in zip(losses(run_dir), losses(local_dir)))
    integration_timings["loss |slurm 2x1 - local 2| max"] = f"{diff:.2e}"
    assert diff <= LOSS_TOLERANCE
    table = launch(env, "runs", "--root", str(work / "runs")).stdout
    for name in ("tiny", "queued", "local2"):
        assert name in table
    assert job_id in table and "COMPLETED" in table and "CANCELLED" in table


def test_untokenized_data_is_prepared_by_a_cpu_job_first(env: dict[str, str], work: Path, slurm_cluster: SlurmCluster,
                                                         reference: LocalReference,
                                                         integration_timings: dict[str, str]) -> None:
    """A cold tokenization cache: `launch --nodes 2` first submits a CPU job that tokenizes (here as 2 tasks on 2
    nodes, `cluster.prepare_tasks: 2`), and the training job waits for it (afterok), then reads the cache instead of
    tokenizing on rank 0. A warm cache: no such job. (That N tasks write the bytes of one: tests/train/test_data.py.)"""
    cold = {**env, "FTLAUNCH_CACHE": str(work / "cold-cache")}
    t0 = time.time()
    proc = launch(cold, str(work / "tiny.yaml"), "--nodes", "2", "output.name=tokenize-first",
                  "cluster.prepare_tasks=2")
    run_dir = work / "runs" / "tokenize-first"
    prepare, train = [e for e in events(run_dir) if e["event"] == "submitted"]
    assert (prepare["kind"], train["kind"], train["job_id"]) == ("prepare", "train", proc.stdout.split()[-1])
    assert train["dependency"] == f"afterok:{prepare['job_id']}"
    assert f"CPU job {prepare['job_id']} prepares it" in " ".join(proc.stderr.split())
    wait_for("the first training step", lambda: train_rows(run_dir), 240, poll=0.2)
    integration_timings["launch --nodes 2, cold cache (tokenize job first) -> first training step"] = \
        f"{time.time() - t0:.1f} s"
    wait_completed(run_dir)
    status = run_status(run_dir)
    assert status.prepare == f"{prepare['job_id']} COMPLETED"
    times = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", f"{prepare['job_id']},{train['job_id']}",
                              "-o", "JobID,Start,End")
    rows = {r.split("|")[0]: r.split("|")[1:] for r in times.splitlines() if r.strip()}
    assert rows[train["job_id"]][0] >= rows[prepare["job_id"]][1]  # ISO times: training started after it ended
    assert "prepared in" in (run_dir / "logs" / "prepare.log").read_text()
    assert "task 1 of 2" in (run_dir / "logs" / "prepare-1.log").read_text()
    started = [e for e in events(run_dir) if e["event"] == "started" and e.get("kind") == "prepare"]
    assert started[0]["tasks"] == 2 and started[0]["nodes"] == "node[1-2]"
    assert "read from the tokenization cache" in (run_dir / "logs" / "rank0.log").read_text()
    assert losses(run_dir) == pytest.approx(losses(reference.run_dir()), abs=1e-6)

    again = launch(cold, str(work / "tiny.yaml"), "--nodes", "2", "output.name=warm")
    warm = work / "runs" / "warm"
    assert [e["kind"] for e in events(warm) if e["event"] == "submitted"] == ["train"]
    assert "tokenize first" not in again.stderr
    launch(env, "cancel", str(warm))
    wait_for("the cancelled state", lambda: run_status(warm).state == "CANCELLED", 60, poll=0.5)


def test_preemption_checkpoints_requeues_and_resumes(env: dict[str, str], work: Path, reference: LocalReference,
                                                      integration_timings: dict[str, str]) -> None:
    """SIGUSR1 (what Slurm sends before a time limit or preemption; submitit's signal here) mid-run: the ranks
    checkpoint, submitit requeues, the requeued job resumes and ends with the uninterrupted run's weights. Its
    `launch --follow` says the requeue, follows the requeued job on and exits 0."""
    following = launch_following(env, "preempted", str(work / "tiny.yaml"), "--nodes", "2", "output.name=preempted")
    job_id, run_dir = following.submitted()
    wait_for("step 3", lambda: len(train_rows(run_dir)) >= 3, 240, poll=0.05)
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    started = wait_for("the requeued start", lambda: [e for e in events(run_dir)
                                                      if e["event"] == "started" and e.get("restart") == 1], 180)
    requeued = [e for e in events(run_dir) if e["event"] == "requeued"]
    assert requeued and requeued[0]["time"] <= started[0]["time"]
    stopped_at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                     if int(p.name.split("-")[1]) <= len(train_rows(run_dir)))
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "stopped by SIGUSR1" in log0
    # The checkpoint was complete before the requeue: the requeued job resumed from the step it stopped at.
    wait_for("resume", lambda: "resumed from step-" in (run_dir / "logs" / "rank0.log").read_text(), 180)
    resumed_line = [line for line in (run_dir / "logs" / "rank0.log").read_text().splitlines()
                    if "resumed from step-" in line][-1]
    assert 3 <= stopped_at < STEPS and f"(step {stopped_at})" in resumed_line, resumed_line
    n_before = stopped_at
    wait_for("a step after resuming", lambda: any(r["step"] > n_before for r in train_rows(run_dir)), 180, poll=0.2)
    integration_timings["preemption signal -> requeued job running"] = f"{started[0]['time'] - t_signal:.1f} s"
    integration_timings["preemption signal -> first step after resume"] = f"{time.time() - t_signal:.1f} s"
    wait_completed(run_dir)
    assert losses(run_dir) == pytest.approx(losses(reference.run_dir()), abs=1e-6)
    assert_same_weights(run_dir, reference.run_dir())
    assert json.loads(launch(env, "status", str(run_dir), "--json").stdout)["job_id"] == job_id
    code, streamed, said = following.finished()
    assert code == 0 and f"Slurm job {job_id} ended: COMPLETED (exit code 0)" in said, said
    assert "(requeued: preemption or the time limit; the same run resumes from its last checkpoint)" in said, said
    assert "stopped by SIGUSR1" in streamed and (run_dir / "logs" / "rank0.log").read_text() in streamed


def test_plain_sbatch_of_the_written_script_and_requeue_without_warning(
        env: dict[str, str], work: Path, slurm_cluster: SlurmCluster, reference: LocalReference,
        integration_timings: dict[str, str]) -> None:
    """`launch plan --nodes 2 --out DIR` writes DIR/job.sbatch; plain `sbatch` of it trains. `scontrol requeue` (no
    warning signal) restarts it; it resumes from a checkpoint and ends with the reference weights."""
    plan = launch(env, "plan", str(work / "tiny.yaml"), "--nodes", "2", "--json", "--out", str(work / "runs" / "plain"))
    run_dir = Path(json.loads(plan.stdout)["run_dir"])
    script = run_dir / "job.sbatch"
    assert "#SBATCH --nodes=2" in script.read_text() and "#SBATCH --partition=debug" in script.read_text()
    job_id = slurm_cluster.run("sbatch", "--parsable", str(script), cwd=work).strip()

    def step3() -> bool:
        if len(train_rows(run_dir)) >= 3:
            return True
        state = slurm_cluster.run("scontrol", "show", "job", "-o", job_id).split("JobState=", 1)[1].split()[0]
        logs = "\n".join(p.read_text()[-3000:] for p in run_dir.glob("logs/*.log"))
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state} before step 3:\n{logs}"
        return False

    wait_for("step 3", step3, 240, poll=0.05)
    t_requeue = time.time()
    slurm_cluster.run("scontrol", "requeue", job_id)
    wait_for("the restart", lambda: [e for e in events(run_dir) if e.get("restart") == 1], 180)
    integration_timings["scontrol requeue -> restarted"] = f"{time.time() - t_requeue:.1f} s"
    assert json.loads(launch(env, "status", str(run_dir), "--json").stdout)["job_id"] == job_id
    wait_completed(run_dir)
    assert "resumed from step-" in (run_dir / "logs" / "rank0.log").read_text()
    assert losses(run_dir) == pytest.approx(losses(reference.run_dir()), abs=1e-6)
    assert_same_weights(run_dir, reference.run_dir())


def test_cancelled_run_resumes_on_one_node(env: dict[str, str], work: Path, reference: LocalReference,
                                           integration_timings: dict[str, str]) -> None:
    """A 2-node run cancelled mid-run (no warning: the checkpoint being written may be half done) is resubmitted
    with `launch --resume RUN --cluster local --nodes 1`: re-planned for 1 node x 1 rank (grad_accum 1 -> 2 keeps
    the global batch), it continues from its last complete checkpoint and ends on the 2-rank curve."""
    job_id, run_dir = submit(env, str(work / "tiny.yaml"), "--nodes", "2", "output.name=moved")
    wait_for("step 5", lambda: len(train_rows(run_dir)) >= 5, 240, poll=0.05)
    launch(env, "cancel", str(run_dir))
    wait_for("the cancelled state", lambda: run_status(run_dir).state == "CANCELLED", 60, poll=0.5)
    refused = launch(env, "--resume", str(run_dir), "--cluster", "local", "--nodes", "1", "--procs", "3", check=False)
    assert refused.returncode == 2 and "divides 2: 1, 2" in " ".join(refused.stderr.split()), refused.stderr
    t0 = time.time()
    proc = launch(env, "--resume", str(run_dir), "--cluster", "local", "--nodes", "1")
    assert "resume: 2 -> 1 ranks; grad_accum 1 -> 2 keeps the global batch 4" in " ".join(proc.stderr.split())
    new_id = proc.stdout.strip().splitlines()[-1]
    assert new_id != job_id
    wait_completed(run_dir)
    integration_timings["launch --resume (2 -> 1 ranks) -> done"] = f"{time.time() - t0:.1f} s"
    status = json.loads(launch(env, "status", str(run_dir), "--json").stdout)
    assert (status["job_id"], status["world_size"], status["nodes"]) == (new_id, 1, 1)
    assert "resumed from step-" in (run_dir / "logs" / "rank0.log").read_text()
    assert (run_dir / "plan-history" / "001.json").is_file() and "#SBATCH --nodes=1" in (run_dir / "job.sbatch").read_text()
    # 1 rank x grad_accum 2 sees the examples of 2 ranks x 1 in each step; only the summation order differs.
    assert losses(run_dir) == pytest.approx(losses(reference.run_dir()), abs=1e-4)


HOSTILE = "it's \"q\" $(touch {c}) `touch {c}` ; touch {c} && x' ; touch {c} ; '"


def test_hostile_recipe_strings_run_nothing(env: dict[str, str], work: Path, slurm_cluster: SlurmCluster,
                                            tmp_path: Path, tiny_model_dir: Path) -> None:
    """Quotes, $(...), backticks and `;` in every string field that reaches Slurm: both the submitit submission
    (with its tokenization job: the cache is cold) and plain sbatch of job.sbatch train and run nothing else."""
    canary = tmp_path / "canary"
    bad = HOSTILE.replace("{c}", str(canary))
    root = tmp_path / f"root {bad}"
    model = tmp_path / f"model {bad}"
    model.parent.mkdir(parents=True)  # the canary's path makes the hostile string hold `/`
    model.symlink_to(tiny_model_dir, target_is_directory=True)
    recipe = yaml.safe_load((work / "tiny.yaml").read_text())
    recipe.update(description=bad, output={"root": str(root)})
    recipe["model"]["path"] = str(model)
    recipe["optim"]["max_steps"] = 2
    recipe["cluster"] = {"env": {"HOSTILE_VALUE": bad}, "sbatch_options": [f"--comment={bad}"]}
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cold = {**env, "FTLAUNCH_CACHE": str(tmp_path / "cache")}
    job_id, run_dir = submit(cold, str(path), "--cluster", "local", "--procs", "1")
    assert run_dir.parent == root
    assert [e["kind"] for e in events(run_dir) if e["event"] == "submitted"] == ["prepare", "train"]
    plan = launch(cold, "plan", str(path), "--cluster", "local", "--procs", "1", "--out", str(root / "plain"))
    assert "Slurm batch script" in plan.stdout
    wait_for("the submitit job to end", lambda: run_status(run_dir).state in ("FAILED", "COMPLETED"), 180, poll=1)
    assert run_status(run_dir).state == "COMPLETED", (run_dir / "logs" / "rank0.log").read_text()[-3000:]
    state = slurm_cluster.sbatch_and_wait(str(root / "plain" / "job.sbatch"), cwd=tmp_path)
    assert state == "COMPLETED", (root / "plain" / "logs" / "rank0.log").read_text()[-3000:]
    comment = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Comment")
    assert not canary.exists()
    assert bad in comment or comment.strip() == ""  # sacct stores the comment only with AccountingStoreFlags


@pytest.mark.parametrize("args, message", [
    (["--partition", "nope"], "unknown partition 'nope'; sinfo lists: debug"),
    (["--nodes", "3"], "--nodes 3 but partition 'debug' has 2 node(s)"),
    (["--gpus-per-node", "3"], "3 GPUs per node requested but nodes of partition 'debug' have 2"),
    (["--time", "1h"], "bad time limit '1h'"),
    (["--time", "2:00:00"], "exceeds partition 'debug'"),
    (["--cluster", "nowhere"], "unknown cluster profile 'nowhere'"),
    (["cluster.prepare_tasks=3"], "cluster.prepare_tasks 3 (one per node) but partition 'debug' has 2 node(s)"),
])
def test_clear_errors_before_submitting(env: dict[str, str], work: Path, args: list[str], message: str) -> None:
    proc = launch(env, str(work / "tiny.yaml"), "--nodes", "2", *args, check=False)
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr


def test_no_slurm_on_path(env: dict[str, str], work: Path) -> None:
    no_slurm = {**env, "PATH": str(Path(sys.executable).parent)}
    proc = launch(no_slurm, str(work / "tiny.yaml"), "--nodes", "2", check=False)
    assert proc.returncode == 2 and "Slurm not found" in proc.stderr, proc.stderr


def test_a_sweep_is_one_job_array_and_a_preempted_trial_resumes_alone(env: dict[str, str], work: Path) -> None:
    """`launch SWEEP --cluster local`: 2 configurations x 2 seeds as one Slurm array (4 one-rank elements). The two
    configurations differ only in checkpoint.keep_last, so c0-s3 and c1-s3 train the same: c0-s3 gets SIGUSR1 mid-run,
    requeues and resumes alone, and ends on c1-s3's losses. The last trial to end writes the report, whose mean and
    std are the statistics of the trials' own metrics; submitting again runs nothing."""
    import statistics

    sweep = {"extends": "tiny.yaml", "name": "sweep", "sweep": {
        "seeds": 2, "grid": {"checkpoint.keep_last": [STEPS, STEPS - 1]}, "metric": "loss", "max_parallel": 4}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    env = {**env, "FTLAUNCH_CACHE": str(work / "sweep-cache")}  # cold: the trials share one tokenize job
    proc = launch(env, str(work / "sweep.yaml"), "--cluster", "local")
    array = proc.stdout.strip().splitlines()[-1]
    sweep_dir = work / "runs" / "sweep"
    names = ["c0-s3", "c0-s4", "c1-s3", "c1-s4"]
    trials = {name: sweep_dir / "trials" / name for name in names}
    submitted = [e for n in names for e in events(trials[n]) if e["event"] == "submitted"]
    assert [e["job_id"] for e in submitted if e["kind"] == "train"] == [f"{array}_{i}" for i in range(4)]
    prepare = [e for e in submitted if e["kind"] == "prepare"]  # one tokenize job: the trials share their data
    assert len(prepare) == 1 and all(e["dependency"] == f"afterok:{prepare[0]['job_id']}"
                                     for e in submitted if e["kind"] == "train")
    target = trials["c0-s3"]
    wait_for("step 3 of c0-s3", lambda: len(train_rows(target)) >= 3, 240, poll=0.05)
    subprocess.run(["scancel", "--signal=USR1", f"{array}_0"], env=env, check=True, timeout=30)
    for name in names:
        wait_completed(trials[name])
    assert [e for e in events(target) if e["event"] == "requeued"]
    assert "resumed from step-" in (target / "logs" / "rank0.log").read_text()
    assert not [e for e in events(trials["c1-s3"]) if e["event"] == "requeued"]  # the others ran once
    assert losses(target) == pytest.approx(losses(trials["c1-s3"]), abs=LOSS_TOLERANCE)
    assert losses(trials["c0-s3"]) != losses(trials["c0-s4"])
    report = json.loads((sweep_dir / "report.json").read_text())  # written by the last trial to end
    for config, pair in ((0, ("c0-s3", "c0-s4")), (1, ("c1-s3", "c1-s4"))):
        finals = [losses(trials[n])[-1] for n in pair]
        assert report["configs"][config]["mean"] == pytest.approx(statistics.fmean(finals))
        assert report["configs"][config]["std"] == pytest.approx(statistics.stdev(finals))
    again = launch(env, str(work / "sweep.yaml"), "--cluster", "local")
    assert "every trial has completed" in " ".join(again.stderr.split()) and again.stdout.strip() == ""
    status = launch(env, "status", str(sweep_dir), "--json")
    assert {row["state"] for row in json.loads(status.stdout)} == {"completed"}
    # The same sweep on this machine, two trials at a time: the same report (one rank per trial either way).
    local_root = work / "local-sweep-runs"
    launch(env, str(work / "sweep.yaml"), f"output.root={local_root}", "--parallel", "2", timeout=300)
    local = json.loads((local_root / "sweep" / "report.json").read_text())
    assert local["best_config"] == report["best_config"]
    for mine, theirs in zip(local["configs"], report["configs"]):
        assert mine["n"] == theirs["n"] == 2
        assert mine["mean"] == pytest.approx(theirs["mean"], abs=LOSS_TOLERANCE)
        assert mine["std"] == pytest.approx(theirs["std"], abs=LOSS_TOLERANCE)
