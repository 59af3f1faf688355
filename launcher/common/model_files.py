"""Where a recipe's model loads from (its directory, or the cached conversion of its GGUF file) and its tokenizer.
No torch: the submitting process computes the tokenization cache key (launcher/train/prepare.py) and the planner
finds config.json (launcher/plan/memory.py) without paying for it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config.schema import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def model_dir(cfg: ModelConfig) -> Path:
    """The HF directory to load: the configured path, or the cached conversion of the GGUF file."""
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {path} has no config.json (expected a Hugging Face model directory)")
        return path
    from launcher.common.gguf import convert_gguf_to_hf, resolve_gguf

    assert cfg.gguf is not None  # the schema guarantees one source
    return convert_gguf_to_hf(resolve_gguf(cfg.gguf))


def gguf_converted(cfg: ModelConfig) -> Path | None:
    """Where the GGUF model's conversion is or will be; None for a Hugging Face directory."""
    if cfg.gguf is None:
        return None
    from launcher.common.gguf import converted_dir, resolve_gguf

    return converted_dir(resolve_gguf(cfg.gguf))


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    source = Path(cfg.tokenizer) if cfg.tokenizer else model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions carry no labels and are masked out of attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
