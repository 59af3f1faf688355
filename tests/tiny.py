"""Tiny, fully offline test assets: a byte-level BPE tokenizer with a marked ChatML template, a 2-layer Llama, and
small datasets in every format.

Used by tests/conftest.py (session fixtures) and runnable as a script:

    python tests/tiny.py OUT_DIR        # writes the tiny model directory (config, safetensors, tokenizer)

Heavy imports (torch, transformers, tokenizers) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
"""Same roles as SmolLM2-Instruct (bos <|im_start|>, eos <|im_end|>), but with a distinct pad token so that code
confusing padding with EOS fails in tests instead of passing by luck."""

SPECIAL_TOKENS = [PAD, "<|endoftext|>", BOS, EOS]
VOCAB_SIZE = 400

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "reverse", "the", "word",
         "what", "is", "answer", "hello", "world", "yes", "no", "one", "two", "three", "sky", "sea"]

# The shipped marked ChatML template (launcher/train/templates/chatml.jinja), read here rather than imported so that this
# module works without the launcher package on sys.path.
CHATML_TEMPLATE_FILE = Path(__file__).resolve().parents[1] / "launcher" / "train" / "templates" / "chatml.jinja"

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")


def rank_env(cache: Path) -> dict[str, str]:
    """Environment of `launch` / torchrun subprocesses in the multi-rank tests: one thread per rank (2 cores), gloo on
    loopback, no hub, this checkout importable (also from a worktree), and `cache` as the tokenization cache."""
    repo = Path(__file__).resolve().parents[1]
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "FTLAUNCH_CACHE": str(cache),
            "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "kernels"), os.environ.get("PYTHONPATH", "")])}


def _corpus(seed: int = 0, n_lines: int = 400) -> list[str]:
    """A few KB of text shaped like the test data (ChatML turns, reversed words), so BPE learns useful merges."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
        sentence = " ".join(words)
        lines.append(rng.choice([
            sentence,
            f"{BOS}user\n{sentence}{EOS}\n{BOS}assistant\n{sentence[::-1]}{EOS}\n",
            f"reverse {words[0]} = {words[0][::-1]}",
            sentence.capitalize() + ".",
        ]))
    return lines


def build_tiny_tokenizer() -> Any:
    """Byte-level BPE (vocab ~400) trained on generated text, wrapped as a PreTrainedTokenizerFast with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which assistant masks (char -> token mapping) rely on.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHATML_TEMPLATE_FILE.read_text(), model_max_length=512)


def build_tiny_model_dir(out_dir: Path) -> Path:
    """Write a tiny random LlamaForCausalLM (seed 0, fp32) and the tiny tokenizer into `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------- task models (issue 13)
def build_tiny_wordpiece_tokenizer() -> Any:
    """A BERT-style WordPiece tokenizer (lower-cased, `[CLS] a [SEP] b [SEP]`) with a small vocab (~150), so that
    rarer words split into several `##` sub-tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(_corpus(), trainer=trainer)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]", model_max_length=512)


def build_tiny_bert_dir(out_dir: Path) -> Path:
    """A tiny random BERT encoder (2 layers, hidden 32; seed 0, fp32) and the WordPiece tokenizer in `out_dir`."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out_dir)
    tokenizer = build_tiny_wordpiece_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_t5_dir(out_dir: Path) -> Path:
    """A tiny random T5 (2+2 layers, d_model 32; seed 0, fp32) with a byte-level BPE tokenizer that appends `</s>`
    as T5's does, in `out_dir`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    out_dir = Path(out_dir)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", backend.token_to_id("</s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(decoder_start_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


COLOURS, ANIMALS, OTHERS = ["red", "blue", "green"], ["cat", "dog"], ["sun", "moon", "tree", "river", "stone", "sky"]


def task_rows(task: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows of a learnable toy task: sequence_classification (does the text end with a colour, an animal, or
    neither: labels colour/animal/none), token_classification (colours B-COL, animals B-ANI, a `big` before an animal B-ANI with the
    animal I-ANI, the rest O), seq2seq (the words in reverse order)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        words = [rng.choice(OTHERS) for _ in range(rng.randint(2, 5))]
        if task == "sequence_classification":
            label = rng.choice(["colour", "animal", "none"])
            if label != "none":  # last, so that a 2-layer model (and a decoder's last-token head) learns it in steps
                words.append(rng.choice(COLOURS if label == "colour" else ANIMALS))
            rows.append({"text": " ".join(words), "label": label})
        elif task == "token_classification":
            tokens, tags = [], []
            for word in words:
                kind = rng.random()
                if kind < 0.25:
                    tokens.append(rng.choice(COLOURS)), tags.append("B-COL")
                elif kind < 0.45:
                    if rng.random() < 0.5:
                        tokens.append("big"), tags.append("B-ANI")
                        tokens.append(rng.choice(ANIMALS)), tags.append("I-ANI")
                    else:
                        tokens.append(rng.choice(ANIMALS)), tags.append("B-ANI")
                tokens.append(word), tags.append("O")
            rows.append({"tokens": tokens, "tags": tags})
        elif task == "seq2seq":
            rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
        else:
            raise ValueError(f"unknown task {task!r}")
    return rows


# ---------------------------------------------------------------------------------------------------- datasets
def sample_rows(fmt: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows of a toy task (reverse a word) in one format: alpaca, messages, sharegpt, prompt_completion, text."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        word = rng.choice(WORDS[:10])
        question, answer = f"reverse {word}", word[::-1]
        if fmt == "alpaca":
            rows.append({"instruction": "reverse the word", "input": word, "output": answer})
        elif fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
        elif fmt == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        elif fmt == "prompt_completion":
            rows.append({"prompt": question + " =", "completion": " " + answer})
        elif fmt == "text":
            rows.append({"text": f"{question} = {answer}"})
        else:
            raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON Lines (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_dataset(path: Path, fmt: str, n: int = 8, seed: int = 0) -> Path:
    """A jsonl file of `n` sample rows in `fmt` (`sharegpt` is the messages format's from/value variant)."""
    return write_jsonl(path, sample_rows(fmt, n, seed))


def write_hub_dataset(cache: Path, repo: str, files: dict[str, list[dict[str, Any]]], commit: str,
                      ref: str = "main") -> Path:
    """A dataset snapshot laid out as huggingface_hub's cache keeps one: `datasets--org--name/refs/<ref>` holding the
    commit hash, the files under `snapshots/<commit>/` (plain files: the real cache links them to blobs/, which
    readers do not see). Returns the snapshot directory."""
    repo_dir = Path(cache) / ("datasets--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, rows in files.items():
        write_jsonl(snapshot / name, rows)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def use_hub_cache(monkeypatch: Any, cache: Path) -> Path:
    """Point huggingface_hub (read at its import: patched) and child processes (the environment) at `cache`, offline."""
    from huggingface_hub import constants

    from launcher.common import hub_data

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_data.probe.cache_clear()
    return cache


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tests/tiny.py OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    print(build_tiny_model_dir(Path(sys.argv[1])))
