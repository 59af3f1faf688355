"""Tokenize first, on CPU: `python -m launcher.train.prepare RUN_DIR`.

Why a step of its own: tokenizing inside the training job keeps every GPU of the allocation idle while rank 0 works,
and on a big dataset the other ranks' NCCL collectives time out waiting for it. So on Slurm, when the tokenized data
is not cached yet, `launch` first submits a one-task CPU job running this module and makes the training job depend on
it (`--dependency=afterok:ID`); the training ranks then read the cache. Locally the job does the same step on rank 0
before any rank trains (launcher/train/job.py, `_prepare_data`), with the other ranks waiting at a barrier.

What is prepared, and where (both on storage every node sees, like the run directory):
  - a GGUF model converted once to a Hugging Face directory (launcher/common/gguf.py, `$FTLAUNCH_CACHE/models`);
  - the tokenized, label-masked, packed examples under `$FTLAUNCH_CACHE/tokenized/<key>/` (Arrow), key =
    launcher.train.data.cache_key: data files (path, size, mtime), tokenizer, chat template, max length, packing, ...

Reads only the run directory and the environment (ARCHITECTURE.md). Exit codes: 0 prepared, 2 bad input.
"""

from __future__ import annotations

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
    from launcher.common.gguf import is_complete
    from launcher.common.model_files import gguf_converted, load_tokenizer, tokenizer_source

    converted = gguf_converted(recipe.model)
    if converted is not None and not is_complete(converted):
        return f"the GGUF model is not converted yet ({converted})"
    key = cache_key_from_files(recipe.data, tokenizer_source(recipe.model))
    cache = tokenized_cache_dir()
    path = cache / key if key is not None else cache_entry(recipe.data, load_tokenizer(recipe.model), cache)
    return None if is_cached(path) else f"the data is not tokenized yet ({path})"


def prepare(run_dir: Path) -> int:
    """Convert the model if needed and tokenize the data into the cache; the training ranks then only read."""
    from launcher.train.data import DataError, tokenize_cached
    from launcher.plan.files import load_plan
    from launcher.common.model_files import load_tokenizer

    plan = load_plan(run_dir)
    setup_logging(run_dir, 0, name="prepare")
    recipe = plan.typed_recipe()
    started = time.perf_counter()
    try:
        tokenizer = load_tokenizer(recipe.model)  # converts a GGUF model once (cached) on the way
        data = tokenize_cached(recipe.data, tokenizer, tokenized_cache_dir())
    except (DataError, FileNotFoundError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    log.info("prepared in %.1f s: %s", time.perf_counter() - started,
             "  ".join(f"{key}={value}" for key, value in data.stats.items()))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m launcher.train.prepare RUN_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    return prepare(Path(args[0]).resolve())


if __name__ == "__main__":
    raise SystemExit(main())
