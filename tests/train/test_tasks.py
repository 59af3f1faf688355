"""`task:` (issue 13): rows -> examples for sequence classification, token classification and seq2seq; label
mapping and its errors; training each task on a tiny model (a Llama, a BERT-like encoder, a T5) with falling loss and
its metrics recorded; a classification adapter saved, reloaded and giving the same logits.

The runs go through `launcher.train.job.run_job` in this process, as tests/train/test_train.py does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiny import build_tiny_bert_dir, build_tiny_t5_dir, build_tiny_wordpiece_tokenizer, task_rows, write_jsonl

from launcher.config.schema import DataConfig, TaskConfig
from launcher.train.data import IGNORE_INDEX, DataError
from launcher.train.tasks import TaskEncoder, align_word_labels, label_list, sort_labels, split_rows


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def wordpiece() -> Any:
    """The tiny BERT's tokenizer alone (no model built), for the tests that only tokenize."""
    return build_tiny_wordpiece_tokenizer()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5_dir(tmp_path_factory.mktemp("tiny-t5"))


def _data(tmp_path: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]] | None = None,
          **fields: Any) -> DataConfig:
    sources = {"train": [{"path": str(write_jsonl(tmp_path / "train.jsonl", train))}]}
    if evals is not None:
        sources["eval"] = [{"path": str(write_jsonl(tmp_path / "eval.jsonl", evals))}]
    return DataConfig.model_validate({**sources, **fields})


# ------------------------------------------------------------------------------------------- label alignment
def test_token_labels_go_on_the_first_sub_token_of_each_word(wordpiece: Any, tmp_path: Path) -> None:
    tokenizer = wordpiece
    words, tags = ["big", "riverstone", "cat"], ["B-ANI", "I-ANI", "O"]
    encoding = tokenizer([words], is_split_into_words=True)
    word_ids = encoding.word_ids(0)
    pieces = {w: word_ids.count(w) for w in range(len(words))}
    assert pieces[0] > 1 and pieces[1] > 1, (tokenizer.convert_ids_to_tokens(encoding["input_ids"][0]), word_ids)
    labels = align_word_labels(word_ids, [7, 8, 9])
    assert labels[0] == IGNORE_INDEX and labels[-1] == IGNORE_INDEX  # [CLS], [SEP]
    firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [labels[i] for i in firsts] == [7, 8, 9]
    assert all(label == IGNORE_INDEX for i, label in enumerate(labels) if i not in firsts)

    # Through the encoder, with truncation cutting the second word in the middle: its first sub-token keeps the label.
    data = _data(tmp_path, [{"tokens": words, "tags": tags}], max_length=8)
    task = TaskConfig(type="token_classification")
    encoder = TaskEncoder(data, task, tokenizer, sort_labels(set(tags)))
    (pair,), _, counts = encoder.batch([("f.jsonl", 1, {"tokens": words, "tags": tags})], evaluation=False)
    ids, labels = pair
    assert len(ids) == 8 and counts["truncated"] == 1 and tokenizer.convert_ids_to_tokens(ids)[-1] == "[SEP]"
    names = sort_labels(set(tags))
    assert [names[label] for label in labels if label != IGNORE_INDEX] == ["B-ANI", "I-ANI"]


def test_token_alignment_with_a_byte_level_bpe(tiny_tokenizer: Any, tmp_path: Path) -> None:
    words, tags = ["reverse", "zanzibar", "sky"], ["O", "B-LOC", "O"]
    task = TaskConfig(type="token_classification")
    encoder = TaskEncoder(_data(tmp_path, [{"tokens": words, "tags": tags}]), task, tiny_tokenizer,
                          sort_labels(set(tags)))
    (pair,), _, _ = encoder.batch([("f.jsonl", 1, {"tokens": words, "tags": tags})], evaluation=False)
    ids, labels = pair
    word_ids = tiny_tokenizer([words], is_split_into_words=True).word_ids(0)
    assert word_ids.count(1) > 1  # "zanzibar" is split
    assert [label for label in labels if label != IGNORE_INDEX] == [1, 0, 1]  # labels: B-LOC=0, O=1
    assert sum(label != IGNORE_INDEX for label in labels) == len(words) < len(ids)


def test_text_pairs_are_joined_as_the_tokenizer_joins_pairs(wordpiece: Any, tmp_path: Path) -> None:
    tokenizer = wordpiece
    task = TaskConfig(type="sequence_classification", text_pair_column="hypothesis")
    row = {"text": "red cat", "hypothesis": "blue dog", "label": "no"}
    encoder = TaskEncoder(_data(tmp_path, [row]), task, tokenizer, ["no", "yes"])
    (pair,), _, _ = encoder.batch([("f.jsonl", 1, row)], evaluation=False)
    assert pair == (tokenizer("red cat", "blue dog")["input_ids"], [0])
    assert tokenizer.convert_ids_to_tokens(pair[0]).count("[SEP]") == 2


# ------------------------------------------------------------------------------------------------- label maps
def test_labels_are_sorted_integers_by_value_and_names_alphabetically() -> None:
    assert sort_labels({"10", "2", "0", "1"}) == ["0", "1", "2", "10"]
    assert sort_labels({"neg", "pos", "neutral"}) == ["neg", "neutral", "pos"]


def test_label_errors_name_the_file_and_row(tmp_path: Path, tiny_tokenizer: Any) -> None:
    task = TaskConfig(type="sequence_classification")
    train = [{"text": "red sun", "label": "colour"}, {"text": "cat", "label": 1}, {"text": "dog", "label": "1"}]
    data = _data(tmp_path, train, [{"text": "blue", "label": "colour"}, {"text": "sky", "label": "sky"}])
    labels = label_list(task, split_rows(data)[0])
    assert labels == ["1", "colour"]  # 1 and "1" are one label
    encoder = TaskEncoder(data, task, tiny_tokenizer, labels)
    with pytest.raises(DataError, match=r"eval\.jsonl: row 2: field 'label': label 'sky' is not among the labels "
                                        r"of the training split"):
        encoder.batch(list(split_rows(data)[1]), evaluation=True)
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: field 'label': label '1' is not among task\.labels"):
        given = TaskConfig(type="sequence_classification", labels=["colour", "none"])
        TaskEncoder(data, given, tiny_tokenizer, list(given.labels or [])).batch(list(split_rows(data)[0]), False)
    with pytest.raises(DataError, match="1 distinct label"):
        label_list(task, split_rows(_data(tmp_path, [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]))[0])
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: field 'label': missing"):
        label_list(task, split_rows(_data(tmp_path, [{"text": "a", "label": "x"}, {"text": "b"}]))[0])
    bad_tags = [{"tokens": ["a", "b"], "tags": ["O"]}]
    with pytest.raises(DataError, match=r"train\.jsonl: row 1: field 'tags': 1 tags for 2 words"):
        label_list(TaskConfig(type="token_classification"), split_rows(_data(tmp_path, bad_tags))[0])


def test_held_out_rows_are_the_eval_split_and_labels_come_from_train_only(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(10)]
    data = _data(tmp_path, rows, eval_fraction=0.3, eval_seed=1)
    train, evals = (list(part) for part in split_rows(data))
    assert len(train) == 7 and len(evals) == 3
    assert {n for _, n, _ in train} | {n for _, n, _ in evals} == set(range(1, 11))


# --------------------------------------------------------------------------------------------------- training


def _recipe(tmp_path: Path, model_dir: Path, task: dict[str, Any] | str, train: list[dict[str, Any]],
            evals: list[dict[str, Any]], **sections: Any) -> Path:
    recipe: dict[str, Any] = {
        "name": "task",
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": {"path": str(write_jsonl(tmp_path / "train.jsonl", train))},
                 "eval": [{"path": str(write_jsonl(tmp_path / "eval.jsonl", evals))}], "max_length": 48},
        "task": task,
        "method": {"name": "full"},
        "optim": {"lr": 3e-3, "micro_batch": 8, "max_steps": 16, "warmup_steps": 0, "schedule": "constant",
                  "seed": 1},
        "eval": {"at_start": True},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) and key != "method" else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(recipe: Path, baseline: bool = False) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    from cluster.local import LocalExecutor
    from launcher.cli.main import main
    from launcher.config.recipe import load_recipe
    from launcher.plan.resources import Resources
    from launcher.train.job import run_job

    run_dir = LocalExecutor(Resources()).prepare(load_recipe(recipe, [])).run_dir
    if baseline:  # `launch baseline` into the run directory: the run's end compares itself with it
        assert main(["baseline", str(recipe), "--out", str(run_dir)]) == 0
    assert run_job(run_dir) == 0, (run_dir / "logs").glob("*")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def _assert_learns(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    losses = [r["loss"] for r in train]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_sequence_classification_lora_on_llama_and_the_adapter_reloads(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lora = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    run_dir, train, evals = _train(_recipe(
        tmp_path, tiny_model_dir, "sequence_classification", task_rows("sequence_classification", 96, seed=1),
        task_rows("sequence_classification", 24, seed=2), method=lora, optim={"lr": 5e-3}, output={"merge": True}),
        baseline=True)
    _assert_learns(train, evals)
    end = evals[-1]
    baselines = json.loads((run_dir / "baseline.json").read_text())["baselines"]
    line = (f"vs baseline: eval_accuracy: {end['eval_accuracy']:.4f} (" +
            ", ".join(f"{name} {values['eval_accuracy']:.4f}" for name, values in baselines.items()) + ")")
    assert line in (run_dir / "logs" / "rank0.log").read_text()
    assert {"eval_accuracy", "eval_f1_macro", "eval_f1_micro", "eval_precision_macro", "eval_recall_macro"} <= set(end)
    assert "eval_perplexity" not in end and end["eval_accuracy"] > evals[0]["eval_accuracy"], evals

    # The adapter reloads onto a base built with the saved labels, and reproduces the recorded eval accuracy.
    adapter = run_dir / "adapter"
    id2label = json.loads((adapter / "labels.json").read_text())["id2label"]
    assert list(id2label.values()) == ["animal", "colour", "none"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label={int(k): v for k, v in id2label.items()},
        pad_token_id=tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, adapter).eval()
    rows = task_rows("sequence_classification", 24, seed=2)
    batch = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    predicted = [id2label[str(i)] for i in logits.argmax(-1).tolist()]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(end["eval_accuracy"])
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged").eval()
    assert merged.config.id2label == {int(k): v for k, v in id2label.items()}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-4, atol=1e-4)

    # `launch export` rebuilds the head from RUN_DIR/labels.json and writes the same adapter from the checkpoint.
    from launcher.train.export import export_run

    exported = export_run(run_dir, merge=False, out=tmp_path / "export")
    again = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, pad_token_id=tokenizer.pad_token_id), exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits)


@pytest.mark.slow
def test_token_classification_full_on_llama(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, train, evals = _train(_recipe(tmp_path, tiny_model_dir, {"type": "token_classification"},
                                     task_rows("token_classification", 96, seed=1),
                                     task_rows("token_classification", 16, seed=2)))
    _assert_learns(train, evals)
    assert {"eval_entity_f1", "eval_entity_precision", "eval_entity_recall", "eval_token_accuracy"} <= set(evals[-1])
    assert evals[-1]["eval_entity_f1"] > evals[0]["eval_entity_f1"], evals


@pytest.mark.slow
def test_token_classification_on_a_bert_encoder_with_freeze(tmp_path: Path, bert_dir: Path) -> None:
    freeze = {"name": "freeze", "trainable_layers": 1}  # the new classifier head trains too
    run_dir, train, evals = _train(_recipe(
        tmp_path, bert_dir, "token_classification", task_rows("token_classification", 96, seed=1),
        task_rows("token_classification", 24, seed=2), method=freeze, optim={"lr": 1e-2}))
    _assert_learns(train, evals)
    assert evals[-1]["eval_entity_f1"] > evals[0]["eval_entity_f1"] + 0.2, evals
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(run_dir / "model")
    assert model.config.id2label == {0: "B-ANI", 1: "B-COL", 2: "I-ANI", 3: "O"}


@pytest.mark.slow
def test_seq2seq_lora_on_t5_records_generation_metrics(tmp_path: Path, t5_dir: Path) -> None:
    lora = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    _, train, evals = _train(_recipe(tmp_path, t5_dir, {"type": "seq2seq", "source_prefix": "reverse: "},
                                     task_rows("seq2seq", 96, seed=1), task_rows("seq2seq", 8, seed=2), method=lora,
                                     optim={"lr": 1e-2}, eval={"max_new_tokens": 16}))
    _assert_learns(train, evals)
    for row in evals:
        assert {"eval_loss", "eval_perplexity", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_bleu",
                "eval_exact_match"} <= set(row)


@pytest.mark.slow
def test_causal_lm_exact_match_also_records_rouge_and_bleu(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"} for w in ["red", "blue", "cat", "dog"] * 8]
    recipe = _recipe(tmp_path, tiny_model_dir, "causal_lm", rows, rows[:4], data={"train": [{"path": str(
        write_jsonl(tmp_path / "pc.jsonl", rows)), "format": "prompt_completion"}], "eval": [{"path": str(
            write_jsonl(tmp_path / "pc-eval.jsonl", rows[:4])), "format": "prompt_completion"}]},
        optim={"max_steps": 2}, eval={"exact_match": True, "max_new_tokens": 4})
    _, _, evals = _train(recipe)
    for row in evals:
        assert {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge1", "eval_rougeL", "eval_bleu"} <= set(row)
        assert 0 <= row["eval_exact_match"] <= 1 and 0 <= row["eval_bleu"] <= 100
