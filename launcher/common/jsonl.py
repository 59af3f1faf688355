"""JSON-lines files of a run (metrics.jsonl, jobs.jsonl), read so that a line torn by a crash or a full disk costs that
line only: the run stays resumable and `launch status` keeps working."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("ftlaunch")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of `path` that parse as JSON objects, in order; [] when it does not exist. A torn or garbled line is
    skipped with a warning naming the file and the line."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not a JSON object (torn by a crash or a full disk?): skipped", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
