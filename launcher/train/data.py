"""Dataset formats -> tokenized, label-masked, optionally packed examples; plus a tokenization cache.

Pipeline (one call: :func:`tokenize_cached`)::

    DataSource files (a `hub` source: its files in the Hub cache, local_sources) --load_rows--> rows
        --normalise--> Sample (conversation | prompt/completion | text)
        --eval split--> train / eval samples --tokenize--> Example(input_ids, labels) --length policy-->
        --packing (train only)--> DataBundle

Labels. A label of -100 (IGNORE_INDEX) carries no loss. The first token of every example never carries a label (a
causal LM never predicts its first token; masking it explicitly also keeps packed examples from being trained to
predict the start of the next example from the end of the previous one).

* chat formats (messages incl. ShareGPT; alpaca with `prompt_style: chat`): rendered with the chat template.
  `loss_on: assistant` labels what the template wraps in `{% generation %}...{% endgeneration %}` (transformers'
  `return_assistant_tokens_mask`); the shipped templates wrap the assistant content *and* its end-of-turn token, so
  the model learns to stop.
  `loss_on: all` labels every token. EOS is appended only when the template does not end a conversation with it.
* prompt_completion: TRL's convention for non-conversational prompt/completion data: no chat template, plain string
  concatenation `prompt + completion + eos`; labels start where the tokenized prompt and the tokenized whole diverge
  (`trl.data_utils.common_prefix_length`), so BPE merges across the boundary cannot shift the mask.
  `loss_on: all` labels the prompt too.
* alpaca with `prompt_style: alpaca`: the classic Alpaca prompt ("Below is an instruction... ### Response:\n",
  :func:`alpaca_prompt`) and the output, as a prompt/completion pair: tokenized and labelled like prompt_completion
  (output + eos labelled), no chat template; exact match generates from the same prompt.
* text: `text + eos`, every token labelled (`loss_on` does not apply: there is no assistant part).

Packing (`packing: true`, training examples only; eval stays unpacked). Examples are binned with TRL's best-fit-
decreasing `pack_dataset` (no example is split), each packed row gets `position_ids` restarting at 0 per example, and
`collate` returns NO attention_mask for packed batches. transformers (checked on 5.23, `masking_utils.
find_packed_sequence_indices`) then derives a block-diagonal causal mask from the position resets, for eager, sdpa
and flex attention, and flash-attention uses the same position ids for its varlen path. Caveats, stated plainly:
  - the detection only runs when attention_mask is None AND no KV cache is passed: call the model with
    `use_cache=False` (the trainer does). With a cache object (e.g. `model.eval()` and default `use_cache=True`)
    packed examples DO attend to each other, silently.
  - a 2-D attention_mask disables the detection, so never add one to a packed batch.
  tests/train/test_data.py checks that each example's logits inside a packed row equal its logits alone (eager and sdpa).

Cache. `cache_key(cfg, tokenizer)` = hash(`data_fingerprint(cfg)`, `tokenizer_fingerprint(tokenizer)`).
`data_fingerprint` hashes the data files (path, size, mtime) and every DataConfig field that changes the result, and
the tokenizer's part is the hash of its directory's files where they decide alone, both with the standard library
only, so the submitting side computes the key without torch/transformers (`cache_key_from_files`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from launcher.config.schema import DataConfig, DataSource

if TYPE_CHECKING:  # training side only; imported lazily below
    import torch

log = logging.getLogger("ftlaunch")

IGNORE_INDEX = -100

FORMAT_VERSION = 2
"""Bumped whenever tokenization logic changes what gets cached, so stale caches are never reused."""

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
SHIPPED_TEMPLATES = {"chatml": "chatml.jinja", "smollm2": "smollm2.jinja"}
"""Names accepted by `data.chat_template`. Both carry `{% generation %}` markers. `smollm2` renders exactly what
SmolLM2-Instruct's own template renders (including its default system prompt)."""

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the same test transformers applies

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
_ROLES = {"system", "user", "assistant", "tool"}


# ------------------------------------------------------------------------------------------------------ errors
class DataError(Exception):
    """A problem with the training data, worded for the person who wrote the recipe: which file, which row
    (1-based; in JSON Lines files the line number), which field, and how to fix it."""


def _row_error(path: str, row: int, fieldname: str, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: row {row}: field '{fieldname}': {problem}. Fix: {fix}")


# --------------------------------------------------------------------------------------------------- data types
@dataclass
class Example:
    """One training/eval sequence. `labels` is aligned with `input_ids` (not shifted); -100 carries no loss.
    `position_ids` is set only for packed rows (positions restart at 0 for each packed example)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataBundle:
    """Everything the trainer needs from the data."""

    train: list[Example]
    eval: list[Example]
    eval_generation: list[tuple[list[int], str]]
    """For exact match: (prompt ids ending with the generation prompt, reference answer text) per eval example."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counts for the log: rows, kept, truncated, dropped, empty, tokens, label_tokens (eval_* likewise)."""
    packed: bool = False
    labels: list[str] | None = None
    """Classification tasks: the label names in id order (launcher/train/tasks.py); None otherwise."""


@dataclass(frozen=True)
class Sample:
    """A normalised row: exactly one of `messages`, (`prompt`, `completion`) or `text` is set."""

    where: str
    """`file: row N`, for error messages."""
    messages: tuple[tuple[str, str], ...] | None = None
    """(role, content) pairs, roles in system/user/assistant/tool."""
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    def chat(self) -> list[dict[str, str]]:
        assert self.messages is not None
        return [{"role": role, "content": content} for role, content in self.messages]


# ------------------------------------------------------------------------------------------------------ loading
def load_rows(source: DataSource) -> list[dict[str, Any]]:
    """Rows of one source as dicts, at most `source.max_rows` of them.

    .jsonl (and .json holding JSON Lines) is read line by line so a bad line is reported by its number;
    .json holding one array; .parquet (pyarrow); .csv (stdlib csv: every value a string, row 1 = first data row);
    a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict with `source.split`, default `train`).

    Raises:
        DataError: missing file, unreadable or malformed content, a row that is not an object, or no rows.
    """
    return [row for _, row in _load_numbered(source)]


def _load_numbered(source: DataSource) -> list[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs; row numbers are line numbers for JSON Lines."""
    return list(iter_numbered(source))


def iter_numbered(source: DataSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs of one source, read as they are needed: JSON Lines, CSV, Parquet (record batches)
    and saved datasets (batches) stream, so preparing a dataset does not hold all of it; a .json array is parsed
    whole (JSON has no rows to stream). A `hub` source is read as its files (:func:`local_sources`)."""
    if source.path is None:
        raise DataError(f"{source.name}: a Hub dataset is read through local_sources (its files in the Hub cache)")
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Fix: check data path (relative paths are resolved against the "
                        f"recipe file)")
    limit = source.max_rows
    rows: Iterable[tuple[int, Any]]
    if path.is_dir():
        rows = _load_saved_dataset(path, source.split, limit)
    else:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _load_jsonl(path, limit)
        elif suffix == ".json":
            rows = _load_json(path, limit)
        elif suffix == ".parquet":
            rows = _load_parquet(path, limit)
        elif suffix == ".csv":
            rows = _load_csv(path, limit)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}. Fix: use .jsonl, .json, .parquet, .csv or a "
                            f"datasets.save_to_disk directory")
    empty = True
    for number, row in rows:
        empty = False
        yield number, require_object(path, number, row)
    if empty:
        raise DataError(f"{path}: no rows. Fix: point data path at a non-empty dataset")


def count_rows(source: DataSource) -> int:
    """Rows `iter_numbered` yields, without building them where the format allows (JSON Lines: non-blank lines)."""
    path = Path(source.path or "")  # a hub source (no path) is refused by iter_numbered below
    if path.is_file() and path.suffix.lower() == ".jsonl":
        count = sum(1 for _ in jsonl_lines(path, source.max_rows))
        if count == 0:
            raise DataError(f"{path}: no rows. Fix: point data path at a non-empty dataset")
        return count
    return sum(1 for _ in iter_numbered(source))


def _text(path: Path) -> str:
    """A data file's text; a DataError naming the file, line and byte when it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}). Fix: "
                        "save the file as UTF-8") from None


def _load_jsonl(path: Path | str, limit: int | None) -> Iterator[tuple[int, Any]]:
    return ((number, parse_jsonl_line(path, number, raw)) for number, raw in jsonl_lines(path, limit))


def jsonl_lines(path: Path | str, limit: int | None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the non-blank lines (a trailing blank line is harmless), at most `limit`."""
    taken = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and taken >= limit:
                break
            if raw.strip():
                taken += 1
                yield number, raw


def parse_jsonl_line(path: Path | str, number: int, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: row {number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}). Fix: save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: row {number}: invalid JSON ({err.msg} at column {err.colno}). Fix: each "
                        f"line of a .jsonl file must be one complete JSON object") from None


def require_object(path: Path | str, number: int, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}. Fix: write one "
                        f"object per row")
    return row


_JSON_BAD = "Fix: the file must hold one JSON array of objects, or one object per line"
_JSON_CHUNK_CHARS = 1 << 20


def _load_json(path: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    """A .json file: an array of objects is streamed element by element (below); JSON Lines saved as .json (as
    `datasets`' to_json writes it) streams as JSON Lines; anything else (one object, a scalar) is parsed whole."""
    with open(path, "rb") as handle:
        start = handle.read(64 * 1024).lstrip()
    if start.startswith(b"["):
        for number, row in enumerate(_json_array(path), start=1):
            if limit is not None and number > limit:
                return
            yield number, row
        return
    if start.startswith(b"{") and _first_line_is_an_object(path):
        yield from _load_jsonl(path, limit)
        return
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}). "
                        f"{_JSON_BAD}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects. Fix: write [{{...}}, {{...}}] or JSON Lines")
    yield from enumerate(data[:limit] if limit else data, start=1)


def _first_line_is_an_object(path: Path) -> bool:
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw), dict)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
    return False


def _json_array(path: Path) -> Iterator[Any]:
    """The elements of a top-level JSON array, decoded one at a time from a sliding window of the file's text
    (`json.JSONDecoder.raw_decode`), so a large .json dataset is never held whole. Errors name the line and column,
    as `json.loads` would. Written here because the standard library has no streaming parser and ijson is not a
    dependency."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="strict") as handle:
        buf, pos, eof = "", 0, False
        line_of_buf, column_of_buf = 1, 0  # where buf[0] is in the file (for error messages)

        def fill() -> bool:
            nonlocal buf, pos, line_of_buf, column_of_buf, eof
            try:
                chunk = handle.read(_JSON_CHUNK_CHARS)
            except UnicodeDecodeError:
                _text(path)  # raises the DataError naming the line and byte
                raise
            if not chunk:
                eof = True
                return False
            newline = buf.rfind("\n", 0, pos)
            line_of_buf += buf.count("\n", 0, pos)
            column_of_buf = pos - newline - 1 if newline >= 0 else column_of_buf + pos
            buf, pos = buf[pos:] + chunk, 0
            return True

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos:pos + 1]

        def fail(at: int, message: str) -> DataError:
            newline = buf.rfind("\n", 0, at)
            column = at - newline if newline >= 0 else column_of_buf + at + 1
            return DataError(f"{path}: invalid JSON at line {line_of_buf + buf.count(chr(10), 0, at)}, column "
                             f"{column} ({message}). {_JSON_BAD}")

        skip_space()
        pos += 1  # the "[" the caller saw
        if skip_space() == "]":
            pos += 1
        else:
            while True:
                skip_space()
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as err:
                        if eof or not fill():
                            raise fail(err.pos, err.msg) from None
                        continue
                    if end == len(buf) and not eof and fill():
                        continue  # a number or literal may go on in the next chunk
                    break
                pos = end
                yield value
                after = skip_space()
                pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise fail(pos - 1, "Expecting ',' delimiter" if after else "Expecting value")
        if skip_space():
            raise fail(pos, "Extra data")


def _load_parquet(path: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # a dependency of datasets

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                if limit is not None and number >= limit:
                    return
                number += 1
                yield number, row
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: unreadable parquet file ({err}). Fix: rewrite the file") from None


def _load_csv(path: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    # stdlib csv rather than datasets: values stay strings (no type guessing turning "0042" into 42) and row numbers
    # are exact; the header line is not counted.
    # Streamed: the file is decoded as it is read, so preparing a large CSV does not hold its text.
    number = 0
    try:
        with open(path, encoding="utf-8", errors="strict", newline="") as handle:
            for row in csv.DictReader(handle, strict=True):
                if limit is not None and number >= limit:
                    return
                number += 1
                yield number, dict(row)
    except csv.Error as err:
        raise DataError(f"{path}: row {number + 1}: not valid CSV ({err}). Fix: quote fields that hold commas, "
                        "quotes or line breaks") from None
    except UnicodeDecodeError:
        _text(path)  # raises the DataError that names the line and byte (the decoder only knows its chunk)
        raise


def _load_saved_dataset(path: Path, split: str | None, limit: int | None) -> list[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a datasets.save_to_disk directory ({err}). Fix: point data path at a file or "
                        f"at a directory written by save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r} (splits: {', '.join(loaded)}). Fix: set split to one of them")
        loaded = loaded[name]
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return ((number, row) for number, row in enumerate(loaded, start=1))


# -------------------------------------------------------------------------------------------------- normalising
def _text_field(row: dict[str, Any], name: str, path: str, number: int, fix: str,
                required: bool = True) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise _row_error(path, number, name, "missing", fix)
        return None
    if not isinstance(value, str):
        raise _row_error(path, number, name, f"expected a string, got {type(value).__name__}", fix)
    return value


# The classic Alpaca prompt, word for word as axolotl's `AlpacaPrompter` (src/axolotl/prompters.py, prompt style
# "instruct": what its `type: alpaca` trains on) writes it, which is Stanford Alpaca's PROMPT_DICT
# (tatsu-lab/stanford_alpaca, train.py) with a newline after "### Response:" (Stanford's ends at the colon and the
# output follows it directly). The input variant is used when the row's input is non-empty, as in both.
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")


def alpaca_prompt(instruction: str, extra: str | None, system: str | None = None) -> str:
    """The Alpaca prompt of one row, ending with "### Response:\n" (the output follows). `system` (the row's, else
    data.system_prompt) replaces the "Below is an instruction..." preamble, as LLaMA-Factory's `system` column does."""
    preamble = system if system else ALPACA_PREAMBLE_INPUT if extra else ALPACA_PREAMBLE
    body = f"### Instruction:\n{instruction}\n\n"
    if extra:
        body += f"### Input:\n{extra}\n\n"
    return f"{preamble}\n\n{body}### Response:\n"


def normalise_row(row: dict[str, Any], fmt: str, path: str, number: int, need_assistant: bool = False,
                  prompt_style: str = "chat", system_prompt: str | None = None) -> Sample:
    """Turn one row of `fmt` into a Sample; `need_assistant` requires an assistant turn (assistant-only loss).
    Alpaca rows become a conversation (`prompt_style: chat`) or the Alpaca prompt and the output as a
    prompt/completion pair (`alpaca`: no chat template; `system_prompt` replaces the preamble of rows with no system).

    Raises:
        DataError: naming file, row and field.
    """
    where = f"{path}: row {number}"
    if fmt == "alpaca":
        fix = "alpaca rows need instruction and output strings (input and system are optional)"
        instruction = _text_field(row, "instruction", path, number, fix)
        output = _text_field(row, "output", path, number, fix)
        extra = _text_field(row, "input", path, number, fix, required=False)
        system = _text_field(row, "system", path, number, fix, required=False)
        if prompt_style == "alpaca":
            assert instruction is not None and output is not None
            return Sample(where, prompt=alpaca_prompt(instruction, extra, system or system_prompt), completion=output)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        turns = ([("system", system)] if system else []) + [("user", user), ("assistant", output)]
        return Sample(where, messages=tuple(turns))  # type: ignore[arg-type]
    if fmt == "messages":
        return Sample(where, messages=_messages(row, path, number, need_assistant))
    if fmt == "prompt_completion":
        fix = "prompt_completion rows need prompt and completion strings (for chat data use format: messages)"
        return Sample(where, prompt=_text_field(row, "prompt", path, number, fix),
                      completion=_text_field(row, "completion", path, number, fix))
    if fmt == "text":
        return Sample(where, text=_text_field(row, "text", path, number, "text rows need a text string"))
    raise DataError(f"{path}: unknown format {fmt!r}. Fix: use alpaca, messages, prompt_completion or text")


def _messages(row: dict[str, Any], path: str, number: int, need_assistant: bool) -> tuple[tuple[str, str], ...]:
    # TRL's maybe_convert_to_chatml renames from/value but keeps ShareGPT role names (human/gpt), which chat templates
    # do not know; so both variants are mapped here, with a field path in every error.
    fix = ("messages rows need `messages`: [{role, content}, ...] (OpenAI) or `conversations`: [{from, value}, ...] "
           "(ShareGPT)")
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if key is None:
        raise _row_error(path, number, "messages", "missing", fix)
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise _row_error(path, number, key, "expected a non-empty list of messages", fix)
    out: list[tuple[str, str]] = []
    for i, message in enumerate(turns):
        if not isinstance(message, dict):
            raise _row_error(path, number, f"{key}[{i}]", f"expected an object, got {type(message).__name__}", fix)
        sharegpt = "from" in message and "role" not in message
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = message.get(role_key)
        if not isinstance(role, str):
            raise _row_error(path, number, f"{key}[{i}].{role_key}", "missing", fix)
        role = _SHAREGPT_ROLES.get(role, role) if sharegpt else role
        if role not in _ROLES:
            raise _row_error(path, number, f"{key}[{i}].{role_key}", f"unknown role {message.get(role_key)!r}",
                             "roles are system, user, assistant, tool (ShareGPT: system, human, gpt)")
        content = message.get(content_key)
        if not isinstance(content, str):
            problem = "missing" if content is None else f"expected a string, got {type(content).__name__}"
            raise _row_error(path, number, f"{key}[{i}].{content_key}", problem, fix)
        out.append((role, content))
    if need_assistant and not any(role == "assistant" for role, _ in out):
        raise _row_error(path, number, key, "no assistant message, so nothing to learn with loss_on: assistant",
                         "add the assistant answer, drop the row, or set data.loss_on: all")
    return tuple(out)


def load_samples(sources: Iterable[DataSource], cfg: DataConfig) -> list[Sample]:
    """Load and normalise every row of `sources` (local files: see :func:`local_sources`), in order."""
    samples: list[Sample] = []
    for source in sources:
        for number, row in _load_numbered(source):
            samples.append(normalise_source_row(cfg, source, number, row))
    return samples


def normalise_source_row(cfg: DataConfig, source: DataSource, number: int, row: dict[str, Any]) -> Sample:
    """:func:`normalise_row` with the settings of `cfg` that shape a sample."""
    assert source.path is not None, "hub sources are read as their files (local_sources)"
    return normalise_row(row, source.format, source.path, number, need_assistant=cfg.loss_on == "assistant",
                         prompt_style=cfg.prompt_style, system_prompt=cfg.system_prompt)


def local_sources(cfg: DataConfig) -> DataConfig:
    """`cfg` with each `hub` source replaced by the data files of its split in the local Hub cache (in order, the
    source's max_rows spread over them), so the rest of the pipeline reads local files only and reports a bad row by
    its file and line. Never touches the network: the ranks read what `launch` downloaded (launcher/common/
    hub_data.py). The cache key is computed from `cfg` itself (:func:`data_fingerprint`: the snapshot's commit)."""
    if not any(source.hub for source in [*cfg.train, *cfg.eval]):
        return cfg
    update: dict[str, list[DataSource]] = {}
    for split in ("train", "eval"):
        update[split] = [file for i, source in enumerate(getattr(cfg, split))
                         for file in (_hub_files(source, f"data.{split}.{i}.hub") if source.hub else [source])]
    return cfg.model_copy(update=update)


def _hub_files(source: DataSource, key: str) -> list[DataSource]:
    from launcher.common import hub_data

    assert source.hub is not None
    snapshot = hub_data.local_snapshot(source.hub, source.revision)
    if snapshot is None:
        raise DataError(f"{key}: {source.hub} is not in the Hub cache here ({hub_data.repo_cache(source.hub)}); the "
                        "job reads Hub datasets offline, from the cache `launch` downloaded them into. Fix: put the "
                        "Hub cache (HF_HOME or HF_HUB_CACHE) on storage every node shares, or "
                        f"{hub_data.fix_hint(source)}")
    try:
        files = hub_data.data_files(snapshot, source)
    except hub_data.HubDataError as err:
        raise DataError(f"{key}: {source.hub} ({snapshot}): {err}. Fix: set subset/split to ones it has, or save "
                        "the data as .jsonl/.parquet and use path") from None
    out: list[DataSource] = []
    remaining = source.max_rows
    for file in files:
        part = DataSource(path=str(file), format=source.format, max_rows=remaining)
        out.append(part)
        if remaining is not None:
            remaining -= count_rows(part)
            if remaining <= 0:
                break
    return out


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out the rows `held_out(len(samples), ...)` names; both parts keep the original order."""
    held = held_out(len(samples), fraction, seed)
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """Indices of the round(fraction * n) rows (at least 1) held out for evaluation, chosen by `seed`.

    Deterministic: depends only on n, fraction and seed (random.Random, not the global RNG), so the streaming
    preparation, which knows only the row count, holds out the same rows as the in-memory path."""
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise DataError(f"eval_fraction {fraction} of {n} training rows leaves no training rows. Fix: lower "
                        f"data.eval_fraction or add rows")
    return set(random.Random(seed).sample(range(n), k))


# ---------------------------------------------------------------------------------------------- chat templates
def resolve_chat_template(value: str | None) -> str | None:
    """The Jinja text of `data.chat_template`: None (use the tokenizer's), a shipped name (`chatml`, `smollm2`),
    a path to a .jinja/.j2 file, or a Jinja string. Standard library only (the planning side hashes it)."""
    if value is None:
        return None
    if value in SHIPPED_TEMPLATES:
        return (TEMPLATES_DIR / SHIPPED_TEMPLATES[value]).read_text(encoding="utf-8")
    if value.endswith((".jinja", ".j2")) or ("{" not in value and "/" in value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"chat template file not found: {value}. Fix: give an existing .jinja file, a Jinja "
                            f"string, or one of {', '.join(SHIPPED_TEMPLATES)}")
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise DataError(f"data.chat_template {value!r} is not a shipped template, a .jinja file or a Jinja string. "
                    f"Fix: use one of {', '.join(SHIPPED_TEMPLATES)}, a path ending in .jinja, or Jinja text")


def has_generation_markers(template: str) -> bool:
    """Whether assistant-only masks can be computed from this template."""
    return bool(_MARKER.search(template))


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    return template


_PROBE = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
          [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _matching_shipped(tokenizer: Any, template: str) -> str | None:
    """The shipped template rendering exactly like `template` (the marked twin to suggest), if any."""
    for name in SHIPPED_TEMPLATES:
        shipped = resolve_chat_template(name)
        assert shipped is not None
        try:
            if all(_render(tokenizer, template, m) == _render(tokenizer, shipped, m) for m in _PROBE):
                return name
        except Exception:  # a template that cannot render the probe simply does not match
            continue
    return None


def _check_template(tokenizer: Any, cfg: DataConfig) -> str:
    """The template to use for chat formats, or a DataError that says how to get one that works."""
    template = resolve_chat_template(cfg.chat_template) or _tokenizer_template(tokenizer)
    if template is None:
        raise DataError("the tokenizer has no chat template and data.chat_template is not set. Fix: set "
                        "data.chat_template: chatml (or a .jinja file)")
    if cfg.loss_on == "assistant" and not has_generation_markers(template):
        source = "data.chat_template" if cfg.chat_template else f"the tokenizer's chat template ({_name(tokenizer)})"
        twin = _matching_shipped(tokenizer, template)
        if twin:
            fix = f"set data.chat_template: {twin} (renders the same text, with markers)"
        elif "<|im_start|>" in template:
            fix = "set data.chat_template: chatml (the tokenizer uses ChatML tokens)"
        else:
            fix = ("give data.chat_template a copy of the template with each assistant content wrapped in "
                   "{% generation %}...{% endgeneration %}, or set data.loss_on: all")
        raise DataError(f"{source} has no {{% generation %}} markers, so assistant-only loss (data.loss_on: "
                        f"assistant) cannot find the assistant tokens. Fix: {fix}")
    return template


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# -------------------------------------------------------------------------------------------------- tokenizing
def uses_chat_template(cfg: DataConfig, source: DataSource) -> bool:
    """Whether the rows of `source` are rendered with the chat template (messages; alpaca with prompt_style chat)."""
    return source.format == "messages" or (source.format == "alpaca" and cfg.prompt_style == "chat")


class _Tokenize:
    """Sample -> (input_ids, labels) for one tokenizer and config; labels not yet length-limited."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, chat: bool) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.eos_id: int = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError(f"tokenizer {_name(tokenizer)} has no eos_token. Fix: use a tokenizer that defines one")
        self.template = _check_template(tokenizer, cfg) if chat else None
        self.append_eos = False
        if self.template is not None:
            # Decided once per template: ChatML ends each turn with <|im_end|> (the EOS of ChatML tokenizers), so no
            # EOS is added; a template that ends without EOS gets one, so generation learns to stop.
            try:
                rendered = _render(tokenizer, self.template, _PROBE[0])
            except Exception as err:  # jinja syntax errors, undefined variables...
                raise DataError(f"the chat template cannot render a simple user/assistant exchange ({err}). Fix: "
                                f"check data.chat_template") from None
            self.append_eos = not rendered.rstrip().endswith(tokenizer.eos_token)

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        messages = sample.chat()
        if self.cfg.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return messages

    def __call__(self, sample: Sample) -> tuple[list[int], list[int]]:
        if sample.messages is not None:
            ids, labels = self._chat(sample)
        elif sample.text is not None:
            ids = self._encode(sample.text + self.tok.eos_token)
            labels = list(ids)
        else:
            assert sample.prompt is not None and sample.completion is not None
            prompt_ids = self._encode(sample.prompt)
            ids = self._encode(sample.prompt + sample.completion + self.tok.eos_token)
            from trl.data_utils import common_prefix_length

            start = 0 if self.cfg.loss_on == "all" else common_prefix_length(prompt_ids, ids)
            labels = [IGNORE_INDEX] * start + ids[start:]
        if labels:
            labels[0] = IGNORE_INDEX  # never predicted (see the module docstring)
        return ids, labels

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def _chat(self, sample: Sample) -> tuple[list[int], list[int]]:
        assistant = self.cfg.loss_on == "assistant"
        out = self._apply(sample, self.messages(sample), return_assistant_tokens_mask=assistant)
        ids, labels = self._chat_labels(sample, out["input_ids"], out["assistant_masks"] if assistant else None)
        return ids.tolist(), labels.tolist()

    def generation_prompt(self, sample: Sample) -> tuple[list[int], str] | None:
        """(prompt ids, reference) for exact match; None for text samples or chats without an assistant turn."""
        if sample.prompt is not None and sample.completion is not None:
            return self._encode(sample.prompt), sample.completion
        if sample.messages is None:
            return None
        messages = self.messages(sample)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        out = self._apply(sample, messages[:last], add_generation_prompt=True)
        return list(out["input_ids"]), messages[last]["content"]

    # ------------------------------------------------------------------------------------------- batched
    def batch(self, samples: Sequence[Sample], arrays: bool = False) -> list[tuple[Any, Any]]:
        """`[self(s) for s in samples]`, token for token (tests/train/test_data.py checks it), with one chat-template
        call and one tokenizer call per kind of sample instead of one per row: the fast tokenizer encodes a batch
        in Rust, and transformers renders and maps the `{% generation %}` spans for the batch in one go."""
        out: list[tuple[list[int], list[int]] | None] = [None] * len(samples)
        chats = [i for i, s in enumerate(samples) if s.messages is not None]
        texts = [i for i, s in enumerate(samples) if s.text is not None]
        pairs = [i for i, s in enumerate(samples) if s.prompt is not None and s.messages is None and s.text is None]
        if chats:
            for i, result in zip(chats, self._chat_batch([samples[i] for i in chats], arrays)):
                out[i] = result
        if texts:
            encoded = self._encode_batch([samples[i].text + self.tok.eos_token for i in texts])  # type: ignore[operator]
            for i, ids in zip(texts, encoded):
                out[i] = (ids, list(ids))
        if pairs:
            from trl.data_utils import common_prefix_length

            prompts = self._encode_batch([samples[i].prompt for i in pairs])  # type: ignore[misc]
            wholes = self._encode_batch([samples[i].prompt + samples[i].completion + self.tok.eos_token  # type: ignore[operator]
                                         for i in pairs])
            for i, prompt_ids, ids in zip(pairs, prompts, wholes):
                start = 0 if self.cfg.loss_on == "all" else common_prefix_length(prompt_ids, ids)
                out[i] = (ids, [IGNORE_INDEX] * start + ids[start:])
        for result in out:
            assert result is not None
            if len(result[1]):
                result[1][0] = IGNORE_INDEX  # never predicted (see the module docstring)
        return out  # type: ignore[return-value]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tok(texts)["input_ids"]]

    def _chat_batch(self, samples: list[Sample], arrays: bool = False) -> list[tuple[Any, Any]]:
        import jinja2

        assistant = self.cfg.loss_on == "assistant"
        try:
            out = self.tok.apply_chat_template([self.messages(s) for s in samples], chat_template=self.template,
                                               tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=assistant)
        except jinja2.TemplateError:  # find the row and say which (the per-row path words the error)
            for sample in samples:
                self._apply(sample, self.messages(sample), return_assistant_tokens_mask=assistant)
            raise
        labelled = [self._chat_labels(sample, out["input_ids"][k], out["assistant_masks"][k] if assistant else None)
                    for k, sample in enumerate(samples)]
        return labelled if arrays else [(ids.tolist(), labels.tolist()) for ids, labels in labelled]

    def _chat_labels(self, sample: Sample, ids: Sequence[int], mask: Sequence[int] | None) -> tuple[Any, Any]:
        """Labels of a rendered conversation, as int32 arrays: the assistant mask's tokens (all tokens without a
        mask), and the EOS appended where the template does not end with it. Arrays, not lists: per-token Python
        loops were most of a shard's time."""
        import numpy as np

        id_array = np.asarray(ids, dtype=np.int32)
        if mask is None:
            labels = id_array.copy()
        else:
            labels = np.where(np.asarray(mask, dtype=bool), id_array, np.int32(IGNORE_INDEX)).astype(np.int32)
            if not (labels != IGNORE_INDEX).any():
                raise DataError(f"{sample.where}: the chat template marked no assistant tokens. Fix: check that "
                                f"its {{% generation %}} block wraps the assistant content")
        if self.append_eos:
            ends_with_answer = bool(sample.messages) and sample.messages[-1][0] == "assistant"  # type: ignore[index]
            id_array = np.append(id_array, np.int32(self.eos_id))
            labels = np.append(labels, np.int32(self.eos_id if ends_with_answer or mask is None else IGNORE_INDEX))
        return id_array, labels

    def generation_prompts(self, samples: Sequence[Sample]) -> list[tuple[list[int], str] | None]:
        """`[self.generation_prompt(s) for s in samples]`, batched like :meth:`batch`."""
        out: list[tuple[list[int], str] | None] = [None] * len(samples)
        chats: list[tuple[int, list[dict[str, str]], str]] = []
        pairs: list[int] = []
        for i, sample in enumerate(samples):
            if sample.prompt is not None and sample.completion is not None:
                pairs.append(i)
            elif sample.messages is not None:
                messages = self.messages(sample)
                last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
                if last is not None:
                    chats.append((i, messages[:last], messages[last]["content"]))
        if pairs:
            for i, ids in zip(pairs, self._encode_batch([samples[i].prompt for i in pairs])):  # type: ignore[misc]
                out[i] = (ids, samples[i].completion)  # type: ignore[assignment]
        if chats:
            rendered = self.tok.apply_chat_template([m for _, m, _ in chats], chat_template=self.template,
                                                    tokenize=True, return_dict=True, add_generation_prompt=True)
            for (i, _, reference), ids in zip(chats, rendered["input_ids"]):
                out[i] = (list(ids), reference)
        return out

    def _apply(self, sample: Sample, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        import jinja2

        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                return_dict=True, **kwargs)
        except jinja2.TemplateError as err:  # e.g. templates that raise "roles must alternate"
            raise DataError(f"{sample.where}: the chat template rejected this conversation ({err}). Fix: correct "
                            f"the row or use a template that accepts it (data.chat_template)") from None


def _limit(pairs: Iterable[tuple[list[int], list[int]]], cfg: DataConfig, prefix: str,
           stats: dict[str, int]) -> list[Example]:
    """Apply max_length/truncation; examples left without label tokens are dropped (they would train nothing)."""
    return [Example(list(ids), list(labels)) for ids, labels in _limit_pairs(pairs, cfg, prefix, stats)]


def _limit_pairs(pairs: Iterable[tuple[Any, Any]], cfg: DataConfig, prefix: str,
                 stats: dict[str, int]) -> list[tuple[Any, Any]]:
    """`_limit` on (ids, labels) sequences of any kind (lists, or numpy arrays in the sharded path)."""
    import numpy as np

    kept: list[tuple[Any, Any]] = []
    counts = dict.fromkeys(("rows", "kept", "truncated", "dropped", "empty", "tokens", "label_tokens"), 0)
    for ids, labels in pairs:
        counts["rows"] += 1
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                counts["dropped"] += 1
                continue
            ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
            counts["truncated"] += 1
        n_labels = int(np.count_nonzero(np.asarray(labels) != IGNORE_INDEX))
        if n_labels == 0:
            counts["empty"] += 1
            continue
        counts["kept"] += 1
        counts["tokens"] += len(ids)
        counts["label_tokens"] += n_labels
        kept.append((ids, labels))
    stats.update({prefix + key: value for key, value in counts.items()})
    return kept


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Bin examples into rows of at most max_length tokens (TRL's best-fit decreasing; no example is split) with
    position ids restarting at 0 per example. Examples must already be at most max_length long."""
    if not examples:
        return []
    import datasets
    from trl.data_utils import pack_dataset

    table = datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                        "labels": [e.labels for e in examples]})
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Map" bar per call is noise in the training log
    try:
        packed = pack_dataset(table, seq_length=max_length, strategy="bfd")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    out = []
    for row in packed:
        positions = [p for length in row["seq_lengths"] for p in range(length)]
        out.append(Example(list(row["input_ids"]), list(row["labels"]), positions))
    return out


def build_bundle(cfg: DataConfig, tokenizer: Any) -> DataBundle:
    """Load, normalise, split, tokenize (row by row), length-limit and pack, all in memory: the reference that
    the cached, batched, parallel path (:func:`write_entry`) is tested against, token for token."""
    cfg = local_sources(cfg)
    train_samples, eval_samples = _split_samples(cfg)
    chat = any(s.messages is not None for s in train_samples + eval_samples)
    tokenize = _Tokenize(tokenizer, cfg, chat)
    stats: dict[str, int] = {}
    train = _limit((tokenize(s) for s in train_samples), cfg, "", stats)
    if not train:
        raise DataError(f"no training examples left: {stats['dropped']} longer than max_length {cfg.max_length} "
                        f"were dropped, {stats['empty']} had no label tokens after truncation. Fix: raise "
                        f"data.max_length or use data.truncation: truncate")
    evals = _limit((tokenize(s) for s in eval_samples), cfg, "eval_", stats)
    generation = []
    for sample in eval_samples:
        prompt = tokenize.generation_prompt(sample)
        if prompt is not None and len(prompt[0]) < cfg.max_length:
            generation.append(prompt)
    stats["eval_prompts"] = len(generation)
    if cfg.packing:
        train = pack(train, cfg.max_length)
        stats["packed_sequences"] = len(train)
    return DataBundle(train=train, eval=evals, eval_generation=generation, stats=stats, packed=cfg.packing)


# --------------------------------------------------------------------------------------------------- collation
def collate(batch: list[Example], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded tensors: input_ids, labels (-100 on padding), and either attention_mask (unpacked) or
    position_ids (packed: no attention_mask, so transformers builds the per-example block mask; padding gets its
    own position block starting at 0, so it forms a separate 'example' that attends only to itself and carries no
    labels)."""
    import torch

    width = max(len(e) for e in batch)
    # Labels have their own width where a task's labels are not aligned with the input (a class id; a seq2seq
    # target: launcher/train/tasks.py); for causal LM and token classification it is the input's width.
    label_width = max(len(e.labels) for e in batch)
    packed = any(e.position_ids is not None for e in batch)
    ids, labels, extra = [], [], []
    for e in batch:
        pad = width - len(e)
        ids.append(e.input_ids + [pad_id] * pad)
        labels.append(e.labels + [IGNORE_INDEX] * (label_width - len(e.labels)))
        if packed:
            positions = e.position_ids if e.position_ids is not None else list(range(len(e)))
            extra.append(positions + list(range(pad)))
        else:
            extra.append([1] * len(e) + [0] * pad)
    out = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
    out["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------------------- cache
def _sha(parts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def _file_identity(path: Path) -> list[str]:
    """(path, size, mtime_ns) of a file, or of every file under a directory: cheap, and any edit changes it."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for file in files:
        try:
            st = file.stat()
            out.append(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        except FileNotFoundError:
            out.append(f"{file}|missing")
    return out


def data_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data files and every setting that changes the tokenized result. Standard library only."""
    try:
        template = resolve_chat_template(cfg.chat_template) or ""
    except DataError:
        template = f"unresolved:{cfg.chat_template}"
    parts = [f"format_version={FORMAT_VERSION}", f"template={template}"]
    for name in ("system_prompt", "max_length", "truncation", "packing", "loss_on", "eval_fraction", "eval_seed"):
        parts.append(f"{name}={getattr(cfg, name)!r}")
    if cfg.prompt_style != "chat":  # only then: the keys of recipes written before prompt_style stay as they were
        parts.append(f"prompt_style={cfg.prompt_style!r}")
    for split, sources in (("train", cfg.train), ("eval", cfg.eval)):
        for source in sources:
            parts.append(f"{split}:{source.format}:{source.split}:{source.max_rows}")
            parts.extend(_hub_identity(source) if source.hub else _file_identity(Path(source.path or "")))
    return _sha(parts)


def _hub_identity(source: DataSource) -> list[str]:
    """A Hub dataset by the commit its cached snapshot holds: a new revision of the dataset is a new key (a snapshot
    of one commit never changes). huggingface_hub only, no network."""
    from launcher.common import hub_data

    assert source.hub is not None
    snapshot = hub_data.local_snapshot(source.hub, source.revision)
    commit = hub_data.commit_of(snapshot) if snapshot is not None else "not cached"
    return [f"hub={source.hub}|subset={source.subset}|revision={source.revision}|commit={commit}"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what changes token ids. The files of the directory it loaded from when they decide alone
    (`tokenizer_files_fingerprint`: the submitting process computes the same key without loading it); else the
    loaded object: the backend tokenizer (vocab, merges, normalizer, post-processor), special tokens and the chat
    template."""
    from launcher.common.model_files import tokenizer_files_fingerprint

    source = str(getattr(tokenizer, "name_or_path", "") or "")
    files = tokenizer_files_fingerprint(Path(source)) if source else None
    if files is not None:
        return "files:" + files
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)
    specials = json.dumps({k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())})
    return _sha([type(tokenizer).__name__, body, json.dumps(template, sort_keys=True), specials])


EntryWriter = Callable[[DataConfig, Any, Path], dict[str, Any]]
"""Writes a cache entry's shards into a directory and returns its meta.json content (:func:`write_entry`, or a
task's writer: launcher/train/tasks.py `entry_writer`)."""


def cache_key(cfg: DataConfig, tokenizer: Any, extra: str = "") -> str:
    """Key of the tokenization cache: data_fingerprint(cfg) combined with tokenizer_fingerprint(tokenizer), and
    `extra` when given (a task's fingerprint: launcher/train/tasks.py; empty for causal_lm, whose keys it leaves as
    they were)."""
    return _sha([data_fingerprint(cfg), tokenizer_fingerprint(tokenizer), *([extra] if extra else [])])[:32]


def cache_key_from_files(cfg: DataConfig, tokenizer_dir: Path, extra: str = "") -> str | None:
    """`cache_key` without loading the tokenizer: equal to it for a tokenizer loaded from `tokenizer_dir` whenever
    `tokenizer_files_fingerprint` decides; None otherwise (load it then)."""
    from launcher.common.model_files import tokenizer_files_fingerprint

    files = tokenizer_files_fingerprint(tokenizer_dir)
    return None if files is None else _sha([data_fingerprint(cfg), "files:" + files,
                                            *([extra] if extra else [])])[:32]


def cache_entry(cfg: DataConfig, tokenizer: Any, cache_dir: Path, extra: str = "") -> Path:
    """Where the tokenized data of these settings and this tokenizer is cached: the directory `cache_dir/<key>`
    (launcher/train/arrow_cache.py)."""
    return Path(cache_dir) / cache_key(cfg, tokenizer, extra)


def is_cached(entry: Path) -> bool:
    from launcher.train.arrow_cache import is_complete

    return is_complete(entry)


def tokenize_cached(cfg: DataConfig, tokenizer: Any, cache_dir: Path, extra: str = "",
                    write: EntryWriter | None = None) -> DataBundle:
    """The tokenized data, built into the cache first when missing (see :func:`tokenize_into`)."""
    return tokenize_into(cache_entry(cfg, tokenizer, cache_dir, extra), cfg, tokenizer, write)


def tokenize_into(entry: Path, cfg: DataConfig, tokenizer: Any, write: EntryWriter | None = None) -> DataBundle:
    """The bundle cached at `entry` (a :func:`cache_entry`), memory-mapped; written there first when missing, by
    `data.num_proc` processes. A damaged entry is moved aside and rebuilt."""
    from launcher.train import arrow_cache

    if arrow_cache.is_complete(entry):
        try:
            return open_entry(entry)
        except Exception as err:  # noqa: BLE001 (truncated shards, foreign files: rebuild rather than fail the run)
            log.warning("tokenization cache %s unreadable (%s): rebuilding", entry, err)
            arrow_cache.discard(entry)
    tmp = arrow_cache.new_entry_dir(entry.parent, entry.name)
    try:
        meta = (write or write_entry)(local_sources(cfg), tokenizer, tmp)
        arrow_cache.publish(tmp, entry, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_entry(entry)


def open_entry(entry: Path) -> DataBundle:
    """A cache entry as a DataBundle whose rows are read from the memory-mapped files on access."""
    from launcher.train import arrow_cache

    meta = arrow_cache.read_meta(entry)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')} (this ftlaunch writes {FORMAT_VERSION})")

    def example(row: dict[str, Any]) -> Example:
        return Example(row["input_ids"], row["labels"], row.get("position_ids"))

    def prompt(row: dict[str, Any]) -> tuple[list[int], str]:
        return row["prompt_ids"], row["reference"]

    shards = meta["shards"]
    return DataBundle(train=arrow_cache.Rows(arrow_cache.open_table(entry, "train", shards), example),  # type: ignore[arg-type]
                      eval=arrow_cache.Rows(arrow_cache.open_table(entry, "eval", shards), example),  # type: ignore[arg-type]
                      eval_generation=arrow_cache.Rows(arrow_cache.open_table(entry, "generation", shards), prompt),  # type: ignore[arg-type]
                      stats=dict(meta["stats"]), packed=bool(meta["packed"]), labels=meta.get("labels"))


SHARD_ROWS = 4096
"""Rows per shard file. Fixed (not derived from num_proc) so that any number of processes writes the same files."""


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_entry(cfg: DataConfig, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Tokenize every source into Arrow shards under `out` and return the entry's meta data (not yet published).

    The same pipeline as :func:`build_bundle` (the per-row reference, which tests compare this with token for token),
    batched per shard and spread over `data.num_proc` processes; packing runs once on the tokenized table."""
    return finish_entry(cfg, out, tokenize_shards(cfg, tokenizer, out))


Part = tuple[int, int]
"""(task, tasks): the shards of one task of a multi-task prepare job: those whose index % tasks == task."""


def tokenize_shards(cfg: DataConfig, tokenizer: Any, out: Path, part: Part = (0, 1)) -> dict[str, dict[str, int]]:
    """Write the shards of `part` (all of them by default) under `out`; return the counts per kind (train, eval).
    Several tasks writing their parts into one directory give the bytes one task writes (shard i holds the same
    rows whoever writes it)."""
    chat = any(uses_chat_template(cfg, s) for s in [*cfg.train, *cfg.eval])
    tokenize = _Tokenize(tokenizer, cfg, chat)  # template checks fail here, before any worker starts
    num_proc = cfg.num_proc or default_num_proc()
    counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    progress = _Progress()
    for kind, shard_counts in _run_shard_jobs(tokenize, _shard_jobs(cfg, part), out, num_proc):
        for key, value in shard_counts.items():
            counts[kind][key] = counts[kind].get(key, 0) + value
        progress.update(shard_counts)
    progress.done()
    return counts


def finish_entry(cfg: DataConfig, out: Path, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """After every shard is written (`counts`: summed over the parts): check that examples are left, pack the train
    shards when asked, and return meta.json's content."""
    stats = {key: counts["train"].get(key, 0) for key in _COUNT_KEYS}
    if stats["kept"] == 0:
        raise DataError(f"no training examples left: {stats['dropped']} longer than max_length {cfg.max_length} "
                        f"were dropped, {stats['empty']} had no label tokens after truncation. Fix: raise "
                        f"data.max_length or use data.truncation: truncate")
    stats.update({f"eval_{key}": counts["eval"].get(key, 0) for key in _COUNT_KEYS})
    stats["eval_prompts"] = counts["eval"].get("prompts", 0)
    if cfg.packing:
        stats["packed_sequences"] = _pack_shards(out, cfg.max_length)
    from launcher.train.arrow_cache import shard_rows

    return {"format_version": FORMAT_VERSION, "stats": stats, "packed": cfg.packing, "shards": shard_rows(out)}


_COUNT_KEYS = ("rows", "kept", "truncated", "dropped", "empty", "tokens", "label_tokens")
_WORKER_TOKENIZE: "_Tokenize | None" = None


def _init_worker(tokenize: "_Tokenize") -> None:
    global _WORKER_TOKENIZE
    _WORKER_TOKENIZE = tokenize


RawRow = tuple[str, int, int, Any]
"""(split, source index, row number, payload): a row as the reading process passes it to a worker. The payload is
the raw line of a JSON Lines file (bytes: the worker parses it) or the row itself (other formats)."""


def _sample_of(cfg: DataConfig, item: RawRow) -> Sample:
    """Parse (JSON Lines) and normalise one raw row, with the errors the in-memory path gives."""
    split, source_index, number, payload = item
    source = (cfg.train if split == "train" else cfg.eval)[source_index]
    row = payload
    if isinstance(payload, bytes):
        assert source.path is not None
        row = require_object(source.path, number, parse_jsonl_line(source.path, number, payload))
    return normalise_source_row(cfg, source, number, row)


def _raw_rows(split: str, sources: Sequence[DataSource]) -> Iterator[RawRow]:
    """Rows as the workers get them: JSON Lines unparsed (parsing is most of the reading cost, so it is done where
    the tokenizing is, in parallel), other formats as rows."""
    for i, source in enumerate(sources):
        path = Path(source.path or "")  # a hub source (no path) is refused by iter_numbered below
        if path.is_file() and path.suffix.lower() == ".jsonl":
            empty = True
            for number, line in jsonl_lines(path, source.max_rows):
                empty = False
                yield split, i, number, line
            if empty:
                raise DataError(f"{path}: no rows. Fix: point data path at a non-empty dataset")
        else:
            for number, row in iter_numbered(source):
                yield split, i, number, row


def _shard_job(job: tuple[str, int, list[RawRow], Path]) -> tuple[str, dict[str, int]]:
    """One shard: tokenize its rows in one batch, apply the length policy, write it (and the exact-match prompts of
    eval rows). Runs in a worker process, or in this one."""
    from launcher.train import arrow_cache

    kind, index, items, out = job
    tokenize = _WORKER_TOKENIZE
    assert tokenize is not None
    samples = [_sample_of(tokenize.cfg, item) for item in items]
    stats: dict[str, int] = {}
    kept = _limit_pairs(tokenize.batch(samples, arrays=True), tokenize.cfg, "", stats)
    arrow_cache.write_table(out / arrow_cache.shard_name(kind, index), arrow_cache.examples_table(kept))
    if kind == "eval":
        prompts = [p for p in tokenize.generation_prompts(samples)
                   if p is not None and len(p[0]) < tokenize.cfg.max_length]
        arrow_cache.write_table(out / arrow_cache.shard_name("generation", index), arrow_cache.generation_table(prompts))
        stats["prompts"] = len(prompts)
    return kind, stats


def _run_shard_jobs(tokenize: "_Tokenize", jobs: Iterator[tuple[str, int, list[RawRow]]], out: Path,
                    num_proc: int) -> Iterator[tuple[str, dict[str, int]]]:
    """Each shard's counts, in order. Jobs are read from the (streaming) iterator only as workers free up: at most
    two shards per worker are in flight, so the parent's memory does not grow with the dataset."""
    if num_proc <= 1:
        _init_worker(tokenize)
        for kind, index, samples in jobs:
            yield _shard_job((kind, index, samples, out))
        return
    import collections
    import multiprocessing

    # fork: the workers inherit the loaded tokenizer and modules (spawn would import transformers again in each).
    # They only tokenize and write files: no torch, no threads of the parent's are needed in them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=(tokenize,)) as pool:
        pending: collections.deque[Any] = collections.deque()
        for kind, index, samples in jobs:
            pending.append(pool.apply_async(_shard_job, ((kind, index, samples, out),)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _shard_jobs(cfg: DataConfig, part: Part = (0, 1)) -> Iterator[tuple[str, int, list[RawRow]]]:
    """(kind, shard index, raw rows) in row order, read as they are needed, for the shards of `part` (the rows of
    other shards are counted, not kept). The eval rows of `eval_fraction` are the ones `split_eval` holds out (the
    same indices: it depends only on the row count, fraction and seed)."""
    task, tasks = part
    held: set[int] = set()
    if not cfg.eval and cfg.eval_fraction > 0:
        held = held_out(sum(count_rows(source) for source in cfg.train), cfg.eval_fraction, cfg.eval_seed)
    buffers: dict[str, list[RawRow]] = {"train": [], "eval": []}
    filled = {"train": 0, "eval": 0}
    index = {"train": 0, "eval": 0}

    def full(kind: str) -> tuple[str, int, list[RawRow]]:
        job = (kind, index[kind], buffers[kind])
        buffers[kind], filled[kind], index[kind] = [], 0, index[kind] + 1
        return job

    streams = [("train", _raw_rows("train", cfg.train))]
    if cfg.eval:
        streams.append(("eval", _raw_rows("eval", cfg.eval)))
    for kind, stream in streams:
        for i, sample in enumerate(stream):
            target = "eval" if kind == "train" and i in held else kind
            filled[target] += 1
            if index[target] % tasks == task:
                buffers[target].append(sample)
            if filled[target] >= SHARD_ROWS:
                job = full(target)
                if job[1] % tasks == task:
                    yield job
    for kind in ("train", "eval"):
        if filled[kind] and index[kind] % tasks == task:
            yield full(kind)


class _Progress:
    """Rows and tokens per second while preparing: a live rich bar on a terminal; in a log file (the Slurm prepare
    job, a rank's log) a line every `every_s` seconds instead, since a bar there is only carriage returns. The end
    is always logged."""

    def __init__(self, every_s: float = 10.0, live: bool | None = None) -> None:
        import sys
        import time

        self._clock = time.monotonic
        self.start = self.last = self._clock()
        self.every_s = every_s
        self.rows = self.tokens = 0
        self._bar: Any = None
        if sys.stderr.isatty() if live is None else live:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(SpinnerColumn(), TextColumn("[bold]tokenizing"), TextColumn("{task.fields[stats]}"),
                                 TimeElapsedColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("tokenize", total=None, stats=self._stats())

    def update(self, counts: dict[str, int]) -> None:
        self.rows += counts.get("rows", 0)
        self.tokens += counts.get("tokens", 0)
        if self._bar is not None:
            self._bar.update(self._task, stats=self._stats())
        elif self._clock() - self.last >= self.every_s:
            self.last = self._clock()
            log.info("tokenizing: %s", self._stats())

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        log.info("tokenized: %s", self._stats())

    def _stats(self) -> str:
        elapsed = max(self._clock() - self.start, 1e-9)
        return (f"{self.rows:,} rows, {self.tokens:,} tokens in {elapsed:.0f} s "
                f"({self.rows / elapsed:,.0f} rows/s, {self.tokens / elapsed:,.0f} tokens/s)")


def _split_samples(cfg: DataConfig) -> tuple[list[Sample], list[Sample]]:
    train_samples = load_samples(cfg.train, cfg)
    if cfg.eval:
        return train_samples, load_samples(cfg.eval, cfg)
    if cfg.eval_fraction > 0:
        return split_eval(train_samples, cfg.eval_fraction, cfg.eval_seed)
    return train_samples, []


def _pack_shards(out: Path, max_length: int) -> int:
    """Replace the train shards with packed rows (TRL's best-fit decreasing on the Arrow table, as :func:`pack`);
    returns the number of packed rows."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from trl.data_utils import pack_dataset

    from launcher.train import arrow_cache

    table = arrow_cache.open_table(out, "train")
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        packed = pack_dataset(datasets.Dataset(table), seq_length=max_length, strategy="bfd").data.table
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    # position ids restart at 0 for each packed example, computed on whole columns (no per-token Python objects)
    lengths = packed.column("seq_lengths").combine_chunks().flatten().to_numpy().astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    flat = (np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
    input_ids = packed.column("input_ids").combine_chunks().cast(pa.list_(pa.int32()))
    positions = pa.ListArray.from_arrays(input_ids.offsets, pa.array(flat, pa.int32()))
    result = pa.table({"input_ids": input_ids, "labels": packed.column("labels").combine_chunks().cast(
        pa.list_(pa.int32())), "position_ids": positions}, schema=arrow_cache.PACKED_SCHEMA)
    del table
    for shard in out.glob("train-*.arrow"):
        shard.unlink()
    arrow_cache.write_table(out / arrow_cache.shard_name("train", 0), result)
    return result.num_rows
