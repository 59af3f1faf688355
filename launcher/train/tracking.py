"""Experiment tracking: Weights & Biases and MLflow, from rank 0 (`logging.wandb`, `logging.mlflow`).

One small interface, `Tracker`, and two implementations. `start_tracking` starts those the recipe asks for and
returns them behind one `Trackers` object that never raises: a tracker that fails to start, or fails later (network,
server, disk), logs one warning and is dropped, and training goes on. A run's tracker ids are kept in
RUN_DIR/tracking.json, so a resumed or requeued run continues the same W&B run and the same MLflow run.

wandb and mlflow are optional extras (`ftlaunch[wandb]`, `ftlaunch[mlflow]`), imported here only when a recipe asks
for them. What they are given is the resolved recipe from plan.json (secret-named `cluster.env` values are already
null there), flattened, with any value holding a secret of this process's environment replaced: an API key never
reaches a tracker's config. The keys themselves stay in the environment, where the libraries read them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.common.exits import EXIT_INTERRUPTED, EXIT_OK
from launcher.common.rundir import write_json_atomic
from launcher.config.schema import is_secret_name

if TYPE_CHECKING:
    from launcher.config.schema import MlflowConfig, WandbConfig
    from launcher.plan.build import Plan

log = logging.getLogger("ftlaunch")

TRACKING_FILE = "tracking.json"
"""RUN_DIR/tracking.json: {"wandb": {"run_id": ...}, "mlflow": {"run_id": ..., "tracking_uri": null or the URI}}."""

REDACTED = "<redacted>"
SKIPPED_KEYS = ("kind", "step", "when", "epoch")
"""Row fields that are not metrics: the row's kind, its step (the x axis), an eval's label, the epoch counter."""


# ------------------------------------------------------------------------------------------------------- helpers
def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker metrics, named as in TensorBoard: `train/loss`, `eval/loss`, `eval/perplexity`."""
    prefix = "train" if row.get("kind") == "train" else "eval"
    return {f"{prefix}/{key.removeprefix('eval_')}": float(value) for key, value in row.items()
            if key not in SKIPPED_KEYS and isinstance(value, (int, float))}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (`optim.lr`); lists and None stay values (trackers show them as text)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def secret_values(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Values of this process's secret-named variables (WANDB_API_KEY, HF_TOKEN, ...). Short ones are left out: a
    3-character value would redact half the recipe and protects nothing."""
    return [value for name, value in environ.items() if is_secret_name(name) and len(value) >= 8]


def run_config(plan: "Plan", environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What trackers get as config / params: the resolved recipe and the plan's layout, flattened; a value holding
    the value of a secret-named environment variable (a token pasted into a description, an override) is replaced."""
    config = flatten(plan.recipe)
    config.update({"plan.strategy": plan.strategy, "plan.world_size": plan.world_size, "plan.nodes": plan.nodes,
                   "plan.device": plan.device})
    hidden = secret_values(environ)
    return {key: REDACTED if any(s in json.dumps(value) or s in str(value) for s in hidden) else value
            for key, value in config.items()}


def read_ids(run_dir: Path) -> dict[str, dict[str, str]]:
    """RUN_DIR/tracking.json, or {} (a first start, or an unreadable file: then new runs are started)."""
    try:
        data = json.loads((run_dir / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_id(run_dir: Path, tracker: str, ids: dict[str, str]) -> None:
    write_json_atomic(run_dir / TRACKING_FILE, {**read_ids(run_dir), tracker: ids})


# ------------------------------------------------------------------------------------------------------ interface
class Tracker:
    """One tracking backend. Methods may raise: `Trackers` turns a failure into one warning."""

    name = "tracker"

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's flattened configuration (once per start; a resumed run logs it again)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an optimizer step (train rows and eval rows alike)."""

    def log_artifact(self, path: Path) -> None:
        """A final output directory (adapter, model, merged), when the recipe asks for artifacts."""

    def finish(self, exit_code: int | None) -> None:
        """End this start of the run: 0 finished, EXIT_INTERRUPTED stopped to be resumed, other codes or None
        (an exception) failed."""


class Trackers(Tracker):
    """The started trackers behind one object that never raises; a tracker that fails once is warned about and
    dropped (a tracking server that is down would otherwise slow every step with its retries)."""

    name = "trackers"

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 - a tracker never stops training
                log.warning("%s: %s failed (%s: %s); training goes on without it", tracker.name, what,
                            type(err).__name__, str(err)[:500])
                self.trackers.remove(tracker)

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("logging the config", lambda t: t.log_config(config))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._each(f"logging step {step}", lambda t: t.log_metrics(metrics, step))

    def log_row(self, row: Mapping[str, Any]) -> None:
        """A metrics.jsonl row (train or eval) at its step."""
        self.log_metrics(scalars(row), int(row["step"]))

    def log_artifact(self, path: Path) -> None:
        self._each(f"logging {path.name} as an artifact", lambda t: t.log_artifact(path))

    def finish(self, exit_code: int | None) -> None:
        self._each("finishing", lambda t: t.finish(exit_code))
        self.trackers = []


def start_tracking(run_dir: Path, plan: "Plan") -> Trackers:
    """Start (or resume) the trackers `plan`'s recipe asks for and log the run's config to them. Call on rank 0."""
    recipe = plan.typed_recipe()
    wanted: list[tuple[str, Any]] = []
    if recipe.logging.wandb is not None and recipe.logging.wandb.mode != "disabled":
        wanted.append(("wandb", lambda: WandbTracker(run_dir, recipe.name, recipe.logging.wandb)))
    if recipe.logging.mlflow is not None:
        wanted.append(("mlflow", lambda: MlflowTracker(run_dir, recipe.name, recipe.logging.mlflow)))
    started: list[Tracker] = []
    for name, start in wanted:
        try:
            started.append(start())
        except ImportError as err:
            log.warning("logging.%s is set but %s cannot be imported (%s): pip install 'ftlaunch[%s]'; training goes "
                        "on without it", name, name, err, name)
        except Exception as err:  # noqa: BLE001 - no network, no key, a bad URI: warn once, train anyway
            log.warning("logging.%s: the tracker did not start (%s: %s); training goes on without it", name,
                        type(err).__name__, str(err)[:500])
    trackers = Trackers(started)
    if trackers:
        trackers.log_config(run_config(plan))
    return trackers


# ---------------------------------------------------------------------------------------------------------- W&B
WANDB_ID_ALPHABET = string.ascii_lowercase + string.digits


class WandbTracker(Tracker):
    """A W&B run, created with an id of ours (kept in tracking.json before W&B is contacted) and `resume="allow"`:
    the first start creates it, every later start of the run directory continues it."""

    name = "wandb"

    def __init__(self, run_dir: Path, recipe_name: str, config: "WandbConfig") -> None:
        import wandb

        self.config = config
        run_id = read_ids(run_dir).get("wandb", {}).get("run_id")
        if not run_id:
            # W&B's own id format (8 of [a-z0-9]); chosen here so that it is on disk before a crash can lose it.
            run_id = "".join(secrets.choice(WANDB_ID_ALPHABET) for _ in range(8))
            _save_id(run_dir, "wandb", {"run_id": run_id})
        directory = run_dir / config.dir if config.dir else run_dir  # an absolute dir replaces run_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=config.project or recipe_name, entity=config.entity, name=config.name or run_dir.name,
            tags=config.tags or None, mode=config.mode, dir=str(directory), id=run_id, resume="allow",
            # console off: rank 0's log is RUN_DIR/logs/rank0.log already, and W&B's capture would wrap the streams
            # the progress bar draws on. reinit: a second run in one process (tests, notebooks) gets its own run.
            settings=wandb.Settings(console="off", silent=True, reinit="finish_previous"))
        self.run_id = run_id

    def log_config(self, config: dict[str, Any]) -> None:
        # A resumed run may log a changed value (plan.world_size after a re-planned resume): allowed.
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # W&B steps must not decrease: an eval row at the step of the train row before it joins that row.
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        if not self.config.log_artifacts:
            return
        import wandb

        artifact = wandb.Artifact(f"{self.run.id}-{path.name}", type="model")
        # immutable: the output is final, so W&B may read it in place instead of copying it to a staging area.
        artifact.add_dir(str(path), policy="immutable")
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int | None) -> None:
        self.run.finish(exit_code=1 if exit_code is None else exit_code)


# ------------------------------------------------------------------------------------------------------- MLflow
class MlflowTracker(Tracker):
    """An MLflow run through `MlflowClient` (no global active run, nothing registered at exit), resumed by id."""

    name = "mlflow"

    def __init__(self, run_dir: Path, recipe_name: str, config: "MlflowConfig") -> None:
        from mlflow.tracking import MlflowClient

        self.config = config
        default_store = config.tracking_uri is None
        uri = config.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        saved = read_ids(run_dir).get("mlflow", {})
        # The recipe's URI is kept (null for the default store, so that a moved run directory still matches).
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == config.tracking_uri else None
        self.resumed = False
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                self.resumed = True
            except Exception as err:  # noqa: BLE001 - the run is gone from that store: start a new one, say so
                log.warning("mlflow: run %s of tracking.json not found in %s (%s); starting a new run",
                            self.run_id, uri, type(err).__name__)
                self.run_id = None
        if self.run_id is None:
            name = config.experiment or recipe_name
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                # The default store's artifacts go next to it in the run directory, not to ./mlruns of the cwd.
                location = (run_dir / "mlartifacts").as_uri() if default_store else None
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            run = self.client.create_run(experiment_id, run_name=config.run_name or run_dir.name,
                                         tags={"ftlaunch.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            _save_id(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": config.tracking_uri})

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = {key: _param_text(value) for key, value in config.items()}
        if self.resumed:
            # MLflow refuses to change a logged param: log only new keys, name the changed ones.
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                log.warning("mlflow: params changed since the run started, kept as first logged: %s",
                            ", ".join(changed))
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        if self.config.log_artifacts:
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)

    def finish(self, exit_code: int | None) -> None:
        status = "FINISHED" if exit_code == EXIT_OK else "KILLED" if exit_code == EXIT_INTERRUPTED else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


def _param_text(value: Any) -> str:
    """A param value as MLflow stores it (text, at most 6000 characters); lists and null as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 6000 else text[:5990] + "...(cut)"
