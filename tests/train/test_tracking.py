"""Experiment tracking (launcher/train/tracking.py): tiny real runs whose W&B offline files and MLflow store are read
back with the libraries' own readers and compared with metrics.jsonl; a resumed run continues the same tracker runs;
secrets stay out of what trackers get; a tracker that cannot start, or fails later, costs a warning and nothing else.

W&B is read with `wandb leet inspect --json` (wandb's reader of the .wandb transaction log; wandb 0.31 has no Python
reader left); MLflow with `MlflowClient` on the run's own SQLite store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import LocalExecutor
from launcher.config.recipe import RecipeError, load_recipe
from launcher.plan.resources import Resources

pytestmark = pytest.mark.slow

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
SECRET_ENV = "hf_tracking_test_secret_0123456789"
"""The value of a secret-named variable of the job's environment (HF_TOKEN), also pasted into the recipe."""
SECRET_IN_RECIPE = "literal-recipe-secret-9876543210"
"""A secret-named cluster.env value given in the recipe itself (redacted from plan.json by the schema)."""


def write_recipe(tmp_path: Path, model_dir: Path, logging_section: dict[str, Any], **sections: Any) -> Path:
    """A tiny LoRA recipe (64 rows, micro batch 4) with the given `logging` keys."""
    rows = [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in (WORDS * 7)[:64]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    recipe: dict[str, Any] = {
        "name": "tiny-track",
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(train)}, "eval": [{"path": str(evals)}], "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"lr": 3e-3, "micro_batch": 4, "max_steps": 6, "seed": 3},
        "eval": {"at_start": True, "max_batches": 1},
        "logging": {"progress": False, "tensorboard": False, **logging_section},
        "output": {"root": str(tmp_path / "runs")},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start_run(recipe: Path) -> Path:
    return LocalExecutor(Resources()).prepare(load_recipe(recipe)).run_dir  # what `launch` writes first


def run(run_dir: Path) -> int:
    from launcher.train.job import run_job

    return run_job(run_dir)


def rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def wandb_records(run_dir: Path) -> list[list[dict[str, Any]]]:
    """The records of each offline W&B run directory (one per start of the run), oldest first."""
    found = []
    for wandb_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        found.append([json.loads(line) for line in out.stdout.splitlines() if line.strip()])
    return found


def wandb_history(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """step -> the metrics logged at that step (W&B joins an eval row to the train row of its step)."""
    return {int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"}


def wandb_config(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's config: the run record's, then each config record's update, in order."""
    config: dict[str, Any] = {}
    for record in records:
        holder = record["run"] if record["type"] == "run" else record if record["type"] == "config" else {}
        config.update(holder.get("config", {}).get("update", {}))
    return config


def mlflow_client(run_dir: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def tracking_ids(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "tracking.json").read_text())


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # W&B: no user settings, no netrc, no server: nothing of this machine's login leaks in or out.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "home" / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "home" / "wandb-data"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port: online mode can reach nothing
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports sent anywhere
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3's usage telemetry (off under pytest anyway)
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    if sys.modules.get("wandb") is not None:
        # W&B reads its environment once per process (wandb.setup); tear it down so the next test's variables count.
        sys.modules["wandb"].teardown()


BOTH = {"wandb": {"mode": "offline", "project": "ftlaunch-tests", "tags": ["tiny"]}, "mlflow": {}}


def test_both_trackers_hold_metrics_jsonl_and_the_recipe_without_secrets(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET_ENV)
    recipe = write_recipe(tmp_path, tiny_model_dir, BOTH, description=f"pasted by mistake: {SECRET_ENV}",
                          cluster={"env": {"MY_SECRET": SECRET_IN_RECIPE, "NCCL_DEBUG": "WARN"}})
    run_dir = start_run(recipe)
    assert run(run_dir) == 0
    train, evals = rows(run_dir, "train"), rows(run_dir, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [0, 6]

    # W&B: one offline run, the id of tracking.json, every train and eval value at its step.
    (records,) = wandb_records(run_dir)
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["run_id"] == tracking_ids(run_dir)["wandb"]["run_id"]
    assert run_record["project"] == "ftlaunch-tests" and run_record["display_name"] == run_dir.name
    history = wandb_history(records)
    assert sorted(history) == [0, 1, 2, 3, 4, 5, 6]
    for row in train:
        assert history[row["step"]]["train/loss"] == row["loss"]
        assert history[row["step"]]["train/lr"] == row["lr"]
    for row in evals:
        assert history[row["step"]]["eval/loss"] == row["eval_loss"]
    config = wandb_config(records)
    assert config["optim.lr"] == 3e-3 and config["method.name"] == "lora" and config["plan.world_size"] == 1

    # MLflow: its client reads the run back from the run directory's store.
    client = mlflow_client(run_dir)
    mlrun = client.get_run(tracking_ids(run_dir)["mlflow"]["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run_dir.name
    assert client.get_experiment(mlrun.info.experiment_id).name == "tiny-track"
    losses = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(losses, key=lambda m: m.step)] == [(r["step"], r["loss"]) for r in train]
    eval_losses = client.get_metric_history(mlrun.info.run_id, "eval/loss")
    assert sorted((m.step, m.value) for m in eval_losses) == [(r["step"], r["eval_loss"]) for r in evals]
    params = mlrun.data.params
    assert params["optim.lr"] == "0.003" and params["data.max_length"] == "64" and params["plan.strategy"] == "ddp"
    assert params["cluster.env.NCCL_DEBUG"] == "WARN"  # a plain variable is logged as it is

    # Secrets: the recipe's secret-named value is null, the pasted environment secret redacted, in both trackers ...
    assert params["cluster.env.MY_SECRET"] == "null" and config["cluster.env.MY_SECRET"] is None
    assert params["description"] == "<redacted>" and config["description"] == "<redacted>"
    # ... and neither value is in any byte the trackers wrote (W&B's files and logs, MLflow's database).
    written = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()] + [run_dir / "mlflow.db"]
    for path in written:
        data = path.read_bytes()
        assert SECRET_ENV.encode() not in data and SECRET_IN_RECIPE.encode() not in data, path


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM after step 3 (what Slurm sends before a requeue): checkpoint, exit 3; the second start resumes both
    tracker runs by the ids in tracking.json, and the adapter is logged as an artifact to both at the end."""
    from launcher.common.exits import EXIT_INTERRUPTED
    from launcher.train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_sigterm(self: Trainer, stream: Any) -> dict[str, float]:
        out = real_step(self, stream)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the trainer's StopFlag: stop after this step
        return out

    logging_section = {"wandb": {**BOTH["wandb"], "log_artifacts": True},
                       "mlflow": {"experiment": "resume-exp", "log_artifacts": True}}
    run_dir = start_run(write_recipe(tmp_path, tiny_model_dir, logging_section))
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", step_then_sigterm)
        assert run(run_dir) == EXIT_INTERRUPTED
    first_ids = tracking_ids(run_dir)
    client = mlflow_client(run_dir)
    assert client.get_run(first_ids["mlflow"]["run_id"]).info.status == "KILLED"

    assert run(run_dir) == 0
    assert tracking_ids(run_dir) == first_ids
    train = rows(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]

    # W&B: two offline directories (one per start) of one run id; together every step once, each with its loss.
    starts = wandb_records(run_dir)
    assert len(starts) == 2
    ids = {next(r["run"]["run_id"] for r in records if r["type"] == "run") for records in starts}
    assert ids == {first_ids["wandb"]["run_id"]}
    first, second = (wandb_history(records) for records in starts)
    assert sorted(first) == [0, 1, 2, 3] and sorted(second) == [4, 5, 6]
    assert {step: item["train/loss"] for step, item in {**first, **second}.items() if step} == \
        {r["step"]: r["loss"] for r in train}
    (artifact,) = [r["artifact"] for r in starts[1] if r["type"] == "artifact"]  # the adapter, logged at the end
    assert artifact["type"] == "model"
    assert "adapter_config.json" in {f["path"] for f in artifact["manifest"]["contents"]}
    assert not [r for r in starts[0] if r["type"] == "artifact"]  # nothing at the interrupted start

    # MLflow: the same run, finished, each step's loss once, the adapter among its artifacts.
    runs = client.search_runs([client.get_experiment_by_name("resume-exp").experiment_id])
    assert [r.info.run_id for r in runs] == [first_ids["mlflow"]["run_id"]]
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED"
    losses = sorted(client.get_metric_history(mlrun.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in losses] == [(r["step"], r["loss"]) for r in train]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in artifacts and "adapter/adapter_model.safetensors" in artifacts
    stored = run_dir / "mlartifacts"  # the default store keeps its artifacts in the run directory too
    assert list(stored.rglob("adapter_model.safetensors"))


def test_trackers_that_cannot_start_only_warn(tmp_path: Path, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """W&B online with a key but no network (a closed port), MLflow with a store it cannot create: the run trains
    to the end, metrics.jsonl complete, one warning each."""
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")  # W&B's default waits 90 s before giving up
    logging_section = {"wandb": {"mode": "online", "project": "p"},
                       "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'not-a-dir' / 'x' / 'mlflow.db'}"}}
    (tmp_path / "not-a-dir").write_text("a file where the store's directory would be")
    run_dir = start_run(write_recipe(tmp_path, tiny_model_dir, logging_section, optim={"max_steps": 2},
                                     eval={"at_start": False}))
    with caplog.at_level(logging.WARNING, logger="ftlaunch"):
        assert run(run_dir) == 0
    assert [r["step"] for r in rows(run_dir, "train")] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.name == "ftlaunch" and r.levelno == logging.WARNING]
    assert len([w for w in warnings if w.startswith("logging.wandb: the tracker did not start")]) == 1, warnings
    assert len([w for w in warnings if w.startswith("logging.mlflow: the tracker did not start")]) == 1, warnings
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_a_tracker_failing_mid_run_is_warned_about_once_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from launcher.train.tracking import Tracker, Trackers

    class Broken(Tracker):
        name = "broken"
        calls = 0

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            Broken.calls += 1
            raise ConnectionError("server went away")

    class Kept(Tracker):
        name = "kept"
        seen: list[int] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            Kept.seen.append(step)

    trackers = Trackers([Broken(), Kept()])
    with caplog.at_level(logging.WARNING, logger="ftlaunch"):
        for step in (1, 2, 3):
            trackers.log_row({"kind": "train", "step": step, "loss": 1.0, "skipped": False})
        trackers.finish(0)
    assert Broken.calls == 1 and Kept.seen == [1, 2, 3]
    assert [r.getMessage() for r in caplog.records if "broken" in r.getMessage()] == [
        "broken: logging step 1 failed (ConnectionError: server went away); training goes on without it"]


def test_scalars_and_config_helpers() -> None:
    from launcher.train.tracking import flatten, scalars

    assert scalars({"kind": "eval", "step": 4, "when": "end", "eval_loss": 1.5, "eval_perplexity": 4.5}) == \
        {"eval/loss": 1.5, "eval/perplexity": 4.5}
    assert scalars({"kind": "train", "step": 1, "epoch": 0, "loss": 2.0, "skipped": True}) == \
        {"train/loss": 2.0, "train/skipped": 1.0}
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None}) == \
        {"a.b": 1, "a.c.d": [1, 2], "a.e": {}, "f": None}


@pytest.mark.parametrize("section, message", [
    ({"wandb": {"mode": "cloud"}}, "logging.wandb.mode"),
    ({"wandb": {"project": ""}}, "logging.wandb.project"),
    ({"wandb": {"project": "a/b"}}, "logging.wandb.project"),
    ({"wandb": {"tags": [""]}}, "logging.wandb.tags"),
    ({"wandb": {"api_key": "x"}}, "logging.wandb.api_key"),
    ({"mlflow": {"tracking_uri": ""}}, "logging.mlflow.tracking_uri"),
    ({"mlflow": {"tracking_uri": "https://me:hunter2@mlflow.example/"}}, "holds a password"),
    ({"mlflow": {"experiment": ""}}, "logging.mlflow.experiment"),
])
def test_invalid_tracking_settings_are_refused_when_loading(tmp_path: Path, section: dict[str, Any],
                                                            message: str) -> None:
    recipe = {"model": {"path": str(tmp_path)}, "data": {"train": [{"path": "x.jsonl"}]}, "logging": section}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")) as refused:
        load_recipe(path)
    assert "hunter2" not in str(refused.value)


def test_metrics_log_sends_each_row_to_jsonl_tensorboard_and_the_trackers(tmp_path: Path) -> None:
    """One naming for TensorBoard and the trackers (`train/loss`, `eval/loss`), from the same rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launcher.train.tracking import Tracker, Trackers
    from launcher.train.trainer import MetricsLog

    class Recorder(Tracker):
        def __init__(self) -> None:
            self.logged: list[tuple[int, dict[str, float]]] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.logged.append((step, metrics))

    recorder = Recorder()
    log_ = MetricsLog(tmp_path, enabled=True, tensorboard=True, tracker=Trackers([recorder]))
    log_.write({"kind": "eval", "step": 0, "when": "start", "eval_loss": 3.0})
    log_.write({"kind": "train", "step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-3, "skipped": False})
    log_.close()
    assert recorder.logged == [(0, {"eval/loss": 3.0}), (1, {"train/loss": 2.5, "train/lr": 1e-3, "train/skipped": 0.0})]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/loss", "train/loss", "train/lr", "train/skipped"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5)]
    silent = MetricsLog(tmp_path / "rank1", enabled=False, tensorboard=True, tracker=Trackers([recorder]))
    silent.write({"kind": "train", "step": 2, "loss": 1.0})  # a rank other than 0 logs nowhere
    assert len(recorder.logged) == 2 and not (tmp_path / "rank1").exists()


def test_a_missing_extra_is_one_warning_naming_it(tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from launcher.plan.files import load_plan
    from launcher.train.tracking import start_tracking

    run_dir = start_run(write_recipe(tmp_path, tiny_model_dir, BOTH))
    for name in ("wandb", "mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without the extras gives: ImportError
    with caplog.at_level(logging.WARNING, logger="ftlaunch"):
        trackers = start_tracking(run_dir, load_plan(run_dir))
    assert not trackers
    messages = [r.getMessage() for r in caplog.records if r.name == "ftlaunch"]
    assert len(messages) == 2 and all("cannot be imported" in m for m in messages), messages
    assert "pip install 'ftlaunch[wandb]'" in messages[0] and "pip install 'ftlaunch[mlflow]'" in messages[1]
    assert not (run_dir / "tracking.json").exists()
