"""The tokenization cache on disk: Arrow IPC files that every rank memory-maps.

An entry is a directory `<cache_key>/` holding

    train-NNNNN.arrow        input_ids, labels (int32 lists), position_ids (packed rows only)
    eval-NNNNN.arrow         input_ids, labels
    generation-NNNNN.arrow   prompt_ids (int32 list), reference (string): the exact-match prompts
    meta.json                format version, counts for the log, packed flag; written last

Shards keep the order of the rows (shard i holds rows before shard i+1's), so N workers writing one shard each give
the same examples as one worker. The entry is written under a temporary name in the same directory and renamed into
place: a reader sees a whole entry or none, and a damaged one (a file missing or unreadable) is rebuilt.

Why Arrow files and not pickled lists: a rank maps the files and builds Python lists for the rows of one batch only,
so opening the cache costs milliseconds and no memory per token, where unpickling held ~32 bytes per token in every
rank (issue 12: +380 MiB per rank for 11.9M tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, overload

import pyarrow as pa

META_FILE = "meta.json"
KINDS = ("train", "eval", "generation")
EXAMPLE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
PACKED_SCHEMA = EXAMPLE_SCHEMA.append(pa.field("position_ids", pa.list_(pa.int32())))
GENERATION_SCHEMA = pa.schema([("prompt_ids", pa.list_(pa.int32())), ("reference", pa.string())])


# ----------------------------------------------------------------------------------------------------- writing
def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.arrow"


def write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=8192)


def examples_table(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> pa.Table:
    """(input_ids, labels) pairs (lists or numpy arrays) as a table: one concatenation per column and an offsets
    array, not an Arrow object per token."""
    import numpy as np

    pairs = list(pairs)
    lengths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=len(pairs))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def column(values: list[Any]) -> pa.Array:
        flat = np.concatenate([np.asarray(v, dtype=np.int32) for v in values]) if values else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.int32()))

    return pa.table({"input_ids": column([ids for ids, _ in pairs]), "labels": column([lab for _, lab in pairs])},
                    schema=EXAMPLE_SCHEMA)


def generation_table(prompts: Iterable[tuple[Sequence[int], str]]) -> pa.Table:
    ids, refs = [], []
    for p, r in prompts:
        ids.append(p)
        refs.append(r)
    return pa.table({"prompt_ids": pa.array(ids, pa.list_(pa.int32())), "reference": pa.array(refs, pa.string())},
                    schema=GENERATION_SCHEMA)


STALE_SECONDS = 6 * 3600
"""A temporary entry this old belongs to a killed build (a live one is written to continuously): removed."""


def new_entry_dir(cache_dir: Path, key: str) -> Path:
    """A private directory to write an entry into, beside where it will be published; stale ones of killed builds
    are cleared on the way."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in [*cache_dir.glob(".tmp-*"), *cache_dir.glob(".damaged-*")]:
        try:
            if now - stale.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue
    return Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{key}-"))


def task_work_dir(cache_dir: Path, key: str, attempt: str) -> Path:
    """The directory the tasks of one multi-task prepare job write their shards into: the same name for all of them
    (key and job attempt), under the temporary prefix, so stale ones are cleared like any killed build's."""
    if not attempt or not all(c.isalnum() or c in "._-" for c in attempt):
        raise ValueError(f"attempt {attempt!r}: expected the job id (letters, digits, `._-`)")
    new_entry_dir(cache_dir, key).rmdir()  # clears stale temporaries on the way
    work = cache_dir / f".tmp-{key}-job{attempt}"
    work.mkdir(exist_ok=True)
    return work


def publish(tmp: Path, entry: Path, meta: dict[str, Any]) -> None:
    """Write meta.json last, fsync, and rename the directory into place. When another process published the same
    entry first, ours is discarded (both hold the same bytes)."""
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    try:
        os.rename(tmp, entry)
    except OSError:  # ENOTEMPTY/EEXIST: a concurrent writer won
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(entry):
            raise


def discard(entry: Path) -> None:
    """Move a damaged entry out of the way (renamed first, so a reader never sees it half deleted)."""
    aside = entry.with_name(f".damaged-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- reading
def is_complete(entry: Path) -> bool:
    return (entry / META_FILE).is_file()


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / META_FILE).read_text())


def shard_rows(entry: Path) -> dict[str, int]:
    """Rows of every shard written under `entry`: recorded in meta.json, so a reader notices a shard gone missing."""
    return {path.name: _read(path).num_rows for path in sorted(entry.glob("*.arrow"))}


def _read(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def open_table(entry: Path, kind: str, expected: dict[str, int] | None = None) -> pa.Table:
    """The shards of one kind, memory-mapped and concatenated without copying. With `expected` (meta.json's
    shard list) a shard missing, added or of another length raises ValueError: the entry is damaged."""
    names = sorted(p.name for p in entry.glob(f"{kind}-*.arrow"))
    if expected is not None:
        listed = sorted(name for name in expected if name.startswith(f"{kind}-"))
        if names != listed:
            raise ValueError(f"{entry}: {kind} shards {names} != the {listed} meta.json lists")
    tables = []
    for name in names:
        table = _read(entry / name)
        if expected is not None and table.num_rows != expected[name]:
            raise ValueError(f"{entry / name}: {table.num_rows} rows, meta.json says {expected[name]}")
        tables.append(table)
    if not tables:
        schema = {"generation": GENERATION_SCHEMA}.get(kind, EXAMPLE_SCHEMA)
        # not schema.empty_table() nor pa.array([]): they import pandas (~0.4 s and ~45 MiB in every rank)
        return pa.Table.from_batches([], schema=schema)
    return pa.concat_tables(tables)


class Rows(Sequence[Any]):
    """Rows of a memory-mapped table as the trainer's objects, built one row at a time on access."""

    def __init__(self, table: pa.Table, make: Any) -> None:
        self._columns = {name: table.column(name) for name in table.column_names}
        self._table = table
        self._make = make
        self._offsets = _chunk_offsets(table)

    def __len__(self) -> int:
        return self._table.num_rows

    def _row(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk, local = _locate(self._offsets, index)
        return {name: column.chunk(chunk)[local].as_py() for name, column in self._columns.items()}

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._make(self._row(index))

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:  # compares rows (tests compare with the in-memory reference)
        if not isinstance(other, (Rows, list)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def _chunk_offsets(table: pa.Table) -> list[int]:
    """Start row of each chunk (the columns of one table share their chunking: one per record batch)."""
    offsets, start = [], 0
    if table.num_columns == 0:
        return [0]
    for chunk in table.column(0).chunks:
        offsets.append(start)
        start += len(chunk)
    return offsets or [0]


def _locate(offsets: list[int], index: int) -> tuple[int, int]:
    import bisect

    chunk = bisect.bisect_right(offsets, index) - 1
    return chunk, index - offsets[chunk]
