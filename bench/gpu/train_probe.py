"""Train configurations through the launcher's own pieces and measure each step: losses, tokens/s, MFU, peak memory
against the memory planner's prediction for the same recipe.

    python bench/gpu/train_probe.py SPEC.json RESULTS.jsonl

SPEC.json: {"device": "cuda"|"cpu", "workdir": DIR, "configs": [CONFIG, ...]}, each CONFIG a dict with `name`,
`recipe` (a recipe as a dict: model, data, method, optim, strategy, kernels) and `steps`. One JSON line per config
is appended to RESULTS.jsonl, also when it fails (with the error).

Every config runs in this one process, one after the other, on a one-rank process group (nccl on CUDA, gloo on
CPU), exactly as `python -m launcher.train.job` builds a rank: plan (`make_plan`, which also sizes memory), strategy
(`get_strategy`), data (`launcher.train.job._prepare_data`: tokenization cache), model (`build_model` inside the strategy's
`model_init`), `Trainer` (wrap + optimizer + schedule). Only the loop differs: `Trainer.train_step` is called
`steps` times with a CUDA synchronise around each, and no checkpoint, evaluation or output is written (those paths
are what the resume check covers, through the real `launcher.train.job`).

Measured:
  * step losses (the trainer's own step loss, all label tokens of the step);
  * tokens/s over the timed steps (all but the first `skip`, which carry compilation and allocator warm-up);
  * MFU = tokens/s x model FLOPs per token (launcher/plan/flops.py, from the model's config.json) / the GPU's data-sheet
    bf16 peak;
  * peak memory: `torch.cuda.max_memory_allocated` (tensors), `max_memory_reserved` (the caching allocator's
    segments), and the device memory in use outside PyTorch's allocator (CUDA context, cuBLAS/NCCL workspaces:
    `mem_get_info` used minus `memory_reserved`), against the planner's row for the strategy: its `total` is meant
    to cover reserved + context, and total minus `framework` the tensors.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from common import append, free_port, plan_run


def _predicted(plan: Any) -> dict[str, Any] | None:
    """The planner's bytes for the strategy this config runs (its row without offload)."""
    if not plan.memory:
        return None
    for row in plan.memory["strategies"]:
        if row["name"] == plan.strategy and not row["offload_optimizer"] and not row["offload_params"]:
            return row["bytes"]
    return None


def run_config(config: dict[str, Any], device_name: str, workdir: Path) -> dict[str, Any]:
    import torch

    from launcher.plan.flops import peak_bf16_flops, training_flops_per_token
    from launcher.train.job import _prepare_data
    from launcher.plan.memory_model import read_model_config
    from launcher.train.model import build_model, count_parameters, unwrap
    from launcher.strategies import get_strategy
    from launcher.train.trainer import Trainer

    cuda = device_name == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    gpu_mem = torch.cuda.get_device_properties(0).total_memory if cuda else None
    plan = plan_run(config["recipe"], config["name"], workdir, device_name, gpu_mem)
    recipe = plan.typed_recipe()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    strategy = get_strategy(plan.strategy, 1, 0, device, plan.strategy_config)
    tokenizer, data = _prepare_data(recipe, strategy)
    torch.manual_seed(recipe.optim.seed)
    started = time.perf_counter()
    with strategy.model_init():
        model = build_model(recipe, strategy.load_device(), meta=strategy.meta_init,
                            dtype=strategy.weights_dtype(recipe.model.dtype),
                            share_quantized=strategy.share_quantized_layout)
    trainer = Trainer(Path(plan.run_dir), recipe, strategy, model, tokenizer, data, device)
    setup_s = time.perf_counter() - started
    trainable, total = count_parameters(unwrap(trainer.model))
    stream = trainer._batch_stream()
    losses, tokens, times, grad_norms = [], [], [], []
    for _ in range(int(config["steps"])):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        row = trainer.train_step(stream)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(row["loss"])
        tokens.append(int(row["tokens"]))
        grad_norms.append(row["grad_norm"])
    skip = min(int(config.get("skip", 2)), len(times) - 1)
    window = sum(times[skip:])
    tokens_per_s = sum(tokens[skip:]) / window if window > 0 else float("nan")
    method = recipe.method
    model_config = read_model_config(recipe.model.path)
    flops = training_flops_per_token(model_config, seq_len=recipe.data.max_length, method=method.name,
                                     lora_rank=getattr(method, "r", 16),
                                     lora_targets=getattr(method, "target_modules", "all-linear"))
    result: dict[str, Any] = {
        "strategy": plan.strategy, "method": method.name, "optim": recipe.optim.name, "dtype": recipe.model.dtype,
        "kernels": recipe.kernels, "gradient_checkpointing": recipe.model.gradient_checkpointing,
        "micro_batch": recipe.optim.micro_batch, "max_length": recipe.data.max_length, "steps": len(times),
        "timed_steps": len(times) - skip, "params_total": total, "params_trainable": trainable,
        "setup_s": round(setup_s, 2), "losses": losses, "grad_norms": grad_norms, "tokens_per_step": tokens,
        "step_s": [round(t, 4) for t in times], "median_step_s": statistics.median(times[skip:]),
        "tokens_per_s": tokens_per_s, "flops_per_token": flops.total,
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
    }
    peak = peak_bf16_flops(torch.cuda.get_device_name(0)) if cuda else None
    result["mfu"] = tokens_per_s * flops.total / peak if peak else None
    predicted = _predicted(plan)
    if cuda:
        free, total_mem = torch.cuda.mem_get_info()
        outside = (total_mem - free) - torch.cuda.memory_reserved()
        measured = {"allocated_peak": torch.cuda.max_memory_allocated(),
                    "reserved_peak": torch.cuda.max_memory_reserved(), "outside_allocator": outside}
        measured["device_peak"] = measured["reserved_peak"] + outside
        result["memory"] = measured
        if predicted:
            tensors = predicted["total"] - predicted["framework"]
            result["predicted"] = predicted
            result["planner_error"] = {
                "total_vs_device_peak": predicted["total"] / measured["device_peak"] - 1,
                "tensors_vs_allocated_peak": tensors / measured["allocated_peak"] - 1,
            }
    elif predicted:
        result["predicted"] = predicted
    del trainer, model, stream
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    results = Path(argv[1])
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "FTLAUNCH_CACHE": os.environ.get("FTLAUNCH_CACHE", str(workdir / "cache"))})
    import torch
    import torch.distributed as dist

    from launcher.common.logs import setup_logging

    device = spec["device"]
    if device == "cuda":
        torch.cuda.set_device(0)
    # One process group for every config: NCCL on the GPU is exercised even with one rank (an all-reduce per step).
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0) if device == "cuda" else None)
    setup_logging(workdir, 0, name="train_probe")
    failures = 0
    for config in spec["configs"]:
        row: dict[str, Any] = {"kind": spec.get("kind", "train"), "name": config["name"], "device": device}
        started = time.perf_counter()
        try:
            row.update(run_config(config, device, workdir))
            row["status"] = "ok" if row["finite"] else "failed: non-finite loss"
        except Exception as err:  # noqa: BLE001 - one failing configuration must not stop the others
            failures += 1
            row["status"] = f"failed: {type(err).__name__}: {err}"[:500]
            row["traceback"] = traceback.format_exc()[-3000:]
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        row["seconds"] = round(time.perf_counter() - started, 1)
        append(results, row)
        print(json.dumps({k: row.get(k) for k in ("name", "status", "seconds", "tokens_per_s", "mfu")}), flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
