"""Baselines a fine-tuned model must beat, fitted on the recipe's train split and scored on its eval split with the
same metrics as the run (launcher/common/metrics.py); `launch baseline RECIPE` writes them to RUN_DIR/baseline.json.

By `task.type`:

* sequence_classification: TF-IDF over word 1- and 2-grams + logistic regression (scikit-learn), and the majority
  class. The regression uses `class_weight="balanced"` (each class weighted by n / (k * n_c)): on imbalanced data the
  unweighted fit drifts towards the large classes, and the majority baseline already stands for that extreme, so
  the balanced fit is the stronger competitor on macro F1, the figure that matters there. Fixed settings (C=1, no
  search): a baseline is a reference point, not a tuned model.
* token_classification: each word's most frequent training tag (unseen words: O), and all-O (entity F1 0; its token
  accuracy is the share of O, what a model that finds nothing scores).
* seq2seq and causal_lm: copy the input (source text; for causal_lm the prompt, or the last user message of a chat)
  as the answer, scored with ROUGE/BLEU/exact match against the reference: what echoing alone earns.

On the rank side because it reads data through launcher/train/data.py (the eval split must be the one the run
holds out); it imports no torch, so the login node runs it (tests/train/test_baseline.py checks).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from launcher.common import metrics
from launcher.common.rundir import BASELINE_FILE, write_json_atomic
from launcher.config.schema import DataConfig, DataSource, Recipe
from launcher.train.data import DataError, data_fingerprint, held_out, load_rows, local_sources, normalise_row

DEFAULT_TASK = "causal_lm"


@dataclass
class BaselineReport:
    """What `launch baseline` writes (baseline.json) and prints."""

    recipe: str
    task: str
    n_train: int
    n_eval: int
    data_fingerprint: str
    baselines: dict[str, dict[str, float]]
    """Baseline name -> its metrics, keyed as the run's metrics.jsonl keys them (`eval_accuracy`, ...)."""
    notes: dict[str, str] = field(default_factory=dict)
    """Baseline name -> what it is, in words."""
    labels: list[str] | None = None
    """Classification: label names in id order (the ids the metrics were computed on)."""

    def to_json(self) -> dict[str, Any]:
        out = {"recipe": self.recipe, "task": self.task, "n_train": self.n_train, "n_eval": self.n_eval,
               "data_fingerprint": self.data_fingerprint, "baselines": self.baselines, "notes": self.notes,
               "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def task_type(task: Any) -> str:
    return str(getattr(task, "type", None) or DEFAULT_TASK)


def _column(task: Any, name: str, default: str | None) -> Any:
    return getattr(task, name, default) if task is not None else default


# ----------------------------------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    source: DataSource
    number: int
    """1-based position in its source (the line number in JSON Lines files), for error messages."""


def _rows(sources: Sequence[DataSource]) -> list[Row]:
    return [Row(row, source, n) for source in sources for n, row in enumerate(load_rows(source), start=1)]


def split_rows(cfg: DataConfig) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows) as the run splits them: `data.eval`, or the rows `held_out` picks from the train
    sources taken together (the same indices launcher/train/data.py holds out, since both count the same rows)."""
    cfg = local_sources(cfg)  # Hub datasets: their files in the Hub cache
    train = _rows(cfg.train)
    if cfg.eval:
        return train, _rows(cfg.eval)
    if cfg.eval_fraction > 0:
        held = held_out(len(train), cfg.eval_fraction, cfg.eval_seed)
        return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]
    raise DataError("the baseline is scored on held-out data and the recipe has none. Fix: set data.eval or "
                    "data.eval_fraction")


def _value(row: Row, key: str) -> Any:
    if key not in row.values:
        raise DataError(f"{row.source.path}: row {row.number}: column {key!r} is missing (present: "
                        f"{sorted(row.values)}). Fix: set the task's column names to the data's")
    return row.values[key]


def _eval_keys(values: dict[str, float]) -> dict[str, float]:
    """Keys as the run's metrics.jsonl has them, so a run's final values line up with the baseline's."""
    return {f"eval_{key}": value for key, value in values.items()}


# ------------------------------------------------------------------------------------------- classification
Scored = tuple[dict[str, dict[str, float]], dict[str, str]]
"""(baseline name -> metrics, baseline name -> what it is)."""


def label_order(train_labels: Sequence[Any], given: Sequence[str] | None) -> list[str]:
    """Label names in id order: the recipe's `task.labels`, else the sorted distinct training labels (integers by
    value, so labels 0..k-1 keep their ids), as the run numbers them."""
    if given:
        return [str(v) for v in given]
    distinct = set(train_labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted(str(v) for v in distinct)


def classification(task: Any, train: list[Row], evals: list[Row]) -> tuple[Scored, list[str]]:
    from scipy.sparse import hstack  # a dependency of scikit-learn
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    label_col = _column(task, "label_column", "label")
    train_labels = [_value(r, label_col) for r in train]
    names = label_order(train_labels, _column(task, "labels", None))
    ids = {name: i for i, name in enumerate(names)}

    def encode(rows: list[Row]) -> list[int]:
        for row in rows:
            if str(_value(row, label_col)) not in ids:
                raise DataError(f"{row.source.path}: row {row.number}: label {_value(row, label_col)!r} is not "
                                f"among {names}. Fix: list every label in task.labels, or give the training data "
                                f"an example of each")
        return [ids[str(_value(row, label_col))] for row in rows]

    y_train, y_eval = encode(train), encode(evals)
    columns = [_column(task, "text_column", "text")]
    pair = _column(task, "text_pair_column", None)
    if pair:
        columns.append(pair)
    # One vectorizer per text column, side by side: the words of the first and of the second text stay apart.
    # Every word counts, one-letter ones too (scikit-learn's default pattern drops them: "I", "a", digits).
    vectorizers = [TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
                   for _ in columns]
    x_train = hstack([v.fit_transform([str(_value(r, c)) for r in train]) for v, c in zip(vectorizers, columns)])
    x_eval = hstack([v.transform([str(_value(r, c)) for r in evals]) for v, c in zip(vectorizers, columns)])
    scores: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    if len(set(y_train)) > 1:  # logistic regression needs two classes to fit
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
        model.fit(x_train.tocsr(), y_train)
        predicted = [int(v) for v in model.predict(x_eval.tocsr())]
        scores["tfidf_logreg"] = _eval_keys(metrics.classification_metrics(y_eval, predicted, len(names)))
        notes["tfidf_logreg"] = ("TF-IDF of word 1-2 grams (all words, sublinear tf) + logistic regression, C=1, "
                                 "class_weight=balanced")
    counts = Counter(y_train)
    top = max(range(len(names)), key=lambda i: (counts[i], -i))  # ties: the first label in id order
    scores["majority"] = _eval_keys(metrics.classification_metrics(y_eval, [top] * len(y_eval), len(names)))
    notes["majority"] = f"always the most frequent training label, {names[top]!r} ({counts[top]}/{len(y_train)})"
    return (scores, notes), names


# ------------------------------------------------------------------------------------------ token classification
def _tagged(task: Any, rows: list[Row]) -> list[tuple[list[str], list[str]]]:
    tokens_col, tags_col = _column(task, "tokens_column", "tokens"), _column(task, "tags_column", "tags")
    out = []
    for row in rows:
        words, tags = _value(row, tokens_col), _value(row, tags_col)
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise DataError(f"{row.source.path}: row {row.number}: {tokens_col!r} and {tags_col!r} must be lists of "
                            f"equal length. Fix: one tag per word")
        out.append(([str(w) for w in words], [str(t) for t in tags]))
    return out


def tagging(task: Any, train: list[Row], evals: list[Row]) -> Scored:
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for words, tags in _tagged(task, train):
        for word, tag in zip(words, tags):
            seen[word][tag] += 1
    # most_common keeps first-seen order among equal counts: deterministic for a given file.
    best = {word: counter.most_common(1)[0][0] for word, counter in seen.items()}
    gold = _tagged(task, evals)
    truth = [tags for _, tags in gold]
    per_word = [[best.get(word, "O") for word in words] for words, _ in gold]
    return ({"word_tag": _eval_keys(metrics.entity_metrics(truth, per_word)),
             "all_o": _eval_keys(metrics.entity_metrics(truth, [["O"] * len(t) for t in truth]))},
            {"word_tag": "each word's most frequent training tag (words never seen: O)",
             "all_o": "every word tagged O"})


# ---------------------------------------------------------------------------------------------------- generation
def copy_pairs(task: Any, kind: str, rows: list[Row]) -> tuple[list[str], list[str]]:
    """(input, reference) per eval row that has an answer. seq2seq: the source column (without `source_prefix`)
    and the target. causal_lm, read through the run's own normalisation (launcher/train/data.normalise_row): a
    prompt and its completion, or a chat's last assistant message and the user message before it (alpaca: the
    instruction and input joined as the run joins them); text rows have no answer and are skipped."""
    if kind == "seq2seq":
        source, target = _column(task, "source_column", "source"), _column(task, "target_column", "target")
        return [str(_value(r, source)) for r in rows], [str(_value(r, target)) for r in rows]
    inputs, refs = [], []
    for row in rows:
        sample = normalise_row(row.values, row.source.format, row.source.path, row.number)
        if sample.prompt is not None and sample.completion is not None:
            inputs.append(sample.prompt)
            refs.append(sample.completion)
        elif sample.messages:
            roles = [role for role, _ in sample.messages]
            last = max((i for i, r in enumerate(roles) if r == "assistant"), default=None)
            user = None if last is None else max((i for i in range(last) if roles[i] == "user"), default=None)
            if last is not None and user is not None:
                inputs.append(sample.messages[user][1])
                refs.append(sample.messages[last][1])
    return inputs, refs


def generation(task: Any, kind: str, evals: list[Row]) -> tuple[Scored, int]:
    inputs, refs = copy_pairs(task, kind, evals)
    if not refs:
        raise DataError("no eval row has an answer to compare with (text rows have none). Fix: use "
                        "prompt_completion, alpaca or messages data with an assistant answer")
    return ({"copy_input": _eval_keys(metrics.generation_metrics(inputs, refs))},
            {"copy_input": "the input (source, prompt or last user message) given back as the answer"}), len(refs)


# ------------------------------------------------------------------------------------------------------- entry
def run_baseline(recipe: Recipe, task: Any = None) -> BaselineReport:
    """Fit and score the task's baselines on the recipe's train and eval splits.

    `task` is the recipe's task section; None reads `recipe.task`, causal_lm where the recipe has none."""
    task = task if task is not None else getattr(recipe, "task", None)
    kind = task_type(task)
    train, evals = split_rows(recipe.data)
    labels, n_eval = None, len(evals)
    if kind == "sequence_classification":
        scored, labels = classification(task, train, evals)
    elif kind == "token_classification":
        scored = tagging(task, train, evals)
    elif kind in ("seq2seq", "causal_lm"):
        scored, n_eval = generation(task, kind, evals)
    else:
        raise DataError(f"task.type {kind!r} has no baseline. Fix: use one of causal_lm, sequence_classification, "
                        f"token_classification, seq2seq")
    return BaselineReport(recipe=recipe.output.name or recipe.name, task=kind, n_train=len(train), n_eval=n_eval,
                          data_fingerprint=data_fingerprint(recipe.data), baselines=scored[0], notes=scored[1],
                          labels=labels)


def write_baseline(report: BaselineReport, run_dir: Path) -> Path:
    path = run_dir / BASELINE_FILE
    write_json_atomic(path, report.to_json())
    return path


def beside_baseline(baseline: dict[str, Any], final: dict[str, float]) -> list[str]:
    """Lines for the end of a run's log: each final eval metric the baseline has, with every baseline's value
    (`eval_f1_macro: 0.8123 (tfidf_logreg 0.4012, majority 0.1143)`)."""
    lines = []
    for key in sorted(final):
        theirs = [(name, values[key]) for name, values in baseline.get("baselines", {}).items() if key in values]
        if theirs:
            shown = ", ".join(f"{name} {value:.4f}" for name, value in theirs)
            lines.append(f"{key}: {final[key]:.4f} ({shown})")
    return lines
