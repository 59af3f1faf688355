"""`launch baseline` (launcher/train/baseline.py, launcher/cli/baseline.py): each task's baselines against values
worked out by hand, baseline.json in the run directory the next launch takes, and no torch on the way.

Until the recipe has a `task:` section (issue 13, i13-tasks), the tests hand `run_baseline` a stand-in task object
with the agreed field names; through the CLI the recipe's task is read as causal_lm.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from launcher.cli.main import main
from launcher.common.rundir import BASELINE_FILE, claim_run_dir, is_fresh, next_run_dir, read_baseline
from launcher.config.recipe import load_recipe
from launcher.config.schema import Recipe
from launcher.train.baseline import beside_baseline, label_order, run_baseline
from launcher.train.data import data_fingerprint
from light import run_light

REPO = Path(__file__).resolve().parents[2]


def classify_task(**extra: Any) -> SimpleNamespace:
    return SimpleNamespace(type="sequence_classification", text_column="text", text_pair_column=None,
                           label_column="label", labels=None, **extra)


def write_recipe(tmp_path: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]] | None,
                 fmt: str = "prompt_completion", **data: Any) -> Path:
    for name, rows in (("train", train), ("eval", evals or [])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources: dict[str, Any] = {"train": {"path": "train.jsonl", "format": fmt}, **data}
    if evals is not None:
        sources["eval"] = [{"path": "eval.jsonl", "format": fmt}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": {"path": "m"}, "data": sources,
                                    "output": {"root": str(tmp_path / "runs")}}))
    return path


def recipe_of(tmp_path: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]] | None,
              **data: Any) -> Recipe:
    return load_recipe(write_recipe(tmp_path, train, evals, **data)).recipe


FILLERS = [f"w{i}" for i in range(30)]


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLERS) for _ in range(n)]


def test_tfidf_solves_a_keyword_task_but_not_a_word_order_task(tmp_path: Path) -> None:
    rng = random.Random(0)

    def keyword(n: int) -> list[dict[str, Any]]:  # the label is which of three keywords the text holds
        rows = []
        for _ in range(n):
            label = rng.choice(["red", "green", "blue"])
            words = _words(rng, 6)
            words.insert(rng.randrange(7), label)
            rows.append({"text": " ".join(words), "label": label})
        return rows

    def order(n: int) -> list[dict[str, Any]]:  # the label is whether "alpha" comes before "omega": same words
        rows = []
        for _ in range(n):
            words = _words(rng, 8)
            i, j = sorted(rng.sample(range(9), 2))
            j += j == i + 1  # never side by side: the bigram "alpha omega" would give the order away
            before = rng.random() < 0.5
            words.insert(i, "alpha" if before else "omega")
            words.insert(j, "omega" if before else "alpha")
            rows.append({"text": " ".join(words), "label": "before" if before else "after"})
        return rows

    easy = run_baseline(recipe_of(tmp_path, keyword(150), keyword(60)), classify_task())
    assert easy.baselines["tfidf_logreg"]["eval_accuracy"] == 1.0
    assert easy.baselines["tfidf_logreg"]["eval_f1_macro"] == 1.0
    assert easy.labels == ["blue", "green", "red"]
    hard = run_baseline(recipe_of(tmp_path, order(300), order(200)), classify_task())
    # Bag of words (and bigrams, whose neighbours are random fillers) sees the same features in both classes.
    assert abs(hard.baselines["tfidf_logreg"]["eval_accuracy"] - 0.5) < 0.12, hard.baselines


def test_majority_baseline_by_hand(tmp_path: Path) -> None:
    train = [{"text": t, "label": lab} for t, lab in
             [("x", "a"), ("y", "a"), ("z", "a"), ("x y", "b"), ("y z", "b"), ("z x", "c")]]
    evals = [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}, {"text": "z", "label": "c"},
             {"text": "x z", "label": "c"}]
    report = run_baseline(recipe_of(tmp_path, train, evals), classify_task())
    majority = report.baselines["majority"]
    # Always "a" (3 of 6 training rows): 1 of 4 right. Class a: P = 1/4, R = 1, F1 = 2 * 0.25 / 1.25 = 0.4;
    # b and c are never predicted: F1 0. Macro over the 3 labels: 0.4 / 3.
    assert majority["eval_accuracy"] == pytest.approx(1 / 4)
    assert majority["eval_f1_macro"] == pytest.approx(0.4 / 3)
    assert majority["eval_precision_macro"] == pytest.approx(0.25 / 3)
    assert report.n_train == 6 and report.n_eval == 4 and "'a' (3/6)" in report.notes["majority"]


def test_label_order_and_unknown_eval_labels(tmp_path: Path) -> None:
    assert label_order([10, 2, 2], None) == ["2", "10"]  # integers by value, not as text
    assert label_order(["b", "a"], None) == ["a", "b"]
    assert label_order(["b", "a"], ["b", "a"]) == ["b", "a"]
    recipe = recipe_of(tmp_path, [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}],
                       [{"text": "z", "label": "c"}])
    with pytest.raises(Exception, match=r"eval.jsonl: row 1: label 'c' is not among \['a', 'b'\]"):
        run_baseline(recipe, classify_task())


def test_most_frequent_tag_per_word_by_hand(tmp_path: Path) -> None:
    def row(words: str, tags: str) -> dict[str, Any]:
        return {"tokens": words.split(), "tags": tags.split()}

    train = [row("Paris is nice", "B-LOC O O"), row("Paris is big", "B-LOC O O"),
             row("Paris Hilton sings", "B-PER I-PER O")]  # Paris: B-LOC twice, B-PER once
    evals = [row("Paris Hilton is nice", "B-PER I-PER O O"),  # predicted B-LOC I-PER O O: LOC(0), PER(1), both wrong
             row("Rome is nice", "B-LOC O O"),                # Rome unseen -> O: nothing predicted
             row("Paris is big", "B-LOC O O")]                # right
    task = SimpleNamespace(type="token_classification", tokens_column="tokens", tags_column="tags")
    report = run_baseline(recipe_of(tmp_path, train, evals), task)
    # entities: true 3, predicted 3, correct 1 -> P = R = F1 = 1/3; tokens right: 3/4 + 2/3 + 3/3 -> 8/10
    assert report.baselines["word_tag"] == pytest.approx({"eval_entity_f1": 1 / 3, "eval_entity_precision": 1 / 3,
                                                          "eval_entity_recall": 1 / 3, "eval_token_accuracy": 0.8})
    # all O: no entity predicted (F1 0); 6 of the 10 true tags are O
    assert report.baselines["all_o"]["eval_entity_f1"] == 0.0
    assert report.baselines["all_o"]["eval_token_accuracy"] == pytest.approx(0.6)


def test_copy_input_for_seq2seq_and_causal_lm(tmp_path: Path) -> None:
    rows = [{"source": "the cat sat", "target": "the cat sat"}, {"source": "a b", "target": "c d"}]
    seq2seq = run_baseline(recipe_of(tmp_path, rows, rows),
                           SimpleNamespace(type="seq2seq", source_column="source", target_column="target"))
    copy = seq2seq.baselines["copy_input"]
    # one identical pair, one disjoint: exact match and ROUGE-1 are the mean of 1 and 0
    assert copy["eval_exact_match"] == pytest.approx(0.5) and copy["eval_rouge1"] == pytest.approx(0.5)
    chats = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi"},
                           {"role": "assistant", "content": "say hi"}]},
             {"messages": [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "green ideas"}]},
             {"messages": [{"role": "user", "content": "no answer yet"}]}]  # skipped: nothing to compare with
    causal = run_baseline(recipe_of(tmp_path, chats, chats, fmt="messages", loss_on="all"))
    assert causal.task == "causal_lm" and causal.n_eval == 2
    assert causal.baselines["copy_input"]["eval_exact_match"] == pytest.approx(0.5)


def test_eval_fraction_holds_out_the_runs_rows(tmp_path: Path) -> None:
    from launcher.train.data import load_samples, split_eval

    rows = [{"prompt": f"p{i}", "completion": f"p{i}" if i % 3 else "other"} for i in range(30)]
    recipe = recipe_of(tmp_path, rows, None, eval_fraction=0.2, eval_seed=7)
    report = run_baseline(recipe)
    _, held = split_eval(load_samples(recipe.data.train, recipe.data), 0.2, 7)  # what the run holds out
    expected = sum(s.prompt == s.completion for s in held) / len(held)
    assert report.n_train == 24 and report.n_eval == 6
    assert report.baselines["copy_input"]["eval_exact_match"] == pytest.approx(expected)
    with pytest.raises(Exception, match="has none. Fix: set data.eval or data.eval_fraction"):
        run_baseline(recipe_of(tmp_path, rows, None))


def test_launch_baseline_writes_the_next_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": "the cat sat", "completion": "the cat sat"}, {"prompt": "a b", "completion": "c d"}]
    recipe_file = write_recipe(tmp_path, rows, rows)
    root = tmp_path / "runs"
    assert main(["baseline", str(recipe_file)]) == 0
    written = read_baseline(root / "t")
    assert written is not None
    assert {k: written[k] for k in ("recipe", "task", "n_train", "n_eval")} == \
        {"recipe": "t", "task": "causal_lm", "n_train": 2, "n_eval": 2}
    assert written["data_fingerprint"] == data_fingerprint(load_recipe(recipe_file).recipe.data)
    assert written["baselines"]["copy_input"]["eval_exact_match"] == pytest.approx(0.5)
    assert "copy_input" in capsys.readouterr().out
    # Only a baseline there: still a planned run, which the next launch takes (and keeps the baseline).
    assert is_fresh(root / "t") and next_run_dir(root, "t") == root / "t"
    assert claim_run_dir(root, "t") == root / "t" and (root / "t" / BASELINE_FILE).is_file()
    # Beside a finished run (--out): its final eval values join the table, and the log lines set them side by side.
    (root / "t" / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 5, "eval_exact_match": 1.0}) + "\n")
    assert main(["baseline", str(recipe_file), "--out", str(root / "t")]) == 0
    assert "this run (final)" in capsys.readouterr().out
    assert beside_baseline(written, {"eval_exact_match": 1.0, "eval_loss": 0.3}) == \
        ["eval_exact_match: 1.0000 (copy_input 0.5000)"]
    assert main(["baseline", str(write_recipe(tmp_path, rows, None))]) == 2  # no eval split: refused, exit 2
    assert "data.eval_fraction" in capsys.readouterr().err


def test_launch_baseline_loads_no_torch(tmp_path: Path) -> None:
    # Rows both tasks can read: prompt/completion for the CLI's causal_lm, text/label for a classification.
    rows = [{"prompt": f"{w} {v}", "completion": w, "text": f"{w} {v}", "label": w} for w in "ab" for v in "xyz"]
    recipe_file = write_recipe(tmp_path, rows, rows)
    code = ("from types import SimpleNamespace; from launcher.cli.main import main;"
            "from launcher.config.recipe import load_recipe; from launcher.train.baseline import run_baseline;"
            f"rc = main(['baseline', {str(recipe_file)!r}]);"
            "task = SimpleNamespace(type='sequence_classification', text_column='text', label_column='label');"
            f"run_baseline(load_recipe({str(recipe_file)!r}).recipe, task)")
    result = run_light(code)
    assert result.returncode == 0, result.stderr
