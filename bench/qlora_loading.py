"""Host memory of loading a 4-bit base on 2 ranks: DDP (every rank loads and quantizes the whole model) against FSDP2
(rank 0 loads and quantizes; rank 1 builds on meta and receives its half of the packed codes), on this CPU.

    python bench/qlora_loading.py [--layers 12] [--out bench/results]

One invocation: writes a random Llama (hidden 1024, MLP 4096, vocab 32000, fp32 safetensors), plans a QLoRA recipe
(nf4, double quantization, 1 optimizer step, micro batch 1 x 64 tokens, so training adds next to nothing) for each
strategy with `launch plan --out`, runs it on 2 gloo ranks through `bench/peak_rss_job.py` (the real
`launcher.train.job`, recording each rank's peak RSS at exit). The baseline is DDP in the same run: its rank 1 loads
what FSDP's rank 1 does not. (A process that only imports the rank's modules was tried as a baseline and peaked above
FSDP's rank 1, so it measured the imports' own transients, not a floor.) Peak RSS counts the safetensors pages a rank touched through its
memory map: those are page cache shared between the ranks of a node, so the figure is an upper bound of what each
rank adds. Results, with machine, date and commit: bench/results/qlora_loading-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def write_model(out: Path, layers: int) -> tuple[Path, int]:
    """A random Llama (seed 0) with the tests' tiny tokenizer; (directory, parameter count)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tiny_tokenizer

    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def recipe(work: Path, model: Path, strategy: str) -> Path:
    import yaml

    rows = [{"messages": [{"role": "user", "content": "reverse cat"}, {"role": "assistant", "content": "tac"}]}] * 16
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = work / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"load-{strategy}",
        "model": {"path": str(model), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(data)}, "max_length": 64},
        "method": {"name": "qlora", "bits": 4, "quant_type": "nf4", "double_quant": True,
                   "compute_dtype": "float32", "r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"name": "adamw", "micro_batch": 1, "max_steps": 1, "seed": 0},
        "strategy": {"name": strategy},
        "checkpoint": {"every_steps": 1000},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(work / "runs")},
    }))
    return path


def run_ranks(work: Path, recipe_path: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    run_dir = work / "runs" / recipe_path.stem
    subprocess.run([sys.executable, "-m", "launcher", "plan", str(recipe_path), "--procs", "2", "--gpus-per-node",
                    "0", "--out", str(run_dir)], check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(ROOT / "bench" / "peak_rss_job.py"), str(run_dir)], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    return [json.loads((run_dir / f"peak_rss.rank{r}.json").read_text()) for r in (0, 1)]


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qlora-loading-"))
    model, params = write_model(work / "model", args.layers)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FTLAUNCH_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    checkpoint_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    result: dict[str, Any] = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
        "model": {"params": params, "layers": args.layers, "checkpoint_mib": round(checkpoint_bytes / MiB, 1),
                  "packed_4bit_mib": round(params / 2 / MiB, 1)},
        "ranks": {},
    }
    for strategy in ("ddp", "fsdp"):
        ranks = run_ranks(work, recipe(work, model, strategy), env)
        result["ranks"][strategy] = [
            {"rank": r["rank"], "peak_rss_mib": round(r["peak_rss"] / MiB, 1), "exit": r["exit"]} for r in ranks]
    ddp, fsdp = (result["ranks"][s] for s in ("ddp", "fsdp"))
    result["node_peak_rss_sum_mib"] = {s: round(sum(r["peak_rss_mib"] for r in result["ranks"][s]), 1)
                                       for s in ("ddp", "fsdp")}
    result["rank1_peak_rss_fsdp_over_ddp"] = round(fsdp[1]["peak_rss_mib"] / ddp[1]["peak_rss_mib"], 3)
    result["rank1_peak_rss_fsdp_minus_ddp_mib"] = round(fsdp[1]["peak_rss_mib"] - ddp[1]["peak_rss_mib"], 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"qlora_loading-{platform.node()}-{dt.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
