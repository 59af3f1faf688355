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
