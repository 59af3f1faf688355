"""ftlaunch's cache on disk: `$FTLAUNCH_CACHE`, else ~/.cache/ftlaunch. On a cluster, point it at shared storage so
that a model converted or a dataset tokenized once serves every node and every later run.

    models/      GGUF checkpoints converted to Hugging Face directories (launcher/common/gguf.py)
    tokenized/   tokenized datasets, keyed by data config and tokenizer (launcher/train/data.py)
"""

from __future__ import annotations

import os
from pathlib import Path


def ftlaunch_cache() -> Path:
    env = os.environ.get("FTLAUNCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ftlaunch"


def models_cache_dir() -> Path:
    """Converted models: `<cache>/models`."""
    return ftlaunch_cache() / "models"


def tokenized_cache_dir() -> Path:
    """Tokenized datasets: `<cache>/tokenized`."""
    return ftlaunch_cache() / "tokenized"
