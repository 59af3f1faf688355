"""Sweeps: expansion of `sweep:` into trials, every trial validated at plan time, the report's statistics, and a
real sweep of tiny runs on this machine (launcher/config/sweep.py, cluster/sweep.py, launcher/common/sweep_report.py,
launcher/cli/sweep.py)."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.cli.main import main
from launcher.common.sweep_report import summarise, write_report
from launcher.config.recipe import RecipeError, load_recipe
from launcher.config.sweep import expand, load_sweep

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def sweep_recipe(tmp_path: Path, model_dir: Path, sweep: dict[str, Any], **optim: Any) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in (WORDS[i % len(WORDS)] for i in range(32))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    recipe = {
        "name": "sw", "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(tmp_path / "train.jsonl")}, "eval": [{"path": str(tmp_path / "eval.jsonl")}],
                 "max_length": 64},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"lr": 3e-3, "micro_batch": 4, "max_steps": 4, "warmup_steps": 1, "seed": 3, **optim},
        "eval": {"at_start": False}, "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"every_steps": 100},
        "output": {"root": str(tmp_path / "runs")}, "sweep": sweep,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # grid keys in the order written
    return path


# --------------------------------------------------------------------------------------------------- expansion
def test_grid_times_seeds_in_order_and_random_draws_repeat(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = sweep_recipe(tmp_path, tiny_model_dir, {
        "seeds": 2, "grid": {"optim.lr": ["1e-4", 3e-4], "method.r": [4, 8]},
        "random": {"trials": 3, "seed": 5, "space": {"optim.weight_decay": {"loguniform": ["1e-4", 0.1]},
                                                     "optim.warmup_steps": {"int": [0, 2]},
                                                     "optim.schedule": {"choice": ["cosine", "linear"]}}}})
    configs, trials = expand(load_recipe(path))
    assert len(configs) == 2 * 2 * 3 and len(trials) == 24
    assert [t.name for t in trials[:3]] == ["c00-s3", "c00-s4", "c01-s3"]  # seeds from optim.seed, then the next
    assert [(c["optim.lr"], c["method.r"]) for c in configs[::3]] == [(1e-4, 4), (1e-4, 8), (3e-4, 4), (3e-4, 8)]
    draws = [{k: v for k, v in c.items() if k not in ("optim.lr", "method.r")} for c in configs[:3]]
    assert all(1e-4 <= d["optim.weight_decay"] <= 0.1 and d["optim.warmup_steps"] in (0, 1, 2) for d in draws)
    assert len({d["optim.weight_decay"] for d in draws}) == 3
    assert draws == [{k: v for k, v in c.items() if k not in ("optim.lr", "method.r")} for c in configs[3:6]]
    again, _ = expand(load_recipe(path))
    assert again == configs  # the same seed draws the same values
    sweep = load_sweep(path)
    trial = sweep.load_trial(trials[7], tmp_path / "runs" / "sw").recipe  # c03: grid point 1, draw 0, seed 4
    assert (trial.optim.lr, trial.method.r, trial.optim.seed, trial.sweep) == (1e-4, 8, 4, None)
    assert trial.output.root == str(tmp_path / "runs" / "sw" / "trials") and trial.output.name == trials[7].name


@pytest.mark.parametrize("sweep, expected", [
    ({"grid": {"optim.lr": [1e-4, -1.0]}}, r"trial c1-s3: optim.lr"),
    ({"grid": {"optim.lrr": [1e-4]}}, r"trial c0-s3: optim.lrr"),
    ({"random": {"trials": 2, "space": {"method.r": {"choice": [8, "big"]}}}}, r"trial c\d-s3: method.r"),
])
def test_one_bad_trial_fails_the_sweep_at_plan_time_naming_it(tmp_path: Path, tiny_model_dir: Path,
                                                              sweep: dict[str, Any], expected: str) -> None:
    path = sweep_recipe(tmp_path, tiny_model_dir, sweep)
    if "random" in sweep:  # make sure some draw is the bad value: 2 draws from 2 choices may repeat; search seeds
        for seed in range(20):
            sweep["random"]["seed"] = seed
            path = sweep_recipe(tmp_path, tiny_model_dir, sweep)
            if "big" in [c.get("method.r") for c in expand(load_recipe(path))[0]]:
                break
    with pytest.raises(RecipeError, match=expected):
        load_sweep(path)
    assert main(["plan", str(path)]) == 2
    assert not (tmp_path / "runs").exists()  # nothing written for a refused sweep


@pytest.mark.parametrize("sweep, message", [
    ({"seeds": 0}, "seeds: expected 1..100"),
    ({"seeds": [1, 1]}, "distinct seeds"),
    ({"grid": {"optim.seed": [1, 2]}}, "a sweep sets this itself"),
    ({"grid": {"output.name": ["a"]}}, "a sweep sets this itself"),
    ({"grid": {"optim.lr": []}}, "non-empty list"),
    ({"random": {"trials": 2, "space": {"optim.lr": {"loguniform": [0, 1]}}}}, "expected 0 < low"),
    ({"random": {"trials": 2, "space": {"optim.lr": {"uniform": [1, 1]}}}}, "expected low < high"),
    ({"random": {"trials": 2, "space": {"optim.lr": {"normal": [0, 1]}}}}, "expected one of"),
    ({"metric": "eval_loss", "mode": "lowest"}, "sweep.mode"),
])
def test_bad_sweep_sections_are_refused_with_the_key(tmp_path: Path, tiny_model_dir: Path,
                                                     sweep: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(sweep_recipe(tmp_path, tiny_model_dir, sweep))


def test_plan_prints_every_trial_and_the_estimate(tmp_path: Path, tiny_model_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = sweep_recipe(tmp_path, tiny_model_dir, {"seeds": 3, "grid": {"optim.lr": [1e-3, 3e-3]},
                                                   "seconds_per_step": 1.5})
    assert main(["plan", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in out["trials"]] == [f"c{c}-s{s}" for c in (0, 1) for s in (3, 4, 5)]
    assert out["gpu_hours"] == pytest.approx(6 * 1 * 4 * 1.5 / 3600)
    assert not (tmp_path / "runs").exists()  # planning writes nothing


# ------------------------------------------------------------------------------------------------------ report
def test_report_is_the_mean_and_sample_std_of_each_configuration(tmp_path: Path) -> None:
    values = {"c0-s0": 2.0, "c0-s1": 2.5, "c0-s2": 3.5, "c1-s0": 1.25, "c1-s1": 1.75, "c1-s2": None}
    sweep = {"recipe": "r.yaml", "metric": "eval_loss", "mode": "min", "configs": [{"optim.lr": 1e-4},
                                                                                   {"optim.lr": 3e-4}],
             "trials": [{"name": n, "config": int(n[1]), "seed": int(n[-1])} for n in values]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    for name, value in values.items():
        run = tmp_path / "trials" / name
        run.mkdir(parents=True)
        rows: list[dict[str, Any]] = [{"kind": "train", "step": 1, "loss": 9.0}]
        if value is not None:  # the last eval counts; a trial that never evaluated is missing, not zero
            rows += [{"kind": "eval", "step": 1, "eval_loss": 99.0}, {"kind": "eval", "step": 4, "eval_loss": value},
                     {"kind": "eval", "step": 5, "eval_loss": float("nan")}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "ev')
    _, results, baseline = write_report(tmp_path)
    assert baseline is None  # no baseline.json
    c0, c1 = results
    assert (c0.n, c1.n) == (3, 2) and c1.trials["c1-s2"] is None
    assert c0.mean == pytest.approx((2.0 + 2.5 + 3.5) / 3)
    assert c0.std == pytest.approx(math.sqrt(sum((v - c0.mean) ** 2 for v in (2.0, 2.5, 3.5)) / 2))  # n - 1
    assert (c1.mean, c1.std) == (pytest.approx(1.5), pytest.approx(math.sqrt(2 * 0.25 ** 2)))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["best_config"] == 1 and (tmp_path / "sweep.png").stat().st_size > 0
    assert "c1 **best**" in (tmp_path / "report.md").read_text() and "2/3" in (tmp_path / "report.md").read_text()


def test_a_sweeps_baseline_goes_to_its_directory_and_into_the_report(tmp_path: Path, tiny_model_dir: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`launch baseline SWEEP` writes baseline.json into the sweep directory the sweep then continues; the report
    names the best baseline on the sweep's metric (max mode: the highest) as the bar to clear."""
    path = sweep_recipe(tmp_path, tiny_model_dir, {"seeds": 1, "grid": {"optim.lr": [1e-3, 1e-2]},
                                                   "metric": "eval_rouge1", "mode": "max"})
    assert main(["baseline", str(path)]) == 0
    sweep_dir = tmp_path / "runs" / "sw"
    baselines = json.loads((sweep_dir / "baseline.json").read_text())["baselines"]
    want = max(((name, values["eval_rouge1"]) for name, values in baselines.items() if "eval_rouge1" in values),
               key=lambda item: item[1])
    capsys.readouterr()
    assert main(["report", str(sweep_dir)]) == 0
    assert want[0] in capsys.readouterr().out
    report = json.loads((sweep_dir / "report.json").read_text())
    assert report["baseline"] == {"name": want[0], "value": pytest.approx(want[1])}
    assert f"Baseline to beat ({want[0]}" in (sweep_dir / "report.md").read_text()
    assert not (tmp_path / "runs" / "sw-2").exists()  # the sweep's own directory, not a new one


# ------------------------------------------------------------------------------------------------- a real one
@pytest.mark.slow
def test_a_local_sweep_runs_every_trial_once_and_reports(tmp_path: Path, tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """2 learning rates x 1 seed of tiny runs through `launch SWEEP` (the 2 x 2 case, std included, runs as a Slurm
    array in tests/integration/test_slurm_launch.py): each trial is an ordinary completed run directory; the report
    equals the trials' own metrics files; the same sweep submitted again runs nothing; `launch status` and `launch
    report` read the sweep directory."""
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = sweep_recipe(tmp_path, tiny_model_dir, {"seeds": 1, "grid": {"optim.lr": [1e-3, 1e-2]}})
    assert main([str(path), "--parallel", "2"]) == 0
    sweep_dir = tmp_path / "runs" / "sw"
    trials = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    finals, spans = {}, []
    for trial in trials:
        run = sweep_dir / "trials" / trial["name"]
        ended = json.loads((run / "outcome.json").read_text())
        assert ended["outcome"] == "completed"
        assert "loss.png" in (run / "logs" / "console.log").read_text()  # its own output file, not the terminal
        first = (run / "logs" / "rank0.log").read_text().split(" rank0 ", 1)[0]
        spans.append((datetime.strptime(first, "%Y-%m-%d %H:%M:%S,%f").timestamp(), ended["time"]))
        plan = json.loads((run / "plan.json").read_text())
        assert plan["recipe"]["optim"]["seed"] == trial["seed"] and plan["recipe"]["sweep"] is None
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        finals[trial["name"]] = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a  # --parallel 2: the two trials ran at the same time
    assert finals["c0-s3"] != finals["c1-s3"]  # the learning rate mattered
    report = json.loads((sweep_dir / "report.json").read_text())
    for config, name in ((0, "c0-s3"), (1, "c1-s3")):
        entry = report["configs"][config]
        assert (entry["mean"], entry["std"], entry["n"]) == (pytest.approx(finals[name]), None, 1)
    best = min((0, 1), key=lambda c: report["configs"][c]["mean"])
    assert report["best_config"] == best

    mtimes = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("metrics.jsonl")}
    capsys.readouterr()
    assert main([str(path)]) == 0  # the same sweep again: nothing to run
    assert "nothing to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("metrics.jsonl")} == mtimes
    assert not (tmp_path / "runs" / "sw-2").exists()
    assert main(["status", str(sweep_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {row["state"] for row in status} == {"completed"} and {row["step"] for row in status} == {4}
    assert main(["report", str(sweep_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["configs"] == summarise_json(sweep_dir)


def summarise_json(sweep_dir: Path) -> list[dict[str, Any]]:
    from dataclasses import asdict

    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    return json.loads(json.dumps([asdict(r) for r in summarise(sweep, sweep_dir)]))
