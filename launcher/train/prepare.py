"""Tokenize first, on CPU: `python -m launcher.train.prepare RUN_DIR`.

Why a step of its own: tokenizing inside the training job keeps every GPU of the allocation idle while rank 0 works,
and on a big dataset the other ranks' NCCL collectives time out waiting for it. So on Slurm, when the tokenized data
is not cached yet, `launch` first submits a CPU job running this module (one task, or `cluster.prepare_tasks` tasks
that split the shards) and makes the training job depend on it (`--dependency=afterok:ID`); the training ranks then
read the cache. Locally the job does the same step on rank 0 before any rank trains (launcher/train/job.py,
`_prepare_data`), with the other ranks waiting at a barrier.

What is prepared, and where (both on storage every node sees, like the run directory):
  - a GGUF model converted once to a Hugging Face directory (launcher/common/gguf.py, `$FTLAUNCH_CACHE/models`);
  - the tokenized, label-masked, packed examples under `$FTLAUNCH_CACHE/tokenized/<key>/` (Arrow), key =
    launcher.train.data.cache_key: data files (path, size, mtime), tokenizer, chat template, max length, packing, ...

Reads only the run directory and the environment (ARCHITECTURE.md). Exit codes: 0 prepared, 2 bad input.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from launcher.common.cache import tokenized_cache_dir
from launcher.common.exits import EXIT_BAD_INPUT, EXIT_OK
from launcher.common.logs import setup_logging

log = logging.getLogger("ftlaunch")


def missing_preparation(recipe: Any) -> str | None:
    """Why a CPU preparation job is needed before training, or None when the model and the data are ready.

    The cache key depends on the tokenizer: hashed from its files where they decide alone (no transformers, no
    torch), else from the loaded tokenizer (transformers, in the submitting process, never in `launch plan`). A key
    from file names alone could call stale data ready."""
    from launcher.train.data import cache_entry, cache_key_from_files, is_cached
    from launcher.train.tasks import task_fingerprint
    from launcher.common.gguf import is_complete
    from launcher.common.model_files import gguf_converted, load_tokenizer, tokenizer_source

    converted = gguf_converted(recipe.model)
    if converted is not None and not is_complete(converted):
        return f"the GGUF model is not converted yet ({converted})"
    task = task_fingerprint(recipe.task)
    key = cache_key_from_files(recipe.data, tokenizer_source(recipe.model), task)
    cache = tokenized_cache_dir()
    path = cache / key if key is not None else cache_entry(recipe.data, load_tokenizer(recipe.model), cache, task)
    return None if is_cached(path) else f"the data is not tokenized yet ({path})"


def prepare(run_dir: Path, part: tuple[int, int] = (0, 1), attempt: str = "") -> int:
    """Convert the model if needed and tokenize the data into the cache; the training ranks then only read.

    `part` = (task, tasks) in a multi-task job (`cluster.prepare_tasks`): each task writes its shards, the first
    publishes the entry (see :func:`_prepare_part`); `attempt` names the job attempt the tasks share."""
    from launcher.train.data import DataError, tokenize_cached
    from launcher.train.tasks import entry_writer, is_causal, task_fingerprint
    from launcher.plan.files import load_plan
    from launcher.common.model_files import load_tokenizer

    task, tasks = part
    plan = load_plan(run_dir)
    setup_logging(run_dir, task, name="prepare" if task == 0 else f"prepare-{task}")
    recipe = plan.typed_recipe()
    started = time.perf_counter()
    try:
        tokenizer = load_tokenizer(recipe.model)  # converts a GGUF model once (cached) on the way
        if tasks == 1 or not is_causal(recipe.task):
            # A task other than causal_lm is tokenized by one process (launcher/train/tasks.py): the first task of
            # a multi-task job does it whole, the others have nothing to do.
            stats: dict[str, Any] | None = None
            if task == 0:
                stats = tokenize_cached(recipe.data, tokenizer, tokenized_cache_dir(), task_fingerprint(recipe.task),
                                        entry_writer(recipe.task)).stats
        else:
            stats = _prepare_part(recipe.data, tokenizer, tokenized_cache_dir(), part, attempt)
    except (DataError, FileNotFoundError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    if stats is None:
        log.info("task %d of %d: its shards written in %.1f s", task, tasks, time.perf_counter() - started)
    else:
        log.info("prepared in %.1f s: %s", time.perf_counter() - started,
                 "  ".join(f"{key}={value}" for key, value in stats.items()))
    return EXIT_OK


#: How often the first task of a multi-task job looks for the other tasks' parts, and logs which are missing.
PART_POLL_S, PART_REPORT_S = 0.5, 60.0


def _prepare_part(cfg: Any, tokenizer: Any, cache_dir: Path, part: tuple[int, int],
                  attempt: str) -> dict[str, Any] | None:
    """One task of N: write shards i, i+N, ... into a work directory all tasks share (named by the cache key and
    the job attempt, so a requeued job never mixes with its first try), then `part-<i>.json` with the counts. The
    first task waits for every part, sums the counts, packs when asked and publishes the entry as one rename, as a
    single task does; the others return None. A task that fails ends the job's other tasks (srun
    --kill-on-bad-exit), so the first never waits for a part that will not come; the unpublished work directory is
    cleared as a stale temporary later (launcher/train/arrow_cache.py)."""
    from launcher.common.rundir import write_json_atomic
    from launcher.train import arrow_cache
    from launcher.train.data import cache_entry, finish_entry, local_sources, tokenize_shards

    task, tasks = part
    entry = cache_entry(cfg, tokenizer, cache_dir)
    if arrow_cache.is_complete(entry):
        log.info("already in the tokenization cache: %s", entry.name)
        return dict(arrow_cache.read_meta(entry)["stats"]) if task == 0 else None
    work = arrow_cache.task_work_dir(cache_dir, entry.name, attempt)
    counts = tokenize_shards(local_sources(cfg), tokenizer, work, part)
    write_json_atomic(work / f"part-{task}.json", counts)
    if task != 0:
        return None
    parts = [work / f"part-{i}.json" for i in range(tasks)]
    waited, reported = time.monotonic(), time.monotonic()
    while missing := [p.name for p in parts if not p.is_file()]:
        if time.monotonic() - reported >= PART_REPORT_S:
            reported = time.monotonic()
            log.info("waiting %.0f s for the other tasks: %s", reported - waited, ", ".join(missing))
        time.sleep(PART_POLL_S)
    total: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    for path in parts:
        for kind, kind_counts in json.loads(path.read_text()).items():
            for key, value in kind_counts.items():
                total[kind][key] = total[kind].get(key, 0) + value
        path.unlink()
    meta = finish_entry(cfg, work, total)
    arrow_cache.publish(work, entry, meta)
    return dict(meta["stats"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m launcher.train.prepare")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--task", type=int, default=0, help="this task's index in a multi-task job")
    parser.add_argument("--tasks", type=int, default=1, help="tasks of the job (cluster.prepare_tasks)")
    parser.add_argument("--attempt", default="", help="the job attempt the tasks share (Slurm job id)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= args.task < args.tasks:
        parser.error(f"--task {args.task} not in 0..{args.tasks - 1}")
    return prepare(args.run_dir.resolve(), (args.task, args.tasks), args.attempt)


if __name__ == "__main__":
    raise SystemExit(main())
