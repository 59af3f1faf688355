"""Planning side: `launch plan` output, run directories, compatibility checks, and no torch on the login node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli.main import main
from launcher.plan.build import Plan, Resources, make_plan
from launcher.config.recipe import RecipeError, load_recipe
from launcher.common.rundir import claim_run_dir, is_fresh, next_run_dir, runs_of
from light import run_light

REPO = Path(__file__).resolve().parents[2]


def recipe_file(tmp_path: Path, **sections: object) -> Path:
    data = {"name": "t", "model": {"path": "m"}, "data": {"train": {"path": "t.jsonl"}},
            "output": {"root": str(tmp_path / "runs")}, **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')  # a run is not created without its data
    return path


def test_plan_loads_no_heavy_modules() -> None:
    code = ("import launcher.cli.main, launcher.plan.build, launcher.config.recipe, launcher.plan.report, "
            "launcher.common.rundir\nfrom launcher.cli.main import main\n"
            f"rc = main(['plan', '{REPO / 'recipes' / 'demo.yaml'}', 'output.root=/tmp/ftl-import-check', '--json'])")
    result = run_light(code)
    assert result.returncode == 0, result.stderr


def test_plan_json_has_the_contract_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(recipe_file(tmp_path)), "--json", "--gpus-per-node", "0"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"run_dir", "world_size", "strategy", "recipe", "command"} <= set(plan)
    assert plan["world_size"] == 1 and plan["strategy"] == "ddp" and plan["recipe"]["name"] == "t"
    assert plan["run_dir"] == str(tmp_path / "runs" / "t") and not (tmp_path / "runs").exists()  # nothing written
    out = tmp_path / "planned"
    assert main(["plan", str(recipe_file(tmp_path)), "--json", "--gpus-per-node", "0", "--out", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    written = json.loads((out / "plan.json").read_text())
    assert written == plan and plan["run_dir"] == str(out)
    assert Plan.from_json(written).typed_recipe().name == "t"
    assert main(["plan", str(recipe_file(tmp_path)), "--out", str(out)]) == 0  # only planned: may be re-planned
    (out / "logs").mkdir()
    assert main(["plan", str(recipe_file(tmp_path)), "--out", str(out)]) == 2  # a started run is never replaced
    assert "is not empty" in capsys.readouterr().err


def test_plan_then_launch_reuse_the_planned_directory_and_never_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = claim_run_dir(root, "t", own=False)  # `launch plan --out runs/t`
    (first / "plan.json").write_text("{}")
    assert is_fresh(first) and next_run_dir(root, "t") == first  # planned only: reused
    (first / "logs").mkdir()
    assert next_run_dir(root, "t") == root / "t-2"  # started: never overwritten
    second = claim_run_dir(root, "t")
    (second / "plan.json").write_text("{}")
    assert second.name == "t-2" and runs_of(root, "t") == [first, second]


def test_multi_rank_local_command_uses_torchrun(tmp_path: Path) -> None:
    loaded = load_recipe(recipe_file(tmp_path))
    plan = make_plan(loaded, Resources(procs_per_node=2), tmp_path / "runs" / "t")
    assert plan.world_size == 2 and plan.backend == "gloo"
    assert plan.command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in plan.command
    assert plan.rank_command[-2:] == ["launcher.train.job", str((tmp_path / "runs" / "t").resolve())]


def test_global_batch_mismatch_names_the_values(tmp_path: Path) -> None:
    loaded = load_recipe(recipe_file(tmp_path, optim={"micro_batch": 2, "grad_accum": 3, "global_batch": 16}))
    with pytest.raises(RecipeError) as info:
        make_plan(loaded, Resources(procs_per_node=2), tmp_path / "runs" / "t")
    assert "micro_batch(2) * grad_accum(3) * world_size(2) = 12 != global_batch(16)" in str(info.value)


@pytest.mark.parametrize("sections, expected", [
    ({"early_stopping": {"patience": 2}}, "early stopping needs periodic evaluation"),
    ({"eval": {"exact_match": True}}, "exact match needs held-out data"),
    ({"model": {"path": "m", "dtype": "float16"}}, "float16 training is not supported on CPU"),
])
def test_compatibility_checks(tmp_path: Path, sections: dict, expected: str) -> None:
    loaded = load_recipe(recipe_file(tmp_path, **sections))
    with pytest.raises(RecipeError) as info:
        make_plan(loaded, Resources(), tmp_path / "runs" / "t")
    assert expected in str(info.value)


def test_cli_reports_bad_recipe_without_traceback_and_writes_nothing(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, optim={"lrr": 1})
    for argv in (["plan", str(path)], [str(path)]):
        result = subprocess.run([sys.executable, "-m", "launcher", *argv], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and "did you mean `lr`" in result.stderr
    assert not (tmp_path / "runs").exists()  # no half-written run directory


def test_cli_missing_recipe_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher", "plan", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "recipe file not found" in result.stderr and "Traceback" not in result.stderr


def test_resume_without_runs_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher", str(recipe_file(tmp_path)), "--resume"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "nothing to resume" in result.stderr


def test_human_plan_output(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher", "plan", str(recipe_file(tmp_path)), "--procs", "2",
                             "--gpus-per-node", "0"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "world size 2" in result.stdout and "torch.distributed.run" in result.stdout


def test_unimplemented_feature_is_planned_but_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Every strategy and method runs now (issues 3 and 6), so the refusal path is exercised by pretending that only
    # ddp is implemented: the plan is still made and sized, but `launch` refuses it before any run directory exists.
    import launcher.plan.checks

    monkeypatch.setattr(launcher.plan.checks, "IMPLEMENTED_STRATEGIES", ("ddp",))
    path = recipe_file(tmp_path, strategy={"name": "zero3"}, method={"name": "qlora"})
    plan = make_plan(load_recipe(path), Resources(), tmp_path / "runs" / "t")
    assert not plan.runnable and "strategy 'zero3' is not implemented" in plan.unsupported[0]
    assert plan.to_json()["runnable"] is False
    monkeypatch.chdir(tmp_path)
    assert main([str(path)]) == 2
    assert "cannot run in this version" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_memory_table_and_auto_strategy_for_70b(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, model={"path": str(REPO / "recipes/models/llama-3.1-70b"),
                                        "gradient_checkpointing": True},
                       method={"name": "full"}, data={"train": {"path": "t"}, "max_length": 4096})
    plan = make_plan(load_recipe(path), Resources(nodes=4, gpus_per_node=8, procs_per_node=8,
                                                  gpu_mem_bytes=80 * 2**30), tmp_path / "runs" / "t")
    memory = plan.memory
    assert memory is not None and 70.0e9 < memory["params_total"] < 71.0e9
    rows = {r["name"]: r for r in memory["strategies"]}
    assert rows["ddp"]["fits"] is False and memory["chosen"] is not None and rows[memory["chosen"]]["fits"]
    assert plan.strategy in ("fsdp", "zero3") and plan.strategy_reason.startswith("auto, by memory")


def test_micro_batch_auto(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, model={"path": str(REPO / "recipes/models/llama-3.1-8b")},
                       optim={"micro_batch": "auto"}, data={"train": {"path": "t"}, "max_length": 2048})
    plan = make_plan(load_recipe(path), Resources(gpus_per_node=1, gpu_mem_bytes=80 * 2**30), tmp_path / "r" / "t")
    batch = plan.recipe["optim"]["micro_batch"]
    assert isinstance(batch, int) and batch >= 1 and batch & (batch - 1) == 0
    with pytest.raises(RecipeError, match="needs the GPU memory"):
        make_plan(load_recipe(path), Resources(gpus_per_node=1), tmp_path / "r" / "t")


def test_fused_ce_with_adapted_lm_head_is_refused(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, kernels=["fused_ce"], method={"name": "lora", "modules_to_save": ["lm_head"]})
    with pytest.raises(RecipeError, match="fused_ce computes the loss from lm_head"):
        make_plan(load_recipe(path), Resources(), tmp_path / "runs" / "t")


def test_plan_time_problems_name_the_file_and_line(tmp_path: Path) -> None:
    """Checks made after validation (plan, strategy, quantization) point at the YAML line, like schema errors."""
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel:\n  path: m\n  dtype: float16\ndata:\n  train: {path: t.jsonl}\n"
                    f"output: {{root: {tmp_path / 'runs'}}}\nearly_stopping:\n  patience: 2\n")
    with pytest.raises(RecipeError) as info:
        make_plan(load_recipe(path), Resources(), tmp_path / "runs" / "t")
    text = str(info.value)
    assert f"early_stopping ({path}:8): early stopping needs periodic evaluation" in text
    assert f"model.dtype ({path}:4): float16 training is not supported on CPU" in text
    with pytest.raises(RecipeError) as info:  # a key set by an override names the override
        make_plan(load_recipe(path, ["model.dtype=float32", "eval.exact_match=true"]), Resources(), tmp_path / "x")
    assert "eval.exact_match (override `eval.exact_match=true`): exact match needs held-out data" in str(info.value)


def test_a_secret_given_as_an_override_is_written_nowhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "hf_do_not_leak_123"
    assert main(["plan", str(recipe_file(tmp_path)), f"cluster.env.HF_TOKEN={secret}", "--json",
                 "--gpus-per-node", "0", "--out", str(tmp_path / "runs" / "t")]) == 0
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    plan = json.loads(out.out)
    assert plan["overrides"] == ["cluster.env.HF_TOKEN=<redacted>"] and plan["recipe"]["cluster"]["env"] == {"HF_TOKEN": None}
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret in p.read_text()]
    loaded = load_recipe(recipe_file(tmp_path), [f"cluster.env.WANDB_API_KEY={secret}", "optim.lr=0.5"])
    assert loaded.recipe.cluster.env["WANDB_API_KEY"] == secret  # in memory, for this submission only
    assert loaded.overrides == ["cluster.env.WANDB_API_KEY=<redacted>", "optim.lr=0.5"]
