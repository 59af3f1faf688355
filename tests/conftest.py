"""Session-wide fixtures shared by all tests: the tiny model directory and its tokenizer (see tests/tiny.py).

Nothing heavy is imported at module level: planning-side tests must stay fast, so torch/transformers are imported
only when a test asks for one of these fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; fail fast instead of timing out

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: a torch op that spreads over both cores spin-waits for the one the other worker holds
    # (OpenMP), which made tiny steps 10x slower when oversubscribed (launcher/train/job.py cpu_threads). Set before
    # torch is imported; an explicit value from the caller wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

LONGEST_FIRST = {
    "tests/integration/test_slurm_launch.py": 420, "tests/integration/test_strategies.py": 400,
    "tests/test_gpu_dry_run.py": 200, "tests/train/test_train.py": 190, "tests/integration/test_qlora_sharded.py": 150,
    "tests/cluster/test_sweep.py": 120, "tests/train/test_methods.py": 90, "tests/train/test_data.py": 80,
    "tests/kernels/test_aot_compile.py": 40, "tests/train/test_tasks.py": 40,
    "tests/integration/test_local_slurm.py": -1,
}
"""Seconds a module took in CI (--durations, summed), for `make test`'s two xdist workers (`--dist loadscope
--no-loadscope-reorder`: a module is one unit, its module-scoped fixtures run once, and units go out in collection
order to whichever worker is nearly idle). Longest first, so no long module starts last and leaves one worker alone
at the end. The Slurm modules run at opposite ends, so they do not overlap on the one local cluster (the
`_one_slurm_module_at_a_time` lock in tests/integration/conftest.py covers the case where they would)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def weight(item: pytest.Item) -> float:
        return -LONGEST_FIRST.get(item.nodeid.split("::", 1)[0], 0)

    items.sort(key=weight)  # stable: every other module keeps its collection order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the tiny ChatML tokenizer, built once per session."""
    from tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny tokenizer, loaded back from the model directory the way the trainer loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


_WORKER_TIMINGS: dict[str, str] = {}
"""Integration timings the xdist workers sent back (tests/integration/conftest.py measures them)."""


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    _WORKER_TIMINGS.update(getattr(node, "workeroutput", {}).get("integration_timings", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _WORKER_TIMINGS:
        terminalreporter.section("integration timings (measured, not asserted)")
        for name, value in _WORKER_TIMINGS.items():
            terminalreporter.write_line(f"{name}: {value}")
