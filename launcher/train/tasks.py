"""Rows -> examples for the tasks beside causal LM (`task:` in the recipe): sequence classification, token
classification and seq2seq. The causal-LM path is launcher/train/data.py; this module reuses its pieces (reading rows
with file:row numbers, the eval split, the Arrow cache entry layout, the length counts) and writes the same kind of
cache entry, so the trainer, `collate` and the ranks' memory-mapped reading do not change.

What an Example holds per task (`labels` is not aligned with `input_ids` except for token classification):

* sequence_classification: `input_ids` = the tokenizer's encoding of text (and text pair, joined as the tokenizer
  joins pairs), `labels` = [label id] (one item; every example counts 1 in the loss normalisation);
* token_classification: `input_ids` = the words encoded with `is_split_into_words`, `labels` = the word's tag id on
  the first sub-token of each word, -100 on its other sub-tokens and on special tokens (the convention of the Hugging
  Face token-classification examples: one prediction per word, so entity metrics count words, not sub-tokens);
* seq2seq: `input_ids` = source_prefix + source, `labels` = the target's ids (the model shifts them right into the
  decoder inputs itself); padding of either is masked by `collate` (attention mask 0, label -100).

Label ids: `task.labels` in order, or the sorted distinct labels of the training split (integer-looking labels by
value). A label of an eval row that is not among them is an error naming the file and row; so is one in a training row
when `task.labels` is given. Length: `data.max_length` bounds the input (and the target); longer examples are cut
(`truncation: truncate`, the tokenizer's own truncation, so special tokens stay) or dropped (`drop`). Packing does not
apply (refused at plan time).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from launcher.config.schema import DataConfig, DataSource, TaskConfig
from launcher.train.data import (FORMAT_VERSION, IGNORE_INDEX, SHARD_ROWS, DataError, EntryWriter, count_rows,
                                 held_out, iter_numbered)

log = logging.getLogger("ftlaunch")

TASK_FORMAT_VERSION = 1
"""Bumped whenever this module changes what gets cached (part of the cache key of non-causal tasks)."""

LABELS_FILE = "labels.json"
"""Written into the run directory (id order of the labels the model was built with, for `launch export`) and beside
a saved adapter (the base model must be rebuilt with the same head to load it)."""

CLASSIFICATION = ("sequence_classification", "token_classification")


def is_causal(task: TaskConfig | None) -> bool:
    return task is None or task.type == "causal_lm"


def task_fingerprint(task: TaskConfig | None) -> str:
    """What of the task changes the tokenized result, for the cache key; empty for causal_lm (whose keys stay what
    they were before tasks existed). Standard library only: the submitting side computes keys without torch."""
    if is_causal(task):
        return ""
    assert task is not None
    return f"task_format={TASK_FORMAT_VERSION}:" + json.dumps(task.model_dump(mode="json"), sort_keys=True)


def entry_writer(task: TaskConfig | None) -> EntryWriter | None:
    """The cache entry writer of a task (None: the causal-LM pipeline's own, launcher/train/data.write_entry)."""
    if is_causal(task):
        return None
    assert task is not None
    return lambda cfg, tokenizer, out: write_task_entry(cfg, task, tokenizer, out)


# ------------------------------------------------------------------------------------------------------ rows
Numbered = tuple[str, int, dict[str, Any]]
"""(file path, row number, row), the row number as `load_rows`' errors give it (a line number in JSON Lines)."""


def split_rows(cfg: DataConfig) -> tuple[Iterator[Numbered], Iterator[Numbered]]:
    """Train and eval rows, read as needed: `data.eval` sources, or the rows `held_out` picks from the training rows
    (the same ones the causal-LM pipeline holds out), or none."""
    held: set[int] = set()
    if not cfg.eval and cfg.eval_fraction > 0:
        held = held_out(sum(count_rows(source) for source in cfg.train), cfg.eval_fraction, cfg.eval_seed)

    def numbered(sources: Sequence[DataSource]) -> Iterator[Numbered]:
        for source in sources:
            for number, row in iter_numbered(source):
                yield source.path, number, row

    def train() -> Iterator[Numbered]:
        return (item for i, item in enumerate(numbered(cfg.train)) if i not in held)

    def evals() -> Iterator[Numbered]:
        if cfg.eval:
            return numbered(cfg.eval)
        return (item for i, item in enumerate(numbered(cfg.train)) if i in held)

    return train(), evals()


def _row_error(path: str, number: int, field: str, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: row {number}: field '{field}': {problem}. Fix: {fix}")


def _string(row: dict[str, Any], column: str, path: str, number: int, key: str) -> str:
    value = row.get(column)
    fix = f"every row needs a string in column '{column}' (task.{key} names the column)"
    if value is None:
        raise _row_error(path, number, column, "missing", fix)
    if not isinstance(value, str):
        raise _row_error(path, number, column, f"expected a string, got {type(value).__name__}", fix)
    return value


def label_name(value: Any, path: str, number: int, column: str) -> str:
    """A label value as its name: strings as they are, integers as decimal text (a CSV's "2" and a JSON 2 name the
    same label)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        problem = "missing" if value is None else f"expected a non-empty string or an integer, got {value!r}"
        raise _row_error(path, number, column, problem, "give every row a label (a class name or an integer id)")
    return str(value)


def _label_order(name: str) -> tuple[int, int, str]:
    text = name.strip()
    if text.lstrip("-").isdigit():
        return (0, int(text), "")
    return (1, 0, name)


def sort_labels(names: set[str]) -> list[str]:
    """Distinct label names in id order: integer-looking names by value (so data labelled 0..k-1 keeps its ids),
    then the others alphabetically."""
    return sorted(names, key=_label_order)


def _tokens_and_tags(row: dict[str, Any], task: TaskConfig, path: str, number: int) -> tuple[list[str], list[str]]:
    words, tags = row.get(task.tokens_column), row.get(task.tags_column)
    fix = (f"token_classification rows need a list of words in '{task.tokens_column}' and as many string tags in "
           f"'{task.tags_column}' (task.tokens_column / task.tags_column)")
    for column, value in ((task.tokens_column, words), (task.tags_column, tags)):
        if not isinstance(value, list) or not value:
            raise _row_error(path, number, column, "missing" if value is None else "expected a non-empty list", fix)
        if not all(isinstance(v, str) for v in value):
            raise _row_error(path, number, column, "expected strings only", fix)
    assert isinstance(words, list) and isinstance(tags, list)
    if len(words) != len(tags):
        raise _row_error(path, number, task.tags_column, f"{len(tags)} tags for {len(words)} words", fix)
    return words, tags


def row_labels(row: dict[str, Any], task: TaskConfig, path: str, number: int) -> list[str]:
    """The label names one row holds: its class, or its tags."""
    if task.type == "sequence_classification":
        return [label_name(row.get(task.label_column), path, number, task.label_column)]
    return _tokens_and_tags(row, task, path, number)[1]


def label_list(task: TaskConfig, train: Iterator[Numbered]) -> list[str]:
    """The id order of the labels: `task.labels`, else the sorted distinct labels of the training rows (at least
    two: a classifier of one class learns nothing)."""
    if task.labels is not None:
        return list(task.labels)
    names: set[str] = set()
    for path, number, row in train:
        names.update(row_labels(row, task, path, number))
    if len(names) < 2:
        raise DataError(f"the training data holds {len(names)} distinct label(s) {sorted(names)}: a classifier needs "
                        "at least two. Fix: check task.label_column / task.tags_column, or add rows of other classes")
    return sort_labels(names)


def _label_id(name: str, label2id: dict[str, int], path: str, number: int, column: str, given: bool) -> int:
    if name not in label2id:
        where = "task.labels" if given else "the labels of the training split"
        fix = ("add it to task.labels" if given else
               "add training rows with this label, remove the row, or list every label in task.labels")
        raise _row_error(path, number, column, f"label {name!r} is not among {where} {sorted(label2id)}", fix)
    return label2id[name]


# ------------------------------------------------------------------------------------------------ alignment
def align_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Token labels from word labels: the word's label on its first sub-token, IGNORE_INDEX on its other sub-tokens
    and on tokens of no word (special tokens). `word_ids` is a fast tokenizer's `BatchEncoding.word_ids(i)`."""
    out: list[int] = []
    previous: int | None = None
    for word in word_ids:
        out.append(IGNORE_INDEX if word is None or word == previous else word_labels[word])
        previous = word
    return out


# ------------------------------------------------------------------------------------------------ encoding
class TaskEncoder:
    """Batches of rows -> (input_ids, labels) pairs of one task, with the length policy applied; eval batches of
    seq2seq also give generation prompts (source ids, target text)."""

    def __init__(self, cfg: DataConfig, task: TaskConfig, tokenizer: Any, labels: list[str] | None) -> None:
        if cfg.packing:
            raise DataError(f"data.packing applies to causal_lm only, not {task.type}. Fix: set data.packing: false")
        if not getattr(tokenizer, "is_fast", False) and task.type == "token_classification":
            raise DataError("token_classification needs a fast tokenizer (word_ids maps sub-tokens to words). Fix: "
                            "use a model whose tokenizer.json is present")
        self.cfg, self.task, self.tok = cfg, task, tokenizer
        self.labels = labels
        self.label2id = {name: i for i, name in enumerate(labels or [])}

    def _encode(self, first: list[Any], second: list[Any] | None = None, **kwargs: Any) -> tuple["_Encodings",
                                                                                                   set[int]]:
        """The encodings of a batch and which of them were too long: encoded whole first, and again with the
        tokenizer's truncation only where too long (`truncation: truncate`); with `drop` they stay whole (dropped
        by the caller)."""
        whole = self.tok(first, second, **kwargs) if second is not None else self.tok(first, **kwargs)
        long = {i for i, ids in enumerate(whole["input_ids"]) if len(ids) > self.cfg.max_length}
        if not long or self.cfg.truncation == "drop":
            return _Encodings(whole, None, []), long
        order = sorted(long)
        cut = self.tok([first[i] for i in order], [second[i] for i in order] if second is not None else None,
                       truncation=True, max_length=self.cfg.max_length, **kwargs)
        return _Encodings(whole, cut, order), long

    def batch(self, rows: list[Numbered], evaluation: bool) -> tuple[list[tuple[list[int], list[int]]],
                                                                     list[tuple[list[int], str]], dict[str, int]]:
        """(examples, generation prompts, counts) of a batch of rows."""
        task = self.task
        counts = dict.fromkeys(("rows", "kept", "truncated", "dropped", "empty", "tokens", "label_tokens"), 0)
        counts["rows"] = len(rows)
        prompts: list[tuple[list[int], str]] = []
        pairs: list[tuple[list[int], list[int]] | None]
        if task.type == "sequence_classification":
            texts = [_string(r, task.text_column, p, n, "text_column") for p, n, r in rows]
            second = ([_string(r, task.text_pair_column, p, n, "text_pair_column") for p, n, r in rows]
                      if task.text_pair_column else None)
            ids = [_label_id(label_name(r.get(task.label_column), p, n, task.label_column), self.label2id, p, n,
                             task.label_column, task.labels is not None) for p, n, r in rows]
            encoded, long = self._encode(texts, second)
            pairs = [(list(encoded.ids(i)), [ids[i]]) for i in range(len(rows))]
        elif task.type == "token_classification":
            words, tag_ids = [], []
            for p, n, r in rows:
                w, tags = _tokens_and_tags(r, task, p, n)
                words.append(w)
                tag_ids.append([_label_id(t, self.label2id, p, n, task.tags_column, task.labels is not None)
                                for t in tags])
            encoded, long = self._encode(words, is_split_into_words=True)
            pairs = [(list(encoded.ids(i)), align_word_labels(encoded.word_ids(i), tag_ids[i]))
                     for i in range(len(rows))]
        else:  # seq2seq
            sources = [task.source_prefix + _string(r, task.source_column, p, n, "source_column") for p, n, r in rows]
            targets = [_string(r, task.target_column, p, n, "target_column") for p, n, r in rows]
            encoded, long = self._encode(sources)
            target_enc, long_targets = self._encode(targets)
            long |= long_targets
            pairs = [(list(encoded.ids(i)), list(target_enc.ids(i))) for i in range(len(rows))]
            if evaluation:
                prompts = [(list(encoded.ids(i)), targets[i]) for i in range(len(rows))
                           if i not in long or self.cfg.truncation == "truncate"]
        kept: list[tuple[list[int], list[int]]] = []
        for i, pair in enumerate(pairs):
            assert pair is not None
            if i in long:
                if self.cfg.truncation == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
            n_labels = sum(1 for label in pair[1] if label != IGNORE_INDEX)
            if n_labels == 0:  # every word cut away: nothing to learn from it
                counts["empty"] += 1
                continue
            counts["kept"] += 1
            counts["tokens"] += len(pair[0])
            counts["label_tokens"] += n_labels
            kept.append(pair)
        return kept, prompts, counts


class _Encodings:
    """A batch's encodings where the rows in `order` come from a second (truncated) call: the same `ids(i)` and
    `word_ids(i)` as one BatchEncoding."""

    def __init__(self, whole: Any, cut: Any, order: list[int]) -> None:
        self.whole, self.cut = whole, cut
        self.index = {i: k for k, i in enumerate(order)}

    def ids(self, i: int) -> list[int]:
        return self.cut["input_ids"][self.index[i]] if i in self.index else self.whole["input_ids"][i]

    def word_ids(self, i: int) -> list[int | None]:
        return self.cut.word_ids(self.index[i]) if i in self.index else self.whole.word_ids(i)


# ----------------------------------------------------------------------------------------------- cache entry
def write_task_entry(cfg: DataConfig, task: TaskConfig, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Tokenize the task's rows into Arrow shards under `out` (the cache entry layout of launcher/train/
    arrow_cache.py: train-*, eval-*, generation-* for seq2seq) and return meta.json's content, which also holds the
    label names in id order."""
    from launcher.train import arrow_cache

    labels = label_list(task, split_rows(cfg)[0]) if task.type in CLASSIFICATION else None
    encoder = TaskEncoder(cfg, task, tokenizer, labels)
    train_rows, eval_rows = split_rows(cfg)
    counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    for kind, rows in (("train", train_rows), ("eval", eval_rows)):
        for index, chunk in enumerate(_chunks(rows, SHARD_ROWS)):
            pairs, prompts, chunk_counts = encoder.batch(chunk, evaluation=kind == "eval")
            arrow_cache.write_table(out / arrow_cache.shard_name(kind, index), examples_table(pairs))
            if kind == "eval" and task.type == "seq2seq":
                arrow_cache.write_table(out / arrow_cache.shard_name("generation", index),
                                        arrow_cache.generation_table(prompts))
                chunk_counts["prompts"] = len(prompts)
            for key, value in chunk_counts.items():
                counts[kind][key] = counts[kind].get(key, 0) + value
    stats = {key: counts["train"].get(key, 0) for key in ("rows", "kept", "truncated", "dropped", "empty", "tokens",
                                                          "label_tokens")}
    if stats["kept"] == 0:
        raise DataError(f"no training examples left: {stats['dropped']} longer than max_length {cfg.max_length} were "
                        f"dropped, {stats['empty']} had no labelled token. Fix: raise data.max_length or use "
                        "data.truncation: truncate")
    stats.update({f"eval_{key}": counts["eval"].get(key, 0) for key in ("rows", "kept", "truncated", "dropped",
                                                                        "empty", "tokens", "label_tokens")})
    stats["eval_prompts"] = counts["eval"].get("prompts", 0)
    log.info("%s data: %s", task.type, f"{len(labels)} labels {labels}" if labels else "source -> target")
    return {"format_version": FORMAT_VERSION, "task": task.type, "labels": labels, "stats": stats, "packed": False,
            "shards": arrow_cache.shard_rows(out)}


def _chunks(rows: Iterator[Numbered], size: int) -> Iterator[list[Numbered]]:
    chunk: list[Numbered] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def examples_table(pairs: list[tuple[list[int], list[int]]]) -> Any:
    """(input_ids, labels) pairs whose lengths differ (arrow_cache.examples_table assumes equal lengths)."""
    import pyarrow as pa

    from launcher.train.arrow_cache import EXAMPLE_SCHEMA

    return pa.table({"input_ids": pa.array([ids for ids, _ in pairs], pa.list_(pa.int32())),
                     "labels": pa.array([labels for _, labels in pairs], pa.list_(pa.int32()))}, schema=EXAMPLE_SCHEMA)


# ------------------------------------------------------------------------------------------------ model head
def head_config(task: TaskConfig, labels: list[str] | None, pad_token_id: int | None) -> dict[str, Any] | None:
    """Config overrides of a classification model (None for the other tasks): num_labels, id2label and label2id
    (saved in the model's config.json), and pad_token_id, by which a decoder model's head finds the last non-pad
    token of each row (transformers refuses batches of more than one row without it)."""
    if task.type not in CLASSIFICATION:
        return None
    if not labels:
        raise DataError(f"task {task.type}: no labels (the data's labels or task.labels)")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": pad_token_id}


# ------------------------------------------------------------------------------------------------ run files
def write_labels(directory: Path, labels: list[str] | None) -> None:
    """`labels.json` ({"id2label": {...}, "label2id": {...}}) in `directory`; nothing without labels."""
    if not labels:
        return
    from launcher.common.rundir import write_text_atomic

    body = {"id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}
    write_text_atomic(Path(directory) / LABELS_FILE, json.dumps(body, indent=1) + "\n")


def head_labels(model: Any) -> list[str] | None:
    """The label names in id order of a classification model (its config's id2label), else None."""
    if not type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return None
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


def read_labels(directory: Path) -> list[str] | None:
    """The label names in id order from `directory`'s labels.json, or None when there is none."""
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        return None
    id2label = json.loads(path.read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]
