"""The demo-classify data (recipes/data/make_classify.py): the committed files are what the script writes, every label
follows the stated rule, eval never repeats a training sentence, and the classes keep their imbalance."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
CLAUSE = re.compile(r"the (\w+) (came|arrived|was served|did not come|did not arrive|was not served) (before|after) "
                    r"the (\w+)")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_classify", DATA / "make_classify.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("classify")
    generator().main(["--out-dir", str(out)])
    return out


def test_committed_files_are_what_the_script_writes(fresh: Path) -> None:
    for name in ("train.jsonl", "eval.jsonl"):
        assert (fresh / name).read_bytes() == (DATA / "demo-classify" / name).read_bytes(), name


def test_labels_follow_the_rule_and_splits_are_apart(fresh: Path) -> None:
    train, evals = rows(fresh / "train.jsonl"), rows(fresh / "eval.jsonl")
    assert (len(train), len(evals)) == (2000, 300)
    for row in train + evals:
        (subject, verb, relation, other), = CLAUSE.findall(row["text"])
        subject_first = (relation == "before") != ("not" in verb)
        assert row["label"] == (subject if subject_first else other), row
        assert len(row["text"].split()) <= 20
    assert not {r["text"] for r in evals} & {r["text"] for r in train}
    shares = Counter(r["label"] for r in train)
    module = generator()
    for dish, target in zip(module.DISHES, module.TARGET_SHARES):
        assert shares[dish] / len(train) == pytest.approx(target, abs=0.03), (dish, shares)
