"""cluster/slurm.py without a cluster: profiles, settings precedence, the job.sbatch golden file, shell quoting of
hostile values (run with a stub srun), secrets, time limits, pre-flight errors. The same against a real Slurm is in
tests/integration/test_slurm_launch.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.slurm import (SlurmError, SlurmSettings, check_resources, check_shared_storage, parse_time_minutes,
                           PartitionInfo, render_sbatch, require_slurm, resolve_settings, secret_values)
from launcher.config.schema import ClusterConfig

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "job.sbatch"
HOSTILE = ["it's", 'say "hi"', "$(touch {canary})", "`touch {canary}`", "a; touch {canary}", "x' ; touch {canary} ; '",
           "\\$(touch {canary})", "$HOME ${PATH} *", "a && touch {canary} || touch {canary}"]


def golden_settings() -> SlurmSettings:
    cluster = ClusterConfig(partition="gpu", account="proj-42", qos="high", time="1-12:00:00", gpus_per_node=8,
                            cpus_per_task=12, mem="0", constraint="h100&ib", exclusive=True,
                            sbatch_options=["--reservation=big run", "--hint=nomultithread"],
                            setup=["module load cuda/12.4", "source /shared/venv/bin/activate"],
                            container_image="nvcr.io#nvidia/pytorch:24.05-py3",
                            env={"NCCL_DEBUG": "WARN", "NCCL_IB_HCA": "mlx5", "HF_TOKEN": "never-written"},
                            max_requeues=5)
    return resolve_settings("gpu-example", cluster, nodes=4)


def test_job_sbatch_matches_golden_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_PROFILES", str(GOLDEN.parent / "profiles"))  # a fixed profile, not a shipped one
    text = render_sbatch(golden_settings(), "/shared/runs/llama-70b", "ftlaunch-llama-70b",
                         python="/shared/venv/bin/python", recipe_file="/home/me/recipes/llama 70b.yaml")
    if os.environ.get("FTLAUNCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "job.sbatch changed; if intended: FTLAUNCH_UPDATE_GOLDEN=1 pytest this test"
    assert "never-written" not in text and "HF_TOKEN:?" in text


def test_precedence_profile_recipe_flags() -> None:
    s = resolve_settings("local", ClusterConfig(time="00:05:00", env={"NCCL_DEBUG": "INFO"}), nodes=2)
    assert (s.partition, s.time, s.tasks_per_node, s.env["GLOO_SOCKET_IFNAME"]) == ("debug", "00:05:00", 2, "lo")
    assert s.env["NCCL_DEBUG"] == "INFO"
    s = resolve_settings("local", ClusterConfig(time="00:05:00"), nodes=2, partition="other", time_limit="7",
                         gpus_per_node=2)
    assert (s.partition, s.time, s.gpus_per_node, s.tasks_per_node, s.timeout_min) == ("other", "7", 2, 2, 7)
    with pytest.raises(SlurmError, match="unknown cluster profile 'nope'"):
        resolve_settings("nope", ClusterConfig(), nodes=2)


@pytest.mark.parametrize("text, minutes", [("30", 30), ("0:30", 1), ("02:00:00", 120), ("1-0", 1440),
                                           ("1-02:30", 1590), ("2-00:00:01", 2881)])
def test_time_formats(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes
    ClusterConfig(time=text)


@pytest.mark.parametrize("bad", ["1h", "90m", "1:2:3:4", "-5", "0", ""])
def test_bad_time_limit_is_a_clear_error(bad: str) -> None:
    with pytest.raises(SlurmError, match="bad time limit"):
        parse_time_minutes(bad)
    with pytest.raises(ValueError):
        ClusterConfig(time=bad) if bad != "0" else (_ for _ in ()).throw(ValueError())


def test_newlines_and_bad_env_names_are_rejected() -> None:
    with pytest.raises(SlurmError, match="control character"):
        render_sbatch(resolve_settings("local", ClusterConfig(), nodes=2), "/runs/a\ntouch x", "ftlaunch-a")
    with pytest.raises(ValueError, match="should match pattern"):
        ClusterConfig(account="a\n#SBATCH --wrap=x")
    with pytest.raises(ValueError, match="newline"):
        ClusterConfig(env={"A": "x\ny"})
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        ClusterConfig(env={"A;B": "x"})


# The payloads an adversarial pass found (issue 18): a backslash defeats shlex/submitit quoting inside #SBATCH lines.
INJECTIONS = ["acct\\'\"' --comment=INJECTED #", "a b", "a#b", "a'b", "x;touch /tmp/pwned", "$(id)", "a\tb", "30\n"]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("key", ["account", "qos", "partition", "prepare_partition", "constraint"])
def test_names_that_reach_sbatch_lines_take_only_their_characters(key: str, payload: str) -> None:
    with pytest.raises(ValueError, match="should match pattern"):
        ClusterConfig(**{key: payload})


@pytest.mark.parametrize("option", ["--comment=a\\' --wrap=x", "--comment=a\x00b", "--comment=a\rb"])
def test_sbatch_options_refuse_what_sbatch_would_misread(option: str) -> None:
    with pytest.raises(ValueError, match="backslash|control character|newline or NUL"):
        ClusterConfig(sbatch_options=[option])
    ClusterConfig(sbatch_options=["--reservation=big run", "--comment=it's #1"])  # quoting carries these


@pytest.mark.parametrize(("flags", "message"), [
    ({"nodes": 2, "procs": 0}, "--procs must be >= 1"),
    ({"nodes": 2, "gpus_per_node": -3}, "--gpus-per-node must be >= 0"),
    ({"nodes": 0}, "--nodes must be >= 1"),
    ({"nodes": 2, "time_limit": "30\n"}, "bad time limit"),
    ({"nodes": 2, "partition": "gpu\\' --comment=x"}, "is not a partition name"),
])
def test_slurm_flags_are_checked_like_the_recipe(flags: dict[str, object], message: str) -> None:
    with pytest.raises(SlurmError, match=message):
        resolve_settings("local", ClusterConfig(), **flags)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", "a b", "-x", "", "x" * 129])
def test_run_names_are_one_directory_under_the_root(name: str) -> None:
    from launcher.config.schema import OutputConfig

    with pytest.raises(ValueError):
        OutputConfig(name=name)
    with pytest.raises(ValueError, match="not an option"):
        ClusterConfig(sbatch_options=["reservation=x"])


def test_secrets_are_redacted_and_passed_through_the_environment() -> None:
    cluster = ClusterConfig(env={"HF_TOKEN": "hf_abc", "WANDB_API_KEY": None, "NCCL_DEBUG": "INFO"})
    assert "hf_abc" not in json.dumps(cluster.model_dump(mode="json"))
    s = resolve_settings("local", cluster, nodes=2)
    assert s.secret_env == ["HF_TOKEN", "WANDB_API_KEY"] and "HF_TOKEN" not in s.env
    assert "hf_abc" not in json.dumps(s.to_json())
    values, missing = secret_values(s, cluster, environ={"WANDB_API_KEY": "w"})
    assert values == {"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "w"} and missing == []
    assert secret_values(s, cluster, environ={})[1] == ["WANDB_API_KEY"]


def test_hostile_values_run_nothing_unintended(tmp_path: Path) -> None:
    """Every free-text value a recipe can put into job.sbatch, hostile; the script runs with a stub srun that records
    its arguments and environment. Nothing may create the canary, and every value must arrive unchanged. (Names
    that reach #SBATCH lines take only their own characters: test_names_that_reach_sbatch_lines_...; what sbatch
    itself reads from the #SBATCH lines is checked against the real sbatch in tests/integration/test_slurm_launch.py.)"""
    canary = tmp_path / "canary"
    hostile = [h.replace("{canary}", str(canary)) for h in HOSTILE]
    one = " ".join(hostile)  # shell lines: backslashes included
    no_backslash = " ".join(h for h in hostile if "\\" not in h)  # #SBATCH lines refuse backslashes
    cluster = ClusterConfig(partition="gpu", account="proj-1", qos="high", constraint="h100&ib", mem="4G",
                            container_image=one, sbatch_options=[f"--comment={no_backslash}"],
                            env={f"V{i}": h for i, h in enumerate(hostile)})
    run_dir = tmp_path / f"runs/{no_backslash}"
    run_dir.mkdir(parents=True)
    text = render_sbatch(resolve_settings("local", cluster, nodes=2, time_limit="10"), str(run_dir),
                         "ftlaunch-x", python=f"/opt/{one}/python", recipe_file=str(tmp_path / one))
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    stub = bin_dir / "srun"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not canary.exists()
    got = json.loads(record.read_text())
    assert got["argv"] == [f"--container-image={one}", f"/opt/{one}/python", "-m", "launcher.train.job", str(run_dir)]
    for i, h in enumerate(hostile):
        assert got["env"][f"V{i}"] == h
    assert json.loads((run_dir / "jobs.jsonl").read_text())["job_id"] == "7"


def test_no_slurm_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    with pytest.raises(SlurmError, match="Slurm not found: sbatch, sinfo, squeue, scancel not on PATH"):
        require_slurm()


def test_resource_checks_against_a_partition() -> None:
    parts = {"debug": PartitionInfo("debug", nodes=2, cpus_per_node=2, gpus_per_node=2, max_minutes=60)}
    ok = resolve_settings("local", ClusterConfig(), nodes=2)
    check_resources(ok, parts, "debug")
    with pytest.raises(SlurmError, match="unknown partition 'gpu'; sinfo lists: debug"):
        check_resources(ok, parts, "gpu")
    with pytest.raises(SlurmError, match="--nodes 3 but partition 'debug' has 2 node"):
        check_resources(resolve_settings("local", ClusterConfig(), nodes=3), parts, "debug")
    with pytest.raises(SlurmError, match="4 GPUs per node requested but nodes of partition 'debug' have 2"):
        check_resources(resolve_settings("local", ClusterConfig(), nodes=1, gpus_per_node=4), parts, "debug")
    with pytest.raises(SlurmError, match="3 ranks x 1 CPUs"):
        check_resources(resolve_settings("local", ClusterConfig(), nodes=1, procs=3), parts, "debug")
    with pytest.raises(SlurmError, match="exceeds partition 'debug'"):
        check_resources(resolve_settings("local", ClusterConfig(), nodes=1, time_limit="2:00:00"), parts, "debug")


def test_shared_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.slurm as slurm

    settings = resolve_settings("local", ClusterConfig(), nodes=2)
    assert check_shared_storage(tmp_path, settings) is None  # the local profile: shared_roots ["/"]
    bare = SlurmSettings(profile="x", nodes=2, gpus_per_node=0, ranks_per_node=2, cpus_per_task=1, time="10")
    monkeypatch.setattr(slurm, "filesystem_type", lambda path: "ext4")
    with pytest.raises(SlurmError, match="node-local ext4 file system"):
        check_shared_storage(tmp_path, bare)
    monkeypatch.setattr(slurm, "filesystem_type", lambda path: "lustre")
    assert check_shared_storage(tmp_path, bare) is None
    monkeypatch.setattr(slurm, "filesystem_type", lambda path: None)
    assert "could not tell" in (check_shared_storage(tmp_path, bare) or "")


def test_plan_does_not_wait_on_a_controller_that_does_not_answer(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`launch plan` on a login node whose slurmctld hangs: the sinfo check gives up after PLAN_SINFO_TIMEOUT_S and
    the plan says the cluster was not checked; submission (need_cluster) still fails. Client commands that hang
    stand in for the unreachable controller, which this machine cannot make hang on demand."""
    from cluster.slurm import PLAN_SINFO_TIMEOUT_S, preflight

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "sinfo", "squeue", "scancel"):
        (bin_dir / name).write_text("#!/bin/sh\nsleep 60\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    settings = resolve_settings("local", ClusterConfig(), nodes=2)
    same, warnings = preflight(settings, tmp_path, need_cluster=False)
    assert same == settings and len(warnings) == 1
    assert warnings[0].startswith("cluster not checked: sinfo ") and \
        f"did not answer in {PLAN_SINFO_TIMEOUT_S:.0f} s: is slurmctld up?" in warnings[0]


EXAMPLE_PROFILES = sorted((Path(__file__).resolve().parents[2] / "cluster" / "profiles" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("profile", EXAMPLE_PROFILES, ids=lambda p: p.stem)
def test_example_profiles_plan_offline_with_their_settings(profile: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`launch plan --cluster NAME --offline` on a machine whose Slurm would refuse the job (a controller with one
    2-GPU partition): no Slurm command runs, the plan holds the profile's settings, and its launch command is the
    srun line job.sbatch runs."""
    import yaml

    from cluster.slurm import load_profile
    from launcher.cli.main import main

    bin_dir, called = tmp_path / "bin", tmp_path / "called"
    bin_dir.mkdir()
    for name in ("sbatch", "sinfo", "squeue", "scontrol"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {called}\necho 'debug*|2|gpu:2|2|00:30:00'\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}, "data": {"train": {"path": str(recipe)}},
                                      "output": {"root": str(tmp_path / "runs")}}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "intermediate_size": 128,
                                                      "vocab_size": 400}))
    assert main(["plan", str(recipe), "--cluster", profile.stem, "--nodes", "2", "--offline", "--json"]) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert not called.exists()
    assert "--offline: partition, node sizes and limits not checked" in " ".join(err.split())
    cluster = load_profile(profile.stem)
    assert plan["command"][0] == "srun" and plan["command"][-3:] == ["-m", "launcher.train.job", plan["run_dir"]]
    if cluster.container_image:
        assert plan["command"][1] == f"--container-image={cluster.container_image}"
    assert f"#SBATCH --gpus-per-node={cluster.gpus_per_node}" in plan["sbatch"]
    assert f"#SBATCH --partition={cluster.partition}" in plan["sbatch"]
    for name, value in cluster.env.items():
        assert (f"export {name}=" in plan["sbatch"]) == (value is not None), name  # HF_TOKEN: passed, never written


def test_the_default_local_profile_on_a_gpu_plan_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.slurm import DEFAULT_PROFILE, local_profile_warning

    monkeypatch.delenv("FTLAUNCH_CLUSTER", raising=False)
    assert f"default `{DEFAULT_PROFILE}` profile" in (local_profile_warning(None, 8) or "")
    assert local_profile_warning(None, 0) is None  # CPU ranks: what the local cluster runs
    assert local_profile_warning("local", 8) is None  # named on purpose
    monkeypatch.setenv("FTLAUNCH_CLUSTER", "h100-ib")
    assert local_profile_warning(None, 8) is None


def test_inherited_torch_distributed_variables_never_reach_the_ranks(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A submitting shell with RANK/WORLD_SIZE (a notebook under torchrun, an in-process run) would make every Slurm
    task "rank 0 of 1" (cluster/env.py checks torchrun's variables first): submission removes them from the
    environment sbatch exports, and job.sbatch unsets them before the exports of the recipe."""
    from cluster import slurm

    for name in slurm.INHERITED_DIST_VARS:
        monkeypatch.setenv(name, "0")
    settings = resolve_settings("local", ClusterConfig(env={"MASTER_PORT": "29999"}), nodes=2)
    slurm._executor(tmp_path, settings, {}, "job", nodes=2, tasks_per_node=1, gpus_per_node=0, partition="debug",
                    dependency=None, max_requeues=0, exclusive=False)
    assert not set(slurm.INHERITED_DIST_VARS) & set(os.environ)
    text = render_sbatch(settings, str(tmp_path), "job")
    unset = text.index("unset RANK WORLD_SIZE")
    assert unset < text.index("export MASTER_PORT=29999") < text.index("srun ")  # the recipe's own value still wins
