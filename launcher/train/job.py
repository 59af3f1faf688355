"""What runs on every rank: `python -m launcher.train.job RUN_DIR`.

Reads only the run directory and the environment (ARCHITECTURE.md), so a job can be resumed, requeued or re-submitted
from its run directory alone. Exit codes: 0 finished, 2 bad input (message printed), 3 stopped by a signal after
writing a checkpoint (resumable; Slurm requeues on it), 4 diverged (non-finite losses: `optim.max_nonfinite_steps`;
the last good checkpoint is intact, nothing is requeued), 5 the run directory could not be written (disk full: the
last complete checkpoint is intact, the partial one removed; resumable once there is room). Rank 0 records which in
RUN_DIR/outcome.json.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

from launcher.common.exits import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK,  # noqa: F401
                                   EXIT_WRITE_FAILED)
from launcher.common.logs import FILE_ONLY, setup_logging

if TYPE_CHECKING:
    from cluster.env import DistEnv
    from launcher.config.schema import Recipe
    from launcher.plan.build import Plan
    from launcher.strategies.base import Strategy
    from launcher.train.data import DataBundle
    from launcher.train.trainer import Trainer
    from launcher.train.tracking import Trackers

log = logging.getLogger("ftlaunch")


def cpu_threads(local_world_size: int, environ: Mapping[str, str] = os.environ) -> int:
    """Intra-op threads of one CPU rank. An explicit OMP_NUM_THREADS wins (the user, the cluster profile or torchrun
    set it for a reason); else Slurm's SLURM_CPUS_PER_TASK; else the CPUs this process may run on (affinity, not
    os.cpu_count(): a cgroup or taskset may allow fewer) shared by the node's ranks. Oversubscribed threads make every
    rank slower: two 2-thread ranks on 2 cores spin in OpenMP barriers and ran 40 tiny steps in 26 s instead of 1.6 s."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))


def run_job(run_dir: Path) -> int:
    """Train as the plan says; rank 0 records how it ended (launcher/common/outcome.py)."""
    from cluster.env import detect_dist_env
    from launcher.common import outcome
    from launcher.plan.files import load_plan

    plan = load_plan(run_dir)
    env = detect_dist_env()
    setup_logging(run_dir, env.rank)
    if env.rank == 0:
        outcome.record(run_dir, outcome.Outcome.RUNNING)
    from launcher.train.tracking import Trackers, start_tracking

    tracker = Trackers()  # W&B / MLflow run on rank 0 only; the other ranks keep this empty, silent one
    try:
        if env.rank == 0:  # before the ranks meet: the others wait in the rendezvous while it starts (seconds)
            tracker = start_tracking(run_dir, plan)
        code = _train(run_dir, plan, env, tracker)
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"[:1000]
        # Every rank's own log says where it crashed (a rank > 0 records no outcome), with the traceback, which
        # otherwise reaches only the terminal or the scheduler's output; `launch status` shows the first line.
        log.error("crashed: %s (%s)", reason, _where(err), exc_info=err, extra={FILE_ONLY: True})
        if env.rank == 0:
            outcome.record(run_dir, outcome.Outcome.CRASHED, reason=reason)
        tracker.finish(None)
        raise
    tracker.finish(code)
    if env.rank == 0:
        ended = outcome.outcome_of_exit(code)
        reason = {EXIT_BAD_INPUT: f"bad input: see {run_dir / 'logs'}",
                  EXIT_WRITE_FAILED: f"the run directory could not be written (disk full?): see {run_dir / 'logs'}"
                  }.get(code)
        outcome.record(run_dir, ended, exit_code=code, reason=reason, best=_best_record(run_dir, plan))
        if ended == outcome.Outcome.COMPLETED:
            _report_sweep_if_last(run_dir)
    return code


def _where(err: BaseException) -> str:
    """The innermost frame of an exception: `at FILE:LINE in FUNCTION`."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "no traceback"
    frame = frames[-1]
    return f"at {frame.filename}:{frame.lineno} in {frame.name}"


def _best_record(run_dir: Path, plan: "Plan") -> dict[str, Any] | None:
    """best.json's record when the recipe keeps the best checkpoint (checkpoint.keep_best) and there is one."""
    if plan.recipe.get("checkpoint", {}).get("keep_best") is None:
        return None
    from launcher.train.checkpoint import read_best

    return read_best(run_dir)


def _report_sweep_if_last(run_dir: Path) -> None:
    """A sweep's trial (RUN_DIR = SWEEP_DIR/trials/<trial>) that completes the last unfinished trial writes the
    sweep's report (launcher/common/sweep_report.py): on Slurm, no process waits for the array to end. Two trials
    ending together both write it; each write is atomic and reads the same files."""
    sweep_dir = run_dir.parent.parent
    if run_dir.parent.name != "trials" or not (sweep_dir / "sweep.json").is_file():
        return
    from launcher.common.sweep_report import write_report, all_trials_completed

    try:
        if all_trials_completed(sweep_dir):
            write_report(sweep_dir)
            log.info("sweep report: %s", sweep_dir / "report.md")
    except Exception as err:  # noqa: BLE001 (the trial itself completed; `launch report` can write it again)
        log.warning("sweep report not written (%s): run `launch report %s`", err, sweep_dir)


def _train(run_dir: Path, plan: "Plan", env: "DistEnv", tracker: "Trackers") -> int:
    if env.world_size != plan.world_size:
        log.warning("plan.json says world size %d, this job has %d ranks: continuing with %d (the global batch changes)",
                    plan.world_size, env.world_size, env.world_size)
    with _dist_environment(env):  # torch.distributed's env:// and DeepSpeed read these
        return _train_in(run_dir, plan, env, tracker)


@contextlib.contextmanager
def _dist_environment(env: "DistEnv") -> Iterator[None]:
    """RANK, WORLD_SIZE, MASTER_* for this job, and the environment as it was afterwards: a job run in-process (the
    tests, a notebook) must not leave them behind, or a Slurm job submitted later from that process exports them and
    every task takes itself for rank 0 of 1 (cluster/slurm.py INHERITED_DIST_VARS)."""
    values = {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
              "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank)}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _train_in(run_dir: Path, plan: "Plan", env: "DistEnv", tracker: "Trackers") -> int:
    import torch
    import torch.distributed as dist

    from launcher.train.checkpoint import WriteError
    from launcher.train.data import DataError
    from launcher.train.trainer import NonFiniteError, Trainer

    if plan.device == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads(env.local_world_size))
    failed = False
    if env.world_size > 1:
        dist.init_process_group(backend=plan.backend, rank=env.rank, world_size=env.world_size)
    try:
        recipe = plan.typed_recipe()
        from launcher.strategies import get_strategy

        strategy = get_strategy(plan.strategy, env.world_size, env.rank, device, plan.strategy_config)
        try:
            tokenizer, data = _prepare_data(recipe, strategy)
        except (DataError, FileNotFoundError) as err:
            log.error("%s", err)
            return EXIT_BAD_INPUT
        from launcher.train.model import build_model
        from launcher.train.tasks import head_config, write_labels

        if strategy.is_main:
            write_labels(run_dir, data.labels)  # `launch export` rebuilds the same classification head from it
        torch.manual_seed(recipe.optim.seed)  # adapter init is identical on every rank and every run
        with strategy.model_init():  # ZeRO-3 partitions while loading; FSDP ranks > 0 build on meta
            model = build_model(recipe, strategy.load_device(), meta=strategy.meta_init,
                                dtype=strategy.weights_dtype(recipe.model.dtype),
                                share_quantized=strategy.share_quantized_layout,
                                head=head_config(recipe.task, data.labels, tokenizer.pad_token_id))
        try:  # every rank reaches this with the same data: a refusal here leaves no rank waiting in a barrier
            trainer = Trainer(run_dir, recipe, strategy, model, tokenizer, data, device, tracker=tracker)
        except DataError as err:
            if strategy.is_main:
                log.error("%s", err)
            return EXIT_BAD_INPUT
        try:
            result = trainer.run()
        except NonFiniteError as err:
            if strategy.is_main:
                log.error("training diverged: %s", err)
            return EXIT_DIVERGED
        except WriteError as err:
            if strategy.is_main:
                log.error("%s", err)
            return EXIT_WRITE_FAILED
        if not result.stopped_by.finished:
            if strategy.is_main:
                log.warning("stopped by %s at step %d; checkpoint written. Resume: launch %s --resume %s",
                            result.signal, result.state.step, plan.recipe_file, run_dir)
            return EXIT_INTERRUPTED
        if strategy.is_main:
            _finish(trainer, run_dir, recipe, from_checkpoint=strategy.spec.exports_from_checkpoint, tracker=tracker)
        return EXIT_OK
    except BaseException:
        failed = True
        raise
    finally:
        # Free the wrapped model while the process group is still registered: otherwise DDP's reducer drops the last
        # reference to the gloo group from its destructor at exit, holding the GIL while joining a gloo thread that
        # waits for the GIL (a deadlock seen with 2 CPU ranks).
        trainer = model = None  # noqa: F841
        gc.collect()
        if dist.is_initialized():
            if not failed:
                dist.barrier()  # no rank tears its group down while another still uses it
            dist.destroy_process_group()


def _prepare_data(recipe: "Recipe", strategy: "Strategy") -> "tuple[Any, DataBundle]":
    """Rank 0 tokenizes (and fills the cache) first; the other ranks then read the cache. On Slurm a CPU job has
    usually filled it already (launcher/train/prepare.py)."""
    from launcher.train.data import cache_entry, is_cached, tokenize_into
    from launcher.train.tasks import entry_writer, task_fingerprint
    from launcher.common.cache import tokenized_cache_dir
    from launcher.common.model_files import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    if not strategy.is_main:
        strategy.barrier()
    entry = cache_entry(recipe.data, tokenizer, tokenized_cache_dir(), task_fingerprint(recipe.task))
    cached = is_cached(entry)
    data = tokenize_into(entry, recipe.data, tokenizer, entry_writer(recipe.task))
    if strategy.is_main:
        log.info("data (%s %s): %s", "read from the tokenization cache" if cached else "tokenized into the cache",
                 entry.stem, "  ".join(f"{name}={value}" for name, value in data.stats.items()))
        strategy.barrier()
    return tokenizer, data


def _finish(trainer: "Trainer", run_dir: Path, recipe: "Recipe", from_checkpoint: bool, tracker: "Trackers") -> None:
    from launcher.train.checkpoint import checkpoints_dir, read_best
    from launcher.train.export import write_outputs_from_checkpoint
    from launcher.train.model import unwrap
    from launcher.train.outputs import plot_losses, save_outputs

    merge = recipe.output.merge
    best = read_best(run_dir) if recipe.checkpoint.keep_best is not None else None
    if best is not None and recipe.checkpoint.final_from_best and best["step"] != trainer.state.step:
        # The best step's weights, rebuilt from its checkpoint like `launch export` does (any strategy).
        written = write_outputs_from_checkpoint(run_dir, merge, run_dir, checkpoint=checkpoints_dir(run_dir) /
                                                best["checkpoint"])
    elif from_checkpoint:  # sharded weights: consolidate the final checkpoint on this process, tensor by tensor
        written = write_outputs_from_checkpoint(run_dir, merge, run_dir)
    else:
        written = save_outputs(unwrap(trainer.model), trainer.tokenizer, run_dir, merge)
    from launcher.common.version import version
    from launcher.train.model_card import finish_outputs

    finish_outputs(written, recipe, trainer.state.final_results(), version())  # portable base name, model cards
    for path in written:
        tracker.log_artifact(path)  # a no-op unless the recipe's tracker asks for artifacts
    plot = plot_losses(run_dir)
    history = trainer.state.history
    if history:
        first, last = history[0], history[-1]
        for key in sorted(k for k in last if k.startswith("eval_")):
            if key in first:
                log.info("%s: %.4f -> %.4f (step %d -> %d)", key, first[key], last[key], first["step"], last["step"])
    log.info("outputs: %s%s", ", ".join(str(p) for p in written), f", {plot}" if plot else "")
    if history:
        _beside_baseline(run_dir, history[-1])
    if best is not None:
        source = "the final outputs are its weights" if recipe.checkpoint.final_from_best else \
            "the final outputs are the last step's (checkpoint.final_from_best: true writes them from it)"
        log.info("best %s %.4g at step %d (checkpoints/%s; %s)", best["metric"], best["value"], best["step"],
                 best["checkpoint"], source)


def _beside_baseline(run_dir: Path, final: dict[str, Any]) -> None:
    """The final eval metrics next to the baselines' (RUN_DIR/baseline.json, from `launch baseline`), or how to get
    them: a fine-tuned model is worth its cost only where it beats them."""
    from launcher.common.rundir import read_baseline
    from launcher.train.baseline import beside_baseline

    baseline = read_baseline(run_dir)
    if baseline is None:
        log.info("no baseline to compare with: `launch baseline RECIPE --out %s` scores TF-IDF / majority / copy "
                 "baselines on the same eval split", run_dir)
        return
    values = {k: v for k, v in final.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    for line in beside_baseline(baseline, values):
        log.info("vs baseline: %s", line)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m launcher.train.job RUN_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_job(Path(args[0]).resolve())


if __name__ == "__main__":
    raise SystemExit(main())
