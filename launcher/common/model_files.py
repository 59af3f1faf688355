"""Where a recipe's model loads from (its directory, or the cached conversion of its GGUF file) and its tokenizer.
No torch: the submitting process computes the tokenization cache key (launcher/train/prepare.py) and the planner
finds config.json (launcher/plan/memory.py) without paying for it."""

from __future__ import annotations

import hashlib
from importlib import metadata
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


#: Files of a model directory that cannot change its tokenizer: weights and their kin, skipped by the fingerprint
#: (hashing an 8B model's weights at every submission would cost more than loading the tokenizer).
_NOT_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".npz")


def tokenizer_source(cfg: ModelConfig) -> Path:
    """The directory the tokenizer loads from: `model.tokenizer`, else the model's directory."""
    return Path(cfg.tokenizer) if cfg.tokenizer else model_dir(cfg)


def tokenizer_files_fingerprint(directory: Path) -> str | None:
    """Hash of every file in a tokenizer directory that can change token ids (tokenizer.json, tokenizer_config.json
    with its chat template, special tokens, vocab/merges, sentencepiece models, config.json that picks the class),
    plus the transformers and tokenizers versions; None where the files do not decide alone (no tokenizer files,
    or Python files: remote code). The standard library only: `launch` computes the tokenization cache key with it at
    submission without importing transformers, which imports torch (8 s of a 10 s submission on 2 cores).

    Stricter than hashing the loaded tokenizer: any byte or version change gives a new key, so stale data is never
    called ready; an unchanged copy of the directory elsewhere gives the same key."""
    if not directory.is_dir() or not any((directory / name).is_file()
                                         for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.endswith(_NOT_TOKENIZER_SUFFIXES))
    if any(p.suffix == ".py" for p in files):
        return None
    digest = hashlib.sha256()
    for package in ("transformers", "tokenizers"):
        try:
            digest.update(f"{package}={metadata.version(package)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package}=none\0".encode())
    for path in files:
        digest.update(path.name.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    source = tokenizer_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions carry no labels and are masked out of attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
