"""Our trainer vs TRL's SFTTrainer: LoRA SFT of the same model on the same data, on CPU, one after the other.

    .venv/bin/python bench/sft_vs_trl.py                  # 30 optimizer steps each side
    .venv/bin/python bench/sft_vs_trl.py --steps 3        # smoke run
    .venv/bin/python bench/sft_vs_trl.py --packing        # ours `data.packing: true` vs TRL `packing=True`
    .venv/bin/python bench/sft_vs_trl.py --packing --set data.max_length=512   # any recipe override, both sides
    .venv/bin/python bench/sft_vs_trl.py --repeats 3      # 3 rounds, order alternating, medians (noisy hosts)
    .venv/bin/python bench/sft_vs_trl.py --profile        # also a torch.profiler table of each side's timed steps
    python bench/sft_vs_trl.py --device cuda --with-kernels --recipe R.yaml   # on a GPU; adds ours + `kernels: all`

Output: a rich table on stdout and bench/results/sft_vs_trl-<tag>-<UTC date>[-packing].json (machine, commit,
versions, config, per-run figures, medians, ratios ours/TRL, sanity checks).

What is compared
----------------
Both sides read ONE recipe (default recipes/demo.yaml: SmolLM2-135M-Instruct from the cached GGUF conversion,
float32, sdpa, LoRA r16/alpha32/dropout 0/all-linear, AdamW lr 1e-3, cosine, warmup 5, micro batch 8, grad accum 1,
max_length 128, seed 0) through `launcher.config.recipe.load_recipe` with the same overrides (`BENCH_OVERRIDES`: no eval, no
checkpoints, no TensorBoard, no progress bar, a metrics row every step), so every number below comes from one place.

* Ours: the real entry point `launcher.train.job.run_job(run_dir)` on a run directory planned like `launch` plans it
  (tests/train/test_train.py's `start_run`/`run`). Nothing in launcher/ is edited; the child process only wraps
  `Trainer.train_step` (timestamps) and `launcher.train.trainer.collate` (token count) at run time.
* TRL: `SFTTrainer` with `SFTConfig(assistant_only_loss=True, packing=<flag>, max_length, bf16=False,
  gradient_checkpointing=<recipe, False>, report_to="none", save_strategy="no", eval_strategy="no",
  logging_steps=1, disable_tqdm=True)`, given a PEFT model built with the recipe's LoRA numbers.

Assistant-only loss, the closest equivalent. TRL's `assistant_only_loss=True` labels what the chat template wraps in
`{% generation %}`, which is exactly how ours builds `loss_on: assistant` labels. SmolLM2's own template has no
markers, so both sides get the SAME template text: the recipe's `data.chat_template`, or (when the recipe has none)
`--chat-template smollm2`, our launcher/train/templates/smollm2.jinja (renders SmolLM2's text, markers around each assistant
content + its <|im_end|>). TRL gets it as `tokenizer.chat_template`. `completion_only_loss` with a prompt/completion
conversion was not used: it would render the prompt separately and could label differently on multi-turn data.
Result on the demo data: identical input ids, identical labels (checked at run time: equal tokens per step, equal
step-1 loss).

Made identical on purpose, so that losses are comparable step by step (sanity check) and only the trainers differ:
  - LoRA init: both seed torch with `optim.seed` right before `from_pretrained` + `get_peft_model`
    (a checksum of the trainable weights before step 1 is compared).
  - Batches: TRL's sampler is replaced by one yielding `launcher.train.trainer.micro_batches`'s order (HF would shuffle with
    its own RNG). Packed rows: both use TRL's `pack_dataset(strategy="bfd")` on the same examples.
  - LR schedule: HF's "cosine" warmup is step/warmup (step 1 trains at lr 0); ours is (step+1)/warmup. TRL's
    scheduler is replaced by a LambdaLR over `launcher.train.trainer.lr_lambda`, so both use the same multipliers.
  - Optimizer: `optim="adamw_torch"` (torch.optim.AdamW, for-each off on CPU) like ours. transformers >= 5 with
    torch >= 2.8 would default to `adamw_torch_fused`; `--trl-optim adamw_torch_fused` measures that.
  - Threads: ours' job sets `torch.set_num_threads(os.cpu_count())`; the TRL child sets the same (`--threads N`
    sets N on both sides; OMP_NUM_THREADS is set to it in both children).
Left as each trainer does it (this is what is being measured): the loss (ours: full logits + F.cross_entropy sum;
TRL: its fused LM head computing per-token log-probs in chunks, plus entropy/accuracy metrics), packed batches
(ours: [micro_batch, <=max_length] rows padded, position ids, no attention mask; TRL: padding-free, the micro batch
flattened into one [1, sum of lengths] row), per-step bookkeeping, logging.
Not identical: with grad_accum that does not divide the micro batches of an epoch and runs longer than an epoch,
HF shortens the last step of each epoch while ours carries over into the next epoch (not the case for the demo).

What is measured (per side, each side in its own child process)
----------------------------------------------------------------
* tokens/s = non-padding input tokens of the timed steps / wall time of the timed steps. Timed steps: optimizer steps
  `skip+1 .. N` (default skip 1: the first step carries one-time costs). Wall time: from the END of step `skip` to the
  END of step N (time.perf_counter), i.e. N-skip complete iterations of each trainer's loop: fetching + collating the
  batches, forward, loss, backward, clipping, optimizer and scheduler step, zero_grad, and the per-step
  bookkeeping/logging each trainer does between steps (ours: metrics.jsonl row, stop-flag check; TRL/HF: log_history,
  callbacks, metric gathering). Excluded: imports, model load, tokenization/packing, dataloader creation, step 1,
  anything after the last step (ours writes a final checkpoint, adapter and loss plot; TRL nothing).
  Ends of steps: ours at the return of `Trainer.train_step`; TRL at `on_step_end` (after optimizer/scheduler step and
  zero_grad, before HF's logging of that step; so both windows include exactly N-skip loggings).
  Non-padding tokens: ours = sum of example lengths in each collated micro batch (packed: real tokens of each packed
  row); TRL = its own `_total_train_tokens` counter (attention_mask.sum(), or the flattened length when padding-free).
  Equal per-step counts on both sides are reported as a check that both trained on the same batches.
* peak RSS: `ru_maxrss` of the child from `os.wait4` (whole process life: imports, load, tokenization, training,
  saving), and the training peak: VmHWM after writing 5 to /proc/self/clear_refs just before step 1, read after
  step N (the training peak is the one to compare; the lifetime peak also contains e.g. datasets/arrow buffers of
  TRL's tokenization).
* losses: each optimizer step's loss (mean CE over the step's label tokens; TRL's `num_items_in_batch` normalisation
  is the same definition), reported: step 1 (same weights, same batch -> should agree to ~1e-4), the last step, and
  the mean of the last min(5, N) steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
# Importable without installing ftlaunch: the repo root and kernels/ (the package `ftkernels`).
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

RESULTS_DIR = ROOT / "bench" / "results"
SIDES = ("ours", "trl")
KERNELS_SIDE = "ours_kernels"
"""With --with-kernels: ours again with `kernels: all` (TRL cannot use our kernels; its side stays the same)."""

BENCH_OVERRIDES = [
    "data.eval=[]", "data.eval_fraction=0", "eval.at_start=false", "eval.exact_match=false", "eval.every_steps=null",
    "early_stopping=null", "checkpoint.every_steps=null", "logging.tensorboard=false", "logging.progress=false",
    "logging.every_steps=1", "output.merge=false", "kernels=[]",
]
"""Applied to the recipe for both sides: no eval, no periodic checkpoints, no TensorBoard or progress bar (TRL gets
report_to=none, disable_tqdm), one metrics row per step on both sides, no kernels (TRL cannot use ours)."""


# ------------------------------------------------------------------------------------------------ probe (children)
def _rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the training peak excludes model load and tokenization."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StepProbe:
    """Timestamps, token counts and losses of each optimizer step, fed by the side-specific hooks."""

    def __init__(self, steps: int, skip: int, profile: bool = False) -> None:
        self.steps, self.skip, self.profile = steps, skip, profile
        self.first_begin: float | None = None
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.rss_start_mib = float("nan")
        self.train_peak_mib = float("nan")
        self.peak_reset = False
        self.init_checksum: list[float] = []
        self.profiler: Any = None
        self.cuda = False
        self.gpu_peak_mib = float("nan")

    def begin(self, model: Any) -> None:
        """Called at the start of every step; acts on the first one only."""
        if self.first_begin is not None:
            return
        self.init_checksum = _checksum(model)
        self.rss_start_mib = _rss_mib("VmRSS")
        self.cuda = _cuda_in_use()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the training peak: weights + what the steps allocate
        self.peak_reset = _reset_peak_rss()
        if self.skip == 0:
            self._start_profiler()
        self.first_begin = time.perf_counter()

    def _start_profiler(self) -> None:
        """The profiler covers exactly the timed window (and slows it down: profiled runs are not for tokens/s)."""
        if self.profile:
            import torch.profiler

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def end(self, tokens: int, loss: float) -> None:
        if getattr(self, "cuda", False):
            import torch

            torch.cuda.synchronize()  # a step ends when the GPU has finished it, not when its kernels are queued
        self.ends.append(time.perf_counter())
        self.tokens.append(int(tokens))
        self.losses.append(float(loss))
        done = len(self.ends)
        if done == self.skip:
            self._start_profiler()
        if done == self.steps:
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
            self.train_peak_mib = _rss_mib("VmHWM")
            if getattr(self, "cuda", False):
                import torch

                self.gpu_peak_mib = torch.cuda.max_memory_allocated() / 2**20

    def profile_table(self, rows: int = 35) -> str | None:
        if self.profiler is None:
            return None
        averages = self.profiler.key_averages()
        return (averages.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n\n"
                + averages.table(sort_by="cpu_time_total", row_limit=rows))

    def summary(self) -> dict[str, Any]:
        n = len(self.ends)
        timed = self.tokens[self.skip:]
        start = self.ends[self.skip - 1] if self.skip > 0 else self.first_begin
        window = (self.ends[-1] - start) if n > self.skip and start is not None else float("nan")
        step_times = [b - a for a, b in zip([self.first_begin or 0.0] + self.ends[:-1], self.ends)]
        tail = self.losses[-min(5, n):] if n else []
        return {
            "steps_done": n,
            "timed_steps": max(0, n - self.skip),
            "timed_window_s": window,
            "timed_tokens": sum(timed),
            "tokens_per_s": sum(timed) / window if window and window == window else float("nan"),
            "step_times_s": step_times,
            "first_step_s": step_times[0] if step_times else float("nan"),
            "median_timed_step_s": statistics.median(step_times[self.skip:]) if n > self.skip else float("nan"),
            "tokens_per_step": self.tokens,
            "losses": self.losses,
            "loss_step1": self.losses[0] if self.losses else float("nan"),
            "loss_final": self.losses[-1] if self.losses else float("nan"),
            "loss_last5_mean": sum(tail) / len(tail) if tail else float("nan"),
            "rss_at_train_start_mib": self.rss_start_mib,
            "train_peak_rss_mib": self.train_peak_mib if self.peak_reset else float("nan"),
            "gpu_peak_allocated_mib": self.gpu_peak_mib,
            "init_checksum": self.init_checksum,
        }


def _cuda_in_use() -> bool:
    """Whether this child trains on a GPU (torch is imported by then; never initialise CUDA just to ask)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def _checksum(model: Any) -> list[float]:
    """(sum, sum of squares) of the trainable weights: equal on both sides = same LoRA init."""
    import torch

    with torch.no_grad():
        params = [p.detach().double() for p in model.parameters() if p.requires_grad]
        return [float(sum(p.sum() for p in params)), float(sum((p * p).sum() for p in params))]


def _load(spec: dict[str, Any], kernels: bool = False) -> Any:
    from launcher.config.recipe import load_recipe

    return load_recipe(spec["recipe_file"], spec["overrides"] + (["kernels=all"] if kernels else []))


# --------------------------------------------------------------------------------------------------- ours (child)
def child_ours(spec: dict[str, Any], kernels: bool = False) -> dict[str, Any]:
    """Run our trainer through `launcher.train.job.run_job`, as `launch` does, with timing hooks (`kernels`: all)."""
    t0 = time.perf_counter()
    import launcher.train.trainer as train_module
    from launcher.train.job import run_job
    from cluster.local import LocalExecutor
    from launcher.plan.resources import Resources

    resources = Resources(gpus_per_node=1) if spec["device"] == "cuda" else Resources()
    run_dir = LocalExecutor(resources).prepare(_load(spec, kernels=kernels)).run_dir
    probe = StepProbe(spec["steps"], spec["skip"], spec["profile"])
    pending = [0]  # real tokens collated since the last step ended

    real_collate = train_module.collate
    real_step = train_module.Trainer.train_step

    def counting_collate(batch: list[Any], pad_id: int) -> dict[str, Any]:
        pending[0] += sum(len(example) for example in batch)  # before padding: non-padding tokens only
        return real_collate(batch, pad_id)

    def timed_step(self: Any, stream: Iterator[dict[str, Any]]) -> dict[str, float]:
        probe.begin(self.model)
        row = real_step(self, stream)
        tokens, pending[0] = pending[0], 0
        probe.end(tokens, row["loss"])
        return row

    if spec["force_threads"]:
        import torch

        # launcher.train.job sets os.cpu_count() threads for a single rank; --threads overrides that, in this child only.
        real_set_threads = torch.set_num_threads
        torch.set_num_threads = lambda _n: real_set_threads(spec["threads"])  # type: ignore[assignment]
    # Module-level rebinding in this child only: the Trainer looks both names up at call time.
    train_module.collate = counting_collate  # type: ignore[assignment]
    train_module.Trainer.train_step = timed_step  # type: ignore[method-assign]
    rc = run_job(run_dir)
    result = {"rc": rc, "setup_s": (probe.first_begin or t0) - t0, "run_dir": str(run_dir), **probe.summary(),
              "profile": probe.profile_table()}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [r for r in rows if r.get("kind") == "train"]
        result["grad_norms"] = [r.get("grad_norm") for r in train]
        result["lrs"] = [r.get("lr") for r in train]
    return result


# ---------------------------------------------------------------------------------------------------- TRL (child)
def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Run TRL's SFTTrainer on the same recipe numbers, with the matched sampler and schedule (module docstring)."""
    t0 = time.perf_counter()
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from launcher.train.data import load_rows, resolve_chat_template
    from launcher.common.model_files import model_dir
    from launcher.train.trainer import lr_lambda, micro_batches

    recipe = _load(spec).recipe
    data, optim, method = recipe.data, recipe.optim, recipe.method
    _refuse_unmatched(recipe)
    torch.set_num_threads(spec["threads"])  # what launcher.train.job does for one rank on this node

    path = model_dir(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # ours does the same (launcher.train.model.load_tokenizer)
    template = resolve_chat_template(data.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    rows = [row for source in data.train for row in load_rows(source)]
    train_dataset = datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows])

    torch.manual_seed(optim.seed)  # as launcher.train.job does right before building the model: same LoRA init
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, recipe.model.dtype),
                                                 attn_implementation=recipe.model.attn_implementation)
    model = get_peft_model(model, LoraConfig(
        r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=method.target_modules,
        modules_to_save=list(method.modules_to_save) or None, use_dora=method.name == "dora", task_type="CAUSAL_LM"))

    probe = StepProbe(spec["steps"], spec["skip"], spec["profile"])

    class OursOrderSampler(torch.utils.data.Sampler[int]):
        """Yields, epoch after epoch, the example order of ours' `micro_batches` (one rank), full batches only."""

        def __init__(self, n: int) -> None:
            self.n, self.epoch = n, 0

        def __len__(self) -> int:
            return (self.n // optim.micro_batch) * optim.micro_batch

        def __iter__(self) -> Iterator[int]:
            epoch, self.epoch = self.epoch, self.epoch + 1
            for indices in micro_batches(self.n, optim.micro_batch, 1, 0, optim.seed, epoch, 0):
                yield from indices

    class MatchedSFTTrainer(SFTTrainer):
        """SFTTrainer with ours' batch order and LR multipliers; records each step's loss."""

        step_loss = 0.0

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return OursOrderSampler(len(train_dataset if train_dataset is not None else self.train_dataset))

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                      lr_lambda(optim, num_training_steps))
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            self.step_loss += float(loss)  # each micro batch returns its share of the step's mean (num_items_in_batch)
            return loss

    class ProbeCallback(TrainerCallback):
        trainer: Any = None
        tokens_before = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            probe.begin(self.trainer.model)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            total = int(self.trainer._total_train_tokens)  # TRL's own non-padding count, summed in compute_loss
            probe.end(total - self.tokens_before, self.trainer.step_loss)
            self.tokens_before, self.trainer.step_loss = total, 0.0

    config = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-out"),
        max_steps=spec["steps"],
        per_device_train_batch_size=optim.micro_batch,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        max_grad_norm=optim.max_grad_norm or 0.0,  # HF: 0 = no clipping, ours: None
        lr_scheduler_type="constant",  # replaced by MatchedSFTTrainer.create_scheduler
        optim=spec["trl_optim"],
        seed=optim.seed,
        data_seed=optim.seed,
        label_smoothing_factor=optim.label_smoothing,
        bf16=recipe.model.dtype == "bfloat16",  # SFTConfig defaults to bf16=True; the demo recipe is float32
        fp16=False,
        use_cpu=spec["device"] == "cpu",
        gradient_checkpointing=recipe.model.gradient_checkpointing,  # SFTConfig defaults to True
        max_length=data.max_length,
        truncation_mode="keep_start",  # ours: data.truncation=truncate keeps the start too
        packing=data.packing,
        packing_strategy="bfd",  # what launcher.train.data.pack uses
        assistant_only_loss=data.loss_on == "assistant",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = ProbeCallback()
    trainer = MatchedSFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer,
                                callbacks=[callback])
    callback.trainer = trainer
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"rc": 0, "setup_s": (probe.first_begin or t0) - t0, **probe.summary(), "profile": probe.profile_table(),
            "grad_norms": [entry.get("grad_norm") for entry in logs],
            "lrs": [entry.get("learning_rate") for entry in logs],
            "trl_train_rows": len(trainer.train_dataset)}


def _refuse_unmatched(recipe: Any) -> None:
    """Recipe features the TRL side cannot reproduce exactly: refuse rather than compare different jobs."""
    data = recipe.data
    problems = []
    if any(source.format != "messages" for source in data.train):
        problems.append("data.train formats other than messages")
    if data.system_prompt is not None:
        problems.append("data.system_prompt")
    if data.truncation != "truncate":
        problems.append("data.truncation=drop")
    if recipe.method.name not in ("lora", "dora"):
        problems.append(f"method.name={recipe.method.name}")
    if problems:
        raise SystemExit(f"sft_vs_trl: the TRL side cannot match {', '.join(problems)}")


# ------------------------------------------------------------------------------------------------------- parent
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_info() -> dict[str, Any]:
    """Commit, dirty flag, and a digest of the code that runs: much of the repo may be uncommitted, so the commit
    alone does not identify what was measured."""
    status = _git("status", "--porcelain")
    files = sorted((ROOT / "launcher").rglob("*.py")) + sorted((ROOT / "launcher" / "train" / "templates").glob("*.jinja"))
    digest = hashlib.sha256()
    for file in files + [Path(__file__).resolve()]:
        digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return {"commit": _git("rev-parse", "--short", "HEAD") or "unknown", "dirty": bool(status),
            "modified_files": sum(1 for line in status.splitlines() if not line.startswith("??")),
            "untracked_entries": sum(1 for line in status.splitlines() if line.startswith("??")),
            "source_sha256_12": digest.hexdigest()[:12]}


def _gpu_name() -> str:
    """The GPU's name from nvidia-smi (this parent process never imports torch)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU"
    return out.splitlines()[0] if out else "unknown GPU"


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
    return {"host": platform.node(), "cpu_model": model.group(1).strip() if model else platform.processor(),
            "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "ram_gib": round(int(total.group(1)) / 2**20, 1) if total else None,
            "os": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def run_child(side: str, spec: dict[str, Any], workdir: Path, env: dict[str, str], quiet: bool) -> dict[str, Any]:
    """One side in a fresh process; its own peak RSS comes from wait4 (RUSAGE_CHILDREN would mix both sides)."""
    spec_file, result_file = workdir / f"spec-{side}.json", workdir / f"result-{side}.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    log = (workdir / f"{side}.log").open("w")
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", side, "--spec", str(spec_file),
                              "--result", str(result_file)], cwd=ROOT, env=env, stdout=log if quiet else None,
                             stderr=subprocess.STDOUT if quiet else None)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from waiting on a reaped pid
    log.close()
    wall = time.perf_counter() - started
    if child.returncode != 0 or not result_file.is_file():
        tail = (workdir / f"{side}.log").read_text()[-4000:] if quiet else ""
        raise SystemExit(f"sft_vs_trl: the {side} child failed (exit {child.returncode}); log {workdir / side}.log"
                         f"\n{tail}")
    result = json.loads(result_file.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["process_wall_s"] = wall
    return result


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repeats per side, ratios ours/TRL and the sanity checks."""
    keys = ("tokens_per_s", "train_peak_rss_mib", "peak_rss_mib", "rss_at_train_start_mib", "median_timed_step_s",
            "first_step_s", "setup_s", "loss_step1", "loss_final", "loss_last5_mean", "timed_window_s",
            "timed_tokens", "gpu_peak_allocated_mib")
    sides = {side: {key: _median([run[side].get(key, float("nan")) for run in runs]) for key in keys}
             for side in runs[0]}
    ours, trl = sides["ours"], sides["trl"]
    ratio_keys = ("tokens_per_s", "train_peak_rss_mib", "peak_rss_mib", "median_timed_step_s", "gpu_peak_allocated_mib")
    ratios = {f"{key}_{side}_over_trl": sides[side][key] / trl[key] if trl[key] else float("nan")
              for side in sides if side != "trl" for key in ratio_keys}
    first = runs[0]
    checks = {
        "same_tokens_per_step": first["ours"]["tokens_per_step"] == first["trl"]["tokens_per_step"],
        "same_lora_init": all(abs(a - b) <= 1e-9 * max(1.0, abs(a))
                              for a, b in zip(first["ours"]["init_checksum"], first["trl"]["init_checksum"])),
        "loss_step1_abs_diff": abs(ours["loss_step1"] - trl["loss_step1"]),
        "loss_final_abs_diff": abs(ours["loss_final"] - trl["loss_final"]),
        "loss_last5_rel_diff": (abs(ours["loss_last5_mean"] - trl["loss_last5_mean"])
                                / max(1e-12, trl["loss_last5_mean"])),
    }
    return {"per_side_median": sides, "ratios": ratios, "checks": checks}


def print_table(summary: dict[str, Any], config: dict[str, Any], machine: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    sides = summary["per_side_median"]
    trl = sides["trl"]
    title = (f"ours vs TRL SFTTrainer - {config['model']} LoRA r{config['lora_r']}, {config['steps']} steps "
             f"({config['timed_steps']} timed), micro batch {config['micro_batch']}x{config['grad_accum']}, "
             f"max_length {config['max_length']}, packing {config['packing']}, {config['repeats']} repeat(s) - "
             f"{machine.get('gpu') or machine['cpu_model']}, {machine['cores']} cores")
    table = Table(title=title)
    ours_sides = [side for side in sides if side != "trl"]
    columns = ["metric", *ours_sides, "TRL", *(f"{side} / TRL" for side in ours_sides)]
    for column in columns:
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows: list[tuple[str, str, Callable[[float], str], bool]] = [
        ("training tokens/s (non-padding)", "tokens_per_s", lambda v: f"{v:,.0f}", True),
        ("median step time (s)", "median_timed_step_s", lambda v: f"{v:.3f}", True),
        ("peak GPU memory allocated, training (MiB)", "gpu_peak_allocated_mib", lambda v: f"{v:,.0f}", True),
        ("peak RSS, training (MiB)", "train_peak_rss_mib", lambda v: f"{v:,.0f}", True),
        ("peak RSS, whole process (MiB)", "peak_rss_mib", lambda v: f"{v:,.0f}", True),
        ("RSS at step 1 (MiB)", "rss_at_train_start_mib", lambda v: f"{v:,.0f}", True),
        ("first step (s, not timed)", "first_step_s", lambda v: f"{v:.2f}", True),
        ("setup before step 1 (s)", "setup_s", lambda v: f"{v:.1f}", True),
        ("loss, step 1", "loss_step1", lambda v: f"{v:.5f}", False),
        ("loss, final step", "loss_final", lambda v: f"{v:.5f}", False),
        ("loss, mean of last 5 steps", "loss_last5_mean", lambda v: f"{v:.5f}", False),
    ]
    for label, key, fmt, ratio in rows:
        shown = [fmt(sides[side][key]) for side in ours_sides]
        ratios = [f"{sides[side][key] / trl[key]:.2f}" if ratio and trl[key] else "" for side in ours_sides]
        table.add_row(label, *shown, fmt(trl[key]), *ratios)
    console = Console()
    console.print(table)
    checks = summary["checks"]
    console.print(f"checks: same tokens per step {checks['same_tokens_per_step']}, same LoRA init "
                  f"{checks['same_lora_init']}, |loss step 1 diff| {checks['loss_step1_abs_diff']:.2e}, "
                  f"|final loss diff| {checks['loss_final_abs_diff']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per side (default 30)")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the timing (default 1)")
    parser.add_argument("--packing", action="store_true", help="ours data.packing=true vs TRL packing=True")
    parser.add_argument("--repeats", type=int, default=1, help="run both sides this many times; medians reported")
    parser.add_argument("--chat-template", default="smollm2",
                        help="data.chat_template for both sides when the recipe sets none (default smollm2)")
    parser.add_argument("--trl-optim", default="adamw_torch", help="HF optim name for TRL (default adamw_torch = "
                        "ours' torch.optim.AdamW; HF's own default here is adamw_torch_fused)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: os.cpu_count(), what ours' job picks itself)")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over each side's timed steps; tables written next to the JSON "
                             "(profiling slows the steps: do not quote tokens/s from such a run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="train on the CPU (default) or on one GPU (ours: a one-GPU plan; TRL: use_cpu=False)")
    parser.add_argument("--with-kernels", action="store_true",
                        help="a third side: ours with `kernels: all` (fused RMSNorm, RoPE, SwiGLU, linear CE)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for both sides, e.g. --set data.max_length=512 (repeatable)")
    parser.add_argument("--tag", default=None, help="machine tag in the file name (default: hostname)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--verbose", action="store_true", help="show the children's output (default: to log files)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--child", choices=(*SIDES, KERNELS_SIDE), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        result = child_trl(spec) if args.child == "trl" else child_ours(spec, kernels=args.child == KERNELS_SIDE)
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.steps <= args.skip:
        parser.error(f"--steps ({args.steps}) must be larger than --skip ({args.skip})")

    from launcher.config.recipe import load_recipe  # planning side: no torch in this process

    workdir = Path(tempfile.mkdtemp(prefix="sft_vs_trl-"))
    base = load_recipe(args.recipe).recipe
    overrides = [*BENCH_OVERRIDES, f"optim.max_steps={args.steps}", f"data.packing={str(args.packing).lower()}",
                 f"output.root={workdir / 'runs'}", *args.set]
    if base.data.chat_template is None and base.data.loss_on == "assistant":
        overrides.append(f"data.chat_template={args.chat_template}")
    recipe = load_recipe(args.recipe, overrides).recipe
    # The children get a private FTLAUNCH_CACHE (fresh tokenization cache) whose models/ is the real converted-model
    # cache, filled here once, so neither side's figures contain a GGUF conversion.
    from launcher.common.cache import models_cache_dir
    from launcher.common.gguf import convert_gguf_to_hf, resolve_gguf

    if recipe.model.gguf:
        convert_gguf_to_hf(resolve_gguf(recipe.model.gguf))
    (workdir / "cache").mkdir()
    models = models_cache_dir()
    models.mkdir(parents=True, exist_ok=True)
    (workdir / "cache" / "models").symlink_to(models, target_is_directory=True)

    threads = args.threads or os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "FTLAUNCH_CACHE": str(workdir / "cache"),  # ours tokenizes from scratch, like TRL always does
           "HF_DATASETS_CACHE": str(workdir / "hf-datasets"), "PYTHONWARNINGS": "ignore"}
    spec = {"recipe_file": str(Path(args.recipe).resolve()), "overrides": overrides, "steps": args.steps,
            "skip": args.skip, "threads": threads, "force_threads": args.threads is not None,
            "trl_optim": args.trl_optim, "profile": args.profile, "workdir": str(workdir), "device": args.device}
    machine, started = machine_info(), dt.datetime.now(dt.timezone.utc)
    machine["gpu"] = _gpu_name() if args.device == "cuda" else None
    sides = (*SIDES, KERNELS_SIDE) if args.with_kernels else SIDES
    load_before = os.getloadavg()
    runs: list[dict[str, dict[str, Any]]] = []
    for repeat in range(args.repeats):
        run: dict[str, dict[str, Any]] = {}
        # Alternate which side goes first, so a slow drift of the machine's load does not favour one side.
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            print(f"[{repeat + 1}/{args.repeats}] {side}: {args.steps} steps ...", flush=True)
            run[side] = run_child(side, spec, workdir, env, quiet=not args.verbose)
            shutil.rmtree(workdir / "cache" / "tokenized", ignore_errors=True)  # the next run tokenizes again
            print(f"    {run[side]['tokens_per_s']:,.0f} tokens/s, training peak RSS "
                  f"{run[side]['train_peak_rss_mib']:,.0f} MiB, final loss {run[side]['loss_final']:.4f}", flush=True)
        runs.append(run)

    summary = summarise(runs)
    config = {"recipe": spec["recipe_file"], "overrides": overrides, "model": recipe.model.gguf or recipe.model.path,
              "dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation,
              "method": recipe.method.name, "lora_r": recipe.method.r, "lora_alpha": recipe.method.alpha,
              "lora_dropout": recipe.method.dropout, "lora_targets": recipe.method.target_modules,
              "lr": recipe.optim.lr, "schedule": recipe.optim.schedule, "warmup_steps": recipe.optim.warmup_steps,
              "micro_batch": recipe.optim.micro_batch, "grad_accum": recipe.optim.grad_accum,
              "max_grad_norm": recipe.optim.max_grad_norm, "seed": recipe.optim.seed, "steps": args.steps,
              "skip": args.skip, "timed_steps": args.steps - args.skip, "max_length": recipe.data.max_length,
              "packing": recipe.data.packing, "loss_on": recipe.data.loss_on,
              "chat_template": recipe.data.chat_template, "trl_optim": args.trl_optim, "threads": threads,
              "repeats": args.repeats, "profiled": args.profile, "device": args.device,
              "sides": list(sides)}
    report = {"benchmark": "sft_vs_trl", "date": started.isoformat(timespec="seconds"), "machine": machine,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "git": git_info(),
              "versions": versions(), "config": config, **summary,
              "runs": [{side: {k: v for k, v in run[side].items() if k != "profile"} for side in sides}
                       for run in runs]}
    print_table(summary, config, machine)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", args.tag or machine["host"] or "machine")
    stem = f"sft_vs_trl-{tag}-{started.strftime('%Y%m%d-%H%M%S')}{'-packing' if args.packing else ''}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if args.profile:
        for side in sides:
            table = runs[-1][side].get("profile")
            if table:
                profile_path = out / f"{stem}-profile-{side}.txt"
                profile_path.write_text(table)
                print(f"wrote {profile_path.relative_to(ROOT) if profile_path.is_relative_to(ROOT) else profile_path}")
    if args.keep:
        print(f"work directory kept: {workdir}")
    else:
        (workdir / "cache" / "models").unlink()  # the link only, never the shared model cache behind it
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
