"""The training loop: data order, accumulation, loss normalisation, clipping, schedule, eval, early stopping,
checkpoints, logging. One loop for every strategy: it asks the strategy object, never its name.

Loss normalisation. The loss of an optimizer step is the mean cross-entropy over every label token of the step,
across all its micro batches and all ranks:

    loss_step = sum_{ranks, micro batches} sum_tokens CE  /  N_step,   N_step = label tokens of the whole step

Each micro batch contributes `sum CE / N_step`, so accumulation and world size change nothing: 2 ranks x micro batch 2
equals 1 rank x micro batch 4 (up to float summation order). Other tasks (`task.type`) count their own labelled items
(tagged words, target tokens, or examples for sequence classification: launcher/train/loss.py) the same way. DDP
averages gradients over ranks, so each rank scales its contribution by world_size to turn that average back into the
sum. (HF Trainer's `num_items_in_batch` does the same; per-micro-batch means, the older default, weight short
examples more than long ones.)
"""

from __future__ import annotations

import enum
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import torch

from launcher.common.jsonl import read_jsonl
from launcher.common.logs import STEP_LOGGER, steps_on_console
from launcher.common.rundir import METRICS_FILE, write_text_atomic
from launcher.train.checkpoint import (TrainerState, checkpoints_dir, load_checkpoint, mark_best, save_checkpoint,
                                       step_name, write_best)
from launcher.train.data import DataBundle, DataError, collate
from launcher.train.layers import Unfreezing, param_groups
from launcher.train.loss import count_label_tokens, forward_loss_sum, input_tokens
from launcher.train.model import count_parameters, unwrap, weight_bytes
from launcher.train.throughput import Throughput
from launcher.train.tracking import Trackers, scalars
from launcher.config.schema import OptimConfig, Recipe
from launcher.strategies.base import Strategy

log = logging.getLogger("ftlaunch")
step_log = logging.getLogger(STEP_LOGGER)
"""One line per `logging.every_steps` (step, loss, lr, grad norm, tokens/s, ETA): in every rank0.log and on a console
without the live bar (launcher/common/logs.py)."""


# ------------------------------------------------------------------------------------------------- schedule/optim
def lr_lambda(optim: OptimConfig, total_steps: int) -> Any:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then linear/cosine decay to min_lr_ratio."""
    warmup = optim.warmup_steps or int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 1.0 - progress if optim.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * decay

    return factor


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The AdamW implementation for `optim.name`: torch's, or one of bitsandbytes' 8-bit / paged variants.

    bitsandbytes is imported only when asked for, so full-precision runs do not depend on it.
    """
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes.optim as bnb_optim

    classes: dict[str, type[torch.optim.Optimizer]] = {
        "adamw_8bit": bnb_optim.AdamW8bit,
        "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb_optim.PagedAdamW32bit,
    }
    if name not in classes:
        raise ValueError(f"optim.name: unknown optimizer {name!r} (one of adamw, {', '.join(classes)})")
    return classes[name]


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (`optim.name` picks the implementation) over the trainable parameters; no weight decay on biases and
    norm weights (1-D tensors); with `optim.layer_lr_decay`, one lr per depth (launcher/train/layers.py)."""
    # Every class takes the same AdamW arguments; the groups' weight_decay overrides each class's own default
    # (bitsandbytes' is 1e-2, torch's 1e-2 too), so the recipe's value is the only one that applies.
    return optimizer_class(optim.name)(param_groups(model, optim), lr=optim.lr, betas=optim.betas, eps=optim.eps)


def improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in the metric's direction (anything beats no best)."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


# -------------------------------------------------------------------------------------------------------- data
def micro_batches(n_examples: int, micro_batch: int, world_size: int, rank: int, seed: int, epoch: int,
                  start: int) -> Iterator[list[int]]:
    """This rank's micro batches of one epoch, from micro batch `start` on (resume).

    The epoch's order is a permutation seeded by (seed, epoch), identical on every rank; global micro batch j holds
    examples perm[j*B*W:(j+1)*B*W] and rank r takes its B of them, so the union over ranks does not depend on W.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    per_global = micro_batch * world_size
    for j in range(start, n_examples // per_global):
        chunk = order[j * per_global:(j + 1) * per_global]
        yield chunk[rank * micro_batch:(rank + 1) * micro_batch]


# --------------------------------------------------------------------------------------------------- interrupts
class StopFlag:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag checked between optimizer steps (so a checkpoint can be written).

    A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then checkpointing", self.reason)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------------ trainer
class StopReason(enum.Enum):
    """Why a run's loop ended."""

    MAX_STEPS = "max_steps"
    EPOCHS = "epochs"
    EARLY_STOPPING = "early_stopping"
    SIGNAL = "signal"
    """SIGINT, SIGTERM or SIGUSR1 (on this rank or another): checkpointed, resumable."""

    @property
    def finished(self) -> bool:
        """The run is done (outputs follow); False when it stopped to be resumed."""
        return self is not StopReason.SIGNAL


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient norm (or DeepSpeed met one), or the weights are not
    finite at a checkpoint: the run stops, and no non-finite update is applied or checkpointed."""


@dataclass
class RunResult:
    state: TrainerState
    stopped_by: StopReason
    signal: str | None = None
    """The signal's name when stopped_by is SIGNAL."""


class Trainer:
    """Owns the model, optimizer, data and state of one rank for one run."""

    def __init__(self, run_dir: Path, recipe: Recipe, strategy: Strategy, model: torch.nn.Module,
                 tokenizer: Any, data: DataBundle, device: torch.device, tracker: Trackers | None = None) -> None:
        self.run_dir, self.recipe, self.strategy, self.device = run_dir, recipe, strategy, device
        self.tokenizer = tokenizer
        self.data = data
        self.fused_ce = "fused_ce" in recipe.kernels or recipe.kernels == "all"
        self.model, self.optimizer = strategy.wrap(model, lambda m: make_optimizer(m, recipe.optim))
        optim = recipe.optim
        per_step = optim.micro_batch * optim.grad_accum * strategy.world_size
        self.micro_per_epoch = len(data.train) // (optim.micro_batch * strategy.world_size)
        self.steps_per_epoch = self.micro_per_epoch // optim.grad_accum
        if self.steps_per_epoch == 0:  # the epoch loop would have nothing to do
            raise DataError(f"data.train: {len(data.train)} examples after tokenization ({data.stats.get('kept', '?')} "
                            f"rows kept), fewer than one optimizer step takes: micro_batch({optim.micro_batch}) * "
                            f"grad_accum({optim.grad_accum}) * world_size({strategy.world_size}) = {per_step}; add "
                            "data or lower micro_batch / grad_accum")
        self.total_steps = optim.max_steps or math.ceil(optim.epochs * self.steps_per_epoch)
        # One factor for every group: LambdaLR scales each group's own initial lr (layer_lr_decay's per-depth lrs).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, self.total_steps))
        self.state = TrainerState(world_size=strategy.world_size)
        unfreeze = getattr(recipe.method, "unfreeze", None)
        # Built after `wrap`: DDP and the optimizer took every parameter the method trains; only now are the lower
        # groups frozen (a parameter frozen before DDP wraps it would never be reduced once unfrozen).
        self.unfreezing = Unfreezing(unwrap(self.model), unfreeze, self.steps_per_epoch) if unfreeze else None
        if self.unfreezing is not None:
            self.state.unfrozen_groups = 1
            self.unfreezing.apply(1)
        self.nonfinite_in_row = 0
        """Steps not applied (non-finite loss or gradient norm) since the last applied one."""
        self.metrics = MetricsLog(self.run_dir, enabled=strategy.is_main, tensorboard=recipe.logging.tensorboard,
                                  tracker=tracker)

    # ------------------------------------------------------------------------------------------------ batches
    def _batch_stream(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro batches from the saved position on, across epochs; updates the data position as it goes."""
        optim = self.recipe.optim
        while True:
            for indices in micro_batches(len(self.data.train), optim.micro_batch, self.strategy.world_size,
                                         self.strategy.rank, optim.seed, self.state.epoch, self.state.batch_in_epoch):
                self.state.batch_in_epoch += 1
                batch = collate([self.data.train[i] for i in indices], self.tokenizer.pad_token_id)
                yield {k: v.to(self.device) for k, v in batch.items()}
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _mfu_terms(self) -> dict[str, float]:
        """Throughput's MFU terms on a GPU whose bf16 peak is known (launcher/plan/flops.py); none elsewhere."""
        if self.device.type != "cuda":
            return {}
        from launcher.plan.flops import method_flops_per_token, peak_bf16_flops

        name = torch.cuda.get_device_name(self.device)
        peak = peak_bf16_flops(name)
        model = unwrap(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        per_token = method_flops_per_token(base.config.to_dict(), seq_len=self.recipe.data.max_length,
                                           method=self.recipe.method, task=self.recipe.task.type)
        if peak is None or per_token is None:
            return {}
        if self.strategy.is_main:
            log.info("mfu: %.3g model FLOPs per token against %s's bf16 peak of %.1f TFLOP/s x %d ranks", per_token,
                     name, peak / 1e12, self.strategy.world_size)
        return {"flops_per_token": per_token, "peak_flops": peak * self.strategy.world_size}

    # --------------------------------------------------------------------------------------------------- step
    def train_step(self, stream: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        optim = self.recipe.optim
        self.model.train()
        batches = [next(stream) for _ in range(optim.grad_accum)]
        task = self.recipe.task.type
        local_tokens = torch.tensor([sum(count_label_tokens(b["labels"], task) for b in batches),
                                     sum(input_tokens(b) for b in batches)], dtype=torch.float64)
        n_label, n_input = self.strategy.all_reduce_sum(local_tokens.to(self.device)).tolist()
        scale = self.strategy.world_size / max(1.0, n_label)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            with self.strategy.no_sync(self.model, last_micro_batch=i == len(batches) - 1):
                loss = forward_loss_sum(self.model, batch, optim.label_smoothing, self.fused_ce, task)
                self.strategy.backward(self.model, loss * scale)
            loss_sum += loss.detach().double()
        lr = self.scheduler.get_last_lr()[0]
        # Reduced before the step, so that every rank decides alike whether to apply it.
        total_loss = float(self.strategy.all_reduce_sum(loss_sum)) / max(1.0, n_label)
        if math.isfinite(total_loss):
            # Clipping, the step and zeroing belong to the strategy (DeepSpeed's engine does all three itself); a
            # non-finite gradient norm is not applied (Strategy.optimizer_step).
            grad_norm = self.strategy.optimizer_step(self.model, self.optimizer, optim.max_grad_norm)
        elif self.strategy.can_skip_step:
            self.strategy.discard_gradients(self.model, self.optimizer)
            grad_norm = float("nan")
        else:
            raise NonFiniteError(f"step {self.state.step + 1}: the loss is {total_loss} and {self.strategy.name}'s "
                                 "engine cannot skip a step; nothing of it was applied or checkpointed. Lower "
                                 "optim.lr or check the data (ddp and fsdp skip such steps)")
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += int(n_input)
        # A strategy that cannot skip (DeepSpeed) has applied any step with a finite loss, whatever norm it reports
        # (its engine may report none): only the strategies that skip turn a non-finite norm into a skipped step.
        applied = math.isfinite(total_loss) and (math.isfinite(grad_norm) or not self.strategy.can_skip_step)
        self._count_nonfinite(applied, total_loss, grad_norm)
        return {"loss": total_loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_input, "skipped": not applied}

    def _count_nonfinite(self, applied: bool, loss: float, grad_norm: float) -> None:
        """Count and log a step that was not applied."""
        if applied:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        limit = self.recipe.optim.max_nonfinite_steps
        if self.strategy.is_main:
            log.warning("step %d: loss %s, gradient norm %s: not applied (%d in a row; the run stops at %d)",
                        self.state.step, loss, grad_norm, self.nonfinite_in_row, limit)

    def _check_divergence(self) -> None:
        """Stop (after the step's metrics row is written) once `optim.max_nonfinite_steps` were skipped in a row."""
        limit = self.recipe.optim.max_nonfinite_steps
        if self.nonfinite_in_row >= limit:
            raise NonFiniteError(
                f"steps {self.state.step - limit + 1}-{self.state.step}: {limit} steps in a row had a non-finite "
                "loss or gradient norm; none was applied, so every checkpoint holds finite weights. Lower optim.lr, "
                "check the data, or raise optim.max_nonfinite_steps")

    # --------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval loss and perplexity over the eval set; exact match (and ROUGE/BLEU) of greedy generations when asked.
        Tasks other than causal_lm: launcher/train/task_eval.py."""
        from launcher.train.evaluate import eval_loss
        from launcher.train.task_eval import evaluate_task, generation_results

        if self.recipe.task.type != "causal_lm":
            return evaluate_task(unwrap(self.model), self.tokenizer, self.data, self.recipe, self.strategy,
                                 self.device)
        results: dict[str, float] = {}
        if self.data.eval:
            loss = eval_loss(unwrap(self.model), self.data.eval, self.tokenizer.pad_token_id, self.strategy,
                             self.device, self.recipe.optim.micro_batch, self.recipe.eval.max_batches, self.fused_ce)
            results["eval_loss"] = loss
            results["eval_perplexity"] = math.exp(min(loss, 50.0))
        if self.recipe.eval.exact_match and self.data.eval_generation:
            results.update(generation_results(unwrap(self.model), self.tokenizer, self.data.eval_generation,
                                              self.recipe.eval, self.strategy, self.device, encoder_decoder=False))
        return results

    def _early_stop(self, results: dict[str, float]) -> bool:
        cfg = self.recipe.early_stopping
        if cfg is None or cfg.metric not in results:
            return False
        value = results[cfg.metric]
        if improves(value, self.state.best_metric, cfg.mode or "min", cfg.min_delta):
            self.state.best_metric, self.state.evals_without_improvement = value, 0
            return False
        self.state.evals_without_improvement += 1
        return self.state.evals_without_improvement >= cfg.patience

    def _keep_best(self, results: dict[str, float]) -> bool:
        """Record a new best evaluation by `checkpoint.keep_best`; True when this step's checkpoint becomes the best.
        The evaluation before training does not count: there is no checkpoint of step 0 to keep."""
        metric = self.recipe.checkpoint.keep_best
        if metric is None or metric not in results or self.state.step == 0:
            return False
        from launcher.common.metrics import metric_mode

        mode = metric_mode(metric)
        best = self.state.best
        if not improves(results[metric], best["value"] if best else None, mode, 0.0):
            return False
        self.state.best = {"metric": metric, "mode": mode, "value": results[metric], "step": self.state.step,
                           "checkpoint": step_name(self.state.step)}
        return True

    def _eval_and_record(self, label: str) -> tuple[bool, bool]:
        """Evaluate and log; (early stopping says stop, a new best checkpoint is due at this step)."""
        if self.strategy.is_main and (self.data.eval or self.data.eval_generation):
            # An evaluation with generation can take minutes: say it started, and on what.
            generating = len(self.data.eval_generation) if self.recipe.eval.exact_match else 0
            log.info("evaluating (%s, step %d): %d examples%s ...", label, self.state.step, len(self.data.eval),
                     f", generating {generating} answers" if generating else "")
        started = time.perf_counter()
        results = self.evaluate()
        seconds = time.perf_counter() - started
        if not results:
            return False, False
        results_row = {"step": self.state.step, "when": label, **results}
        self.state.history.append(results_row)
        self.metrics.write({"kind": "eval", **results_row})
        if self.strategy.is_main:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in results.items())
            log.info("eval (%s, step %d, %.1f s): %s", label, self.state.step, seconds, shown)
        return self._early_stop(results), self._keep_best(results)

    def _checkpoint(self) -> None:
        if not self.strategy.weights_finite(self.model):
            raise NonFiniteError(f"step {self.state.step}: the weights hold NaN/inf values; they were not "
                                 "checkpointed (the previous checkpoint is intact). Lower optim.lr or check the data")
        started = time.perf_counter()
        save_checkpoint(self.run_dir, self.strategy, self.model, self.optimizer, self.scheduler, self.state,
                        self.recipe.checkpoint.keep_last, best=self.state.best)
        if self.strategy.is_main:
            log.info("checkpoint step %d saved (%.1f s): %s", self.state.step, time.perf_counter() - started,
                     checkpoints_dir(self.run_dir) / step_name(self.state.step))

    # ------------------------------------------------------------------------------------------------- unfreezing
    def _unfreeze_to(self, count: int) -> None:
        """Make `count` groups trainable (a resume restores the checkpoint's; 0 means not recorded: from the step)."""
        assert self.unfreezing is not None
        count = count or self.unfreezing.groups_at(self.state.step)
        self.unfreezing.apply(count)
        self.state.unfrozen_groups = count

    def _restore_unfreezing(self, saved: TrainerState) -> None:
        """Before a checkpoint's weights load: the trainable set it was saved with (it holds those parameters)."""
        self.state.step = saved.step
        self._unfreeze_to(saved.unfrozen_groups)

    def _unfreeze_if_due(self) -> None:
        """After step s: one more group when the schedule says so, logged ("step 40: unfrozen layer 27 (2 of 30
        groups trainable)")."""
        if self.unfreezing is None:
            return
        due = self.unfreezing.groups_at(self.state.step)
        if due <= self.state.unfrozen_groups:
            return
        opened = ", ".join(self.unfreezing.label(i) for i in range(self.state.unfrozen_groups, due))
        self._unfreeze_to(due)
        if self.strategy.is_main:
            trainable, _ = count_parameters(unwrap(self.model))
            log.info("step %d: unfrozen %s (%d of %d groups trainable, %s parameters)", self.state.step, opened,
                     due, len(self.unfreezing.groups), f"{trainable:,}")

    # ---------------------------------------------------------------------------------------------------- run
    def run(self) -> RunResult:
        recipe = self.recipe
        resumed = load_checkpoint(self.run_dir, self.strategy, self.model, self.optimizer, self.scheduler,
                                  self._restore_unfreezing if self.unfreezing is not None else None)
        if resumed is not None:
            if self.unfreezing is not None:
                resumed.unfrozen_groups = self.state.unfrozen_groups
            self.state = resumed
            self.metrics.truncate_after(resumed.step)  # steps after the checkpoint are about to be redone
            if resumed.best is not None and self.strategy.is_main:
                write_best(self.run_dir, resumed.best)  # a crash may have come between `latest` and best.json
        trainable, total = count_parameters(unwrap(self.model))
        if self.strategy.is_main:
            log.info("params: %s trainable of %s (%.2f%%); %d train / %d eval examples; %d steps (%d per epoch)",
                     f"{trainable:,}", f"{total:,}", 100 * trainable / max(1, total), len(self.data.train),
                     len(self.data.eval), self.total_steps, self.steps_per_epoch)
        if self.strategy.world_size > 1:  # every rank's own log: what sharding left it
            held, whole = weight_bytes(unwrap(self.model))
            log.info("weights held by rank %d: %.2f of %.2f MiB (%.1f%%)", self.strategy.rank, held / 2**20,
                     whole / 2**20, 100 * held / max(1, whole))
        if resumed is None and recipe.eval.at_start:
            self._eval_and_record("start")
        stream = self._batch_stream()
        stopped_by = StopReason.MAX_STEPS if recipe.optim.max_steps else StopReason.EPOCHS
        every_ckpt, every_eval = recipe.checkpoint.every_steps, recipe.eval.every_steps
        last_saved = self.state.step
        speed = Throughput(self.total_steps, **self._mfu_terms())
        with StopFlag() as stop, Progress(self.strategy.is_main and recipe.logging.progress, self.total_steps,
                                          self.state.step) as progress:
            while self.state.step < self.total_steps:
                started = time.perf_counter()
                row = self.train_step(stream)
                seconds = time.perf_counter() - started
                row["tokens_per_s"] = row["tokens"] / max(1e-9, seconds)  # this step's, in metrics.jsonl
                speed.record(row["tokens"], seconds)
                if speed.mfu is not None:
                    row["mfu"] = speed.mfu  # over the window, as printed
                progress.update(self.state.step, row, speed)
                if self.unfreezing is not None:
                    row["trainable_groups"] = self.state.unfrozen_groups  # the groups this step trained
                if self.state.step % recipe.logging.every_steps == 0:
                    self.metrics.write({"kind": "train", "step": self.state.step, "epoch": self.state.epoch, **row})
                    if self.strategy.is_main:
                        step_log.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %s", self.state.step,
                                      self.total_steps, row["loss"], row["lr"], row["grad_norm"],
                                      speed.summary(self.state.step))
                self._check_divergence()
                self._unfreeze_if_due()  # before the checkpoint: it holds the schedule's position after this step
                early_stop = new_best = False
                last_step = self.state.step >= self.total_steps  # the end's evaluation and checkpoint follow
                # Evaluate before checkpointing, so that the checkpoint holds this evaluation's early-stopping and
                # best records and a resume from it continues them exactly.
                if every_eval and self.state.step % every_eval == 0 and not last_step:
                    early_stop, new_best = self._eval_and_record("periodic")
                if (every_ckpt and self.state.step % every_ckpt == 0 and not last_step) or new_best:
                    self._checkpoint()  # a new best is saved at once, whatever every_steps says
                    last_saved = self.state.step
                if early_stop:
                    stopped_by = StopReason.EARLY_STOPPING
                    break
                if self._stop_requested(stop):
                    stopped_by = StopReason.SIGNAL
                    break
        interrupted = not stopped_by.finished
        end_best = False
        if not interrupted:
            end_best = self._eval_and_record("end")[1]
        due = bool(every_ckpt) and self.state.step % every_ckpt == 0  # the last step's periodic save came here
        if self.state.step != last_saved and (not interrupted or recipe.checkpoint.on_interrupt or due):
            self._checkpoint()
        elif end_best and self.strategy.is_main:  # this step's checkpoint exists: best.json points at it now
            mark_best(self.run_dir, self.state.best, recipe.checkpoint.keep_last)
        self.metrics.close()
        return RunResult(self.state, stopped_by, stop.reason if interrupted else None)

    def _stop_requested(self, stop: StopFlag) -> bool:
        """Every rank stops at the same step when any rank was signalled."""
        flag = torch.tensor([1.0 if stop.reason else 0.0], device=self.device)
        if float(self.strategy.all_reduce_sum(flag)) > 0:
            stop.reason = stop.reason or "SIGTERM"
            return True
        return False


# ------------------------------------------------------------------------------------------------------ logging
class MetricsLog:
    """RUN_DIR/metrics.jsonl (one object per line), TensorBoard scalars and the experiment trackers (W&B, MLflow:
    launcher/train/tracking.py), from rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, tracker: Trackers | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.writer = None
        self.tracker = tracker if enabled else None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as err:
            # Rank 0 alone writes here: raising would leave the other ranks waiting in the next collective. The
            # next checkpoint fails on every rank together (WriteError) if the disk stays full.
            log.error("%s: step %s not logged (%s)", self.path, row.get("step"), err)
        if self.writer is not None:
            for name, value in scalars(row).items():
                self.writer.add_scalar(name, value, row["step"])
        if self.tracker is not None:
            self.tracker.log_row(row)  # never raises: a failing tracker is warned about and dropped

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps later than `step` (they were lost with the process that logged them)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= step]  # a torn last line goes too
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar with loss, lr and tokens/s (rank 0); plain log lines when disabled."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self._progress: Any = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            # No TimeRemainingColumn: the ETA is in the stats (launcher/train/throughput.py says why).
            self._progress = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), transient=False)
            self._progress.start()
            if self._progress.console.is_terminal:
                steps_on_console(False)  # the live bar says it; rank0.log keeps every step line
            self._task = self._progress.add_task("train", total=self.total, completed=self.done, stats="")
        return self

    def update(self, step: int, row: dict[str, float], speed: Throughput) -> None:
        if self._progress is not None:
            stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {speed.summary(step)}"
            self._progress.update(self._task, completed=step, stats=stats)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            steps_on_console(True)
