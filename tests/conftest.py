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

SHARED_SLURM_GROUP = "slurm"
"""The modules that submit to the one local Slurm cluster run in one xdist worker, one after another: two workers'
jobs would queue behind each other's on its two nodes and run into their timeouts."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With `pytest -n N --dist loadgroup` (make test): a module's tests stay in one worker, so module-scoped
    fixtures (a set of multi-rank runs, a dry run of the GPU check) run once, not once per worker; the Slurm modules
    share one group. Runs before xdist's own hook, which turns these marks into the groups it schedules."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = SHARED_SLURM_GROUP if item.get_closest_marker("slurm") else item.nodeid.split("::", 1)[0]
            item.add_marker(pytest.mark.xdist_group(group))


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
