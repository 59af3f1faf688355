"""Per-rank log files and the console handler, shared by the training job and the tokenization job."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

_installed: list[logging.Handler] = []

STEP_LOGGER = "ftlaunch.steps"
"""The trainer's per-step lines: always in the rank's log file; on the console only while no live progress bar shows
the same figures (steps_on_console)."""
_console_steps = [True]


def steps_on_console(shown: bool) -> None:
    """Whether the console handler prints STEP_LOGGER's lines (the trainer turns them off under its live bar)."""
    _console_steps[0] = shown


def _console_filter(record: logging.LogRecord) -> bool:
    return _console_steps[0] or record.name != STEP_LOGGER


def setup_logging(run_dir: Path, rank: int, name: str | None = None) -> None:
    """Every rank logs to RUN_DIR/logs/rank{R}.log (or logs/NAME.log); rank 0 also to the console."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(logs / f"{name or f'rank{rank}'}.log")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s rank%(rank)s %(levelname)s %(name)s: %(message)s"))
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
