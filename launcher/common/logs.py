"""Per-rank log files and the console handler, shared by the training job and the tokenization job."""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path

_installed: list[logging.Handler] = []

STEP_LOGGER = "ftlaunch.steps"
"""The trainer's per-step lines: always in the rank's log file; on the console only while no live progress bar shows
the same figures (steps_on_console)."""
_console_steps = [True]

LOG_FORMAT = "%(asctime)s rank%(rank)s %(levelname)s %(name)s: %(message)s"
"""A rank log's lines; `error_records` reads them back."""
_RECORD_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ ([A-Z]+) [^:]+: (.*)$")
"""The head of a record written with LOG_FORMAT: asctime, level, message (its first line)."""
FILE_ONLY = "file_only"
"""`extra={FILE_ONLY: True}`: a record for the log file, not the console (a crash's traceback, which Python prints on
the console itself)."""


def steps_on_console(shown: bool) -> None:
    """Whether the console handler prints STEP_LOGGER's lines (the trainer turns them off under its live bar)."""
    _console_steps[0] = shown


def _console_filter(record: logging.LogRecord) -> bool:
    if getattr(record, FILE_ONLY, False):
        return False
    return _console_steps[0] or record.name != STEP_LOGGER


def setup_logging(run_dir: Path, rank: int, name: str | None = None) -> None:
    """Every rank logs to RUN_DIR/logs/rank{R}.log (or logs/NAME.log); rank 0 also to the console."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(logs / f"{name or f'rank{rank}'}.log")]
    handlers[0].setFormatter(logging.Formatter(LOG_FORMAT))
    handlers[0].addFilter(_RankFilter(rank))
    if rank == 0:
        from rich.logging import RichHandler

        console = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        console.addFilter(_console_filter)
        handlers.append(console)
    root = logging.getLogger()
    for old in _installed:  # a second run in the same process (tests) replaces only our own handlers
        root.removeHandler(old)
        old.close()
    _installed[:] = handlers
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("transformers", "datasets", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_known_noise()


def silence_known_noise() -> None:
    """Library messages nothing a user can act on."""
    # peft calls a transformers property that transformers has deprecated.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    # bitsandbytes (CPUs with AVX512-BF16) tries to fetch an optional 4-bit GEMM from the HF hub through the `kernels`
    # package at import and warns when it cannot; it then uses its own CPU path, which is what runs here anyway.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


#: How much of a log's end `error_records` reads: errors end an attempt, and a long run's log is mostly step lines.
ERROR_TAIL_BYTES = 1 << 20


def error_records(path: Path, since: float | None = None) -> list[str]:
    """The ERROR and CRITICAL records of a log written with LOG_FORMAT (in its last ERROR_TAIL_BYTES), oldest first,
    each its message with any continuation lines (a traceback, a listed problem); `since` (epoch seconds): only
    records written then or later (the log's clock is the writing host's local time, like asctime's)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - ERROR_TAIL_BYTES))
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    records: list[str] = []
    keep = False
    for line in text.splitlines():
        head = _RECORD_START.match(line)
        if head is None:
            if keep:
                records[-1] += "\n" + line
            continue
        stamp, millis, level, message = head.groups()
        written = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
        keep = level in ("ERROR", "CRITICAL") and (since is None or written >= since - 1.0)  # 1 s: clock rounding
        if keep:
            records.append(message)
    return records
