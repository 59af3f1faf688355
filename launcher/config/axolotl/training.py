"""optimizer, schedule, batch -> `optim:`; eval/save/log steps and output_dir; W&B and MLflow -> `logging:`."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Mapping

from launcher.config.axolotl.builder import Builder, NAME_PATTERN, is_empty


# --------------------------------------------------------------------------------------------------------- optim
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit"}
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def optim_section(b: Builder) -> None:
    _optimizer(b)
    if b.config.get("learning_rate") is not None:
        b.put("learning_rate", "optim.lr", b.number("learning_rate", b.config["learning_rate"]))
    _schedule_kind(b)
    _warmup(b)
    if b.config.get("weight_decay") is not None:
        b.put("weight_decay", "optim.weight_decay", b.number("weight_decay", b.config["weight_decay"]))
    if b.config.get("max_grad_norm") is not None:
        norm = b.number("max_grad_norm", b.config["max_grad_norm"])
        b.put("max_grad_norm", "optim.max_grad_norm", norm or None)  # 0 turns clipping off, as null does here
    _adam(b)
    _batch(b)
    if b.config.get("num_epochs") is not None:
        b.put("num_epochs", "optim.epochs", b.number("num_epochs", b.config["num_epochs"]))
    if b.config.get("max_steps") is not None:
        b.put("max_steps", "optim.max_steps", b.number("max_steps", b.config["max_steps"], int))
    if b.config.get("seed") is not None:
        b.put("seed", "optim.seed", b.number("seed", b.config["seed"], int))


def _optimizer(b: Builder) -> None:
    name = b.config.get("optimizer")
    if name is None:
        return
    if b.text("optimizer", name, "an optimizer name") in OPTIMIZERS:
        b.put("optimizer", "optim.name", OPTIMIZERS[name])
    else:
        b.skip("optimizer", f"{name}: ftlaunch has AdamW (torch, 8-bit, paged 8/32-bit) only; AdamW is used")


def _schedule_kind(b: Builder) -> None:
    name = b.config.get("lr_scheduler")
    if name is not None:
        if b.text("lr_scheduler", name, "a scheduler name") in SCHEDULES:
            b.put("lr_scheduler", "optim.schedule", SCHEDULES[name])
        else:
            b.skip("lr_scheduler", f"{name}: ftlaunch has linear, cosine and constant; cosine (its default) is used")
    ratio = b.config.get("cosine_min_lr_ratio")
    if ratio is not None:
        if name in (None, "cosine"):
            b.put("cosine_min_lr_ratio", "optim.min_lr_ratio", b.number("cosine_min_lr_ratio", ratio))
        else:
            b.skip("cosine_min_lr_ratio", "applies to the cosine schedule only")
    for key in ("cosine_constant_lr_ratio", "lr_scheduler_kwargs", "lr_quadratic_warmup", "lr_div_factor"):
        if b.config.get(key) is not None:
            b.skip(key, "no ftlaunch equivalent: schedules are linear warmup then linear, cosine or constant")


def _warmup(b: Builder) -> None:
    steps, ratio = b.config.get("warmup_steps"), b.config.get("warmup_ratio")
    if steps and ratio:
        b.conflict("warmup_steps", "warmup_ratio", "keep warmup_steps or warmup_ratio")
    if steps is not None:
        b.put("warmup_steps", "optim.warmup_steps", b.number("warmup_steps", steps, int))
    if ratio is not None:
        b.put("warmup_ratio", "optim.warmup_ratio", b.number("warmup_ratio", ratio))


def _adam(b: Builder) -> None:
    beta1, beta2 = b.config.get("adam_beta1"), b.config.get("adam_beta2")
    if beta1 is not None or beta2 is not None:  # the one not given keeps torch's default, as in axolotl
        betas = [b.number("adam_beta1", 0.9 if beta1 is None else beta1),
                 b.number("adam_beta2", 0.999 if beta2 is None else beta2)]
        b.put("adam_beta1" if beta1 is not None else "adam_beta2", "optim.betas", betas)
        if beta1 is not None and beta2 is not None:
            b.put("adam_beta2", "optim.betas", betas)
    if b.config.get("adam_epsilon") is not None:
        b.put("adam_epsilon", "optim.eps", b.number("adam_epsilon", b.config["adam_epsilon"]))


def _batch(b: Builder) -> None:
    micro, accum, total = (b.config.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "batch_size"))
    if micro is not None:
        b.put("micro_batch_size", "optim.micro_batch", b.number("micro_batch_size", micro, int))
    if accum is not None:
        b.put("gradient_accumulation_steps", "optim.grad_accum", b.number("gradient_accumulation_steps", accum, int))
    if total is None:
        return
    total = b.number("batch_size", total, int)
    if accum is None:
        # axolotl's own rule: gradient_accumulation_steps = batch_size // micro_batch_size.
        b.put("batch_size", "optim.grad_accum", max(1, total // (b.number("micro_batch_size", micro or 1, int))))
    else:
        b.skip("batch_size", "gradient_accumulation_steps is set: axolotl recomputes batch_size from it")


# ----------------------------------------------------------------------------------------- eval, save, log, output
def schedule_section(b: Builder) -> None:
    has_eval = bool(b.out.recipe.get("data", {}).get("eval") or b.out.recipe.get("data", {}).get("eval_fraction"))
    _every("eval_steps", "eval.every_steps", b, has_eval)
    _every("save_steps", "checkpoint.every_steps", b, True)
    for key, what, target in (("evals_per_epoch", "evaluation", "eval.every_steps"),
                              ("saves_per_epoch", "checkpoints", "checkpoint.every_steps")):
        if b.config.get(key) is not None:
            b.skip(key, f"ftlaunch schedules {what} every N optimizer steps, and steps per epoch are known only "
                   f"after tokenizing: set {target}")
    if b.config.get("save_total_limit") is not None:
        b.put("save_total_limit", "checkpoint.keep_last",
              b.number("save_total_limit", b.config["save_total_limit"], int))
    patience = b.config.get("early_stopping_patience")
    if patience is not None:
        if b.out.recipe.get("eval", {}).get("every_steps"):
            b.put("early_stopping_patience", "early_stopping.patience",
                  b.number("early_stopping_patience", patience, int))
        else:
            b.skip("early_stopping_patience", "needs periodic evaluation (eval_steps as a step count), which this "
                   "config does not translate to")
    if b.config.get("logging_steps") is not None:
        b.put("logging_steps", "logging.every_steps", b.number("logging_steps", b.config["logging_steps"], int))
    if b.config.get("use_tensorboard") is not None:
        b.put("use_tensorboard", "logging.tensorboard", bool(b.config["use_tensorboard"]))


def _every(key: str, target: str, b: Builder, applies: bool) -> None:
    value = b.config.get(key)
    if value is None:
        return
    if not applies:
        b.skip(key, "no evaluation data (val_set_size 0, no test_datasets)")
        return
    value = b.number(key, value)
    if value >= 1:
        b.put(key, target, b.number(key, value, int))
        return
    max_steps = b.config.get("max_steps")
    if max_steps:  # a fraction of the run, as in transformers
        b.put(key, target, max(1, round(value * b.number("max_steps", max_steps, int))))
    else:
        b.skip(key, f"{value}: a fraction of the run needs max_steps (steps per epoch are known only after "
               "tokenizing): set " + target)


def output_section(b: Builder) -> None:
    out = b.config.get("output_dir")
    if is_empty(out):
        return
    path = PurePosixPath(b.text("output_dir", out, "a directory").rstrip("/") or "/")
    # ftlaunch writes a run to output.root/output.name (relative to the working directory, as axolotl's output_dir).
    b.put("output_dir", "output.root", str(path.parent))
    if NAME_PATTERN.match(path.name) and len(path.name) <= 128:
        b.put("output_dir", "output.name", path.name)
        b.note(f"output_dir {out}: ftlaunch writes the run directory there (adapter/ or model/, checkpoints/, "
               "metrics.jsonl), and adds a suffix instead of overwriting an existing run")
    else:
        b.note(f"output_dir {out}: {path.name!r} is not a run name ftlaunch takes (letters, digits, `.`, `_`, `-`): "
               f"runs go to {path.parent}/<recipe name>")

# ------------------------------------------------------------------------------------------------------ tracking
WANDB_KEYS = {"wandb_project": "project", "wandb_entity": "entity", "wandb_name": "name"}
MLFLOW_KEYS = {"mlflow_tracking_uri": "tracking_uri", "mlflow_experiment_name": "experiment",
               "mlflow_run_name": "run_name"}


def tracking_section(b: Builder) -> None:
    """W&B and MLflow as axolotl turns them on: W&B when `wandb_project` is set (or `use_wandb`), offline with
    `wandb_mode: offline`; MLflow when `mlflow_tracking_uri` is set (or `use_mlflow`)."""
    if b.config.get("wandb_mode") == "disabled" or b.config.get("use_wandb") is False:
        for key in b.config:
            if key.startswith(("wandb_", "use_wandb")):
                b.skip(key, "W&B is turned off in this config (wandb_mode: disabled / use_wandb: false)")
    elif not is_empty(b.config.get("wandb_project")) or b.config.get("use_wandb") is True:
        _tracker_keys(b, WANDB_KEYS, "logging.wandb")
        mode = b.config.get("wandb_mode")
        if mode in ("online", "offline"):
            b.put("wandb_mode", "logging.wandb.mode", mode)
        elif "logging" not in b.out.recipe or "wandb" not in b.out.recipe["logging"]:
            b.put("use_wandb", "logging.wandb.mode", "online")
        log_model = b.config.get("wandb_log_model")
        if log_model in ("end", "checkpoint"):
            b.put("wandb_log_model", "logging.wandb.log_artifacts", True)
            if log_model == "checkpoint":
                b.note("wandb_log_model: checkpoint: ftlaunch logs the final adapter/model as an artifact, not each "
                       "checkpoint")
        b.handled.add("use_wandb")
    for key, why in (("wandb_run_id", "ftlaunch keeps the W&B run id itself (RUN_DIR/tracking.json): a resumed run "
                      "continues it"), ("wandb_watch", "ftlaunch does not log gradients or weights to W&B")):
        if not is_empty(b.config.get(key)) and key not in b.handled:
            b.skip(key, why)
    if not is_empty(b.config.get("mlflow_tracking_uri")) or b.config.get("use_mlflow") is True:
        _tracker_keys(b, MLFLOW_KEYS, "logging.mlflow")
        if "mlflow" not in b.out.recipe.get("logging", {}):
            b.put("use_mlflow", "logging.mlflow", {})  # every field defaulted: a store in the run directory
        if b.config.get("hf_mlflow_log_artifacts") is True:
            b.put("hf_mlflow_log_artifacts", "logging.mlflow.log_artifacts", True)
        b.handled.add("use_mlflow")


def _tracker_keys(b: Builder, keys: Mapping[str, str], section: str) -> None:
    for key, name in keys.items():
        value = b.config.get(key)
        if not is_empty(value):
            b.put(key, f"{section}.{name}", b.text(key, value, "a name"))
