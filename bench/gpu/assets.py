"""What the GPU checks train on, made on the spot (the GPU machine has no internet): randomly initialised Llama
models of real shapes, a small byte-level BPE tokenizer, and synthetic data in the launcher's formats.

Shapes:
  * `1b`   Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256, tied): 1.24B parameters.
  * `8b`   Llama-3.1-8B, read from recipes/models/llama-3.1-8b/config.json: 8.03B parameters.
  * `tiny` hidden 64, 2 layers (the CPU dry run).

The tokenizer is tests/tiny.py's (vocab 400, ChatML template with generation markers). A model whose embedding is
larger than the tokenizer's vocabulary trains like any other: only the first 400 rows are ever looked up, and the
LM head still projects onto all 128256 logits, so the compute is that of the real shape.

Text rows are long enough to be cut at `max_length` (`data.truncation: truncate`), so every row holds exactly
`max_length` tokens: the token count, the attention cost and the activation memory per step are known exactly,
which the MFU and the memory-planner comparison rely on.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "recipes" / "models"

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": False},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
}


def shape_config(shape: str) -> dict[str, Any]:
    """LlamaConfig keyword arguments of a named shape."""
    if shape == "8b":
        config = json.loads((MODELS / "llama-3.1-8b" / "config.json").read_text())
        return {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype",
                                                             "transformers_version")}
    return dict(SHAPES[shape])


def _tiny_module() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import tiny
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return tiny


def write_model(out_dir: Path, shape: str, dtype: str, device: str) -> Path:
    """A random Llama of `shape` (seed 0) in `dtype`, initialised on `device`, saved with the tokenizer.

    Written once per machine: an existing complete directory is reused.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_module().build_tiny_tokenizer()
    kwargs = shape_config(shape)
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs["max_position_embeddings"] = max(4096, kwargs.get("max_position_embeddings", 0))
    config = LlamaConfig(**kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="4GB")
    tokenizer.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(out_dir)  # complete or absent: a killed write leaves only the .partial directory
    return out_dir


def _words(rng: random.Random, n: int) -> str:
    words = _tiny_module().WORDS
    return " ".join(rng.choice(words) for _ in range(n))


def write_text_data(path: Path, rows: int, words_per_row: int, seed: int = 0) -> Path:
    """`rows` rows of format `text`, each `words_per_row` words (about 1.5 tokens per word with the tiny BPE)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": _words(rng, words_per_row)}) + "\n" for _ in range(rows)))
    return path


def write_chat_data(path: Path, rows: int, words_per_answer: int, seed: int = 0) -> Path:
    """`rows` rows of format `messages`: a short question and a long answer (assistant-only loss)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(rows):
        messages = [{"role": "user", "content": "say " + _words(rng, 8)},
                    {"role": "assistant", "content": _words(rng, words_per_answer)}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    path.write_text("".join(lines))
    return path


def main(argv: list[str]) -> int:
    """`python bench/gpu/assets.py model OUT_DIR SHAPE DTYPE DEVICE` | `text FILE ROWS WORDS` | `chat FILE ROWS WORDS`."""
    what, path, *rest = argv
    if what == "model":
        print(write_model(Path(path), rest[0], rest[1], rest[2]))
    elif what == "text":
        print(write_text_data(Path(path), int(rest[0]), int(rest[1])))
    elif what == "chat":
        print(write_chat_data(Path(path), int(rest[0]), int(rest[1])))
    else:
        raise SystemExit(f"unknown asset {what!r}: model, text or chat")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
