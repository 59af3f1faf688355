#!/usr/bin/env python3
"""Generate the demo-classify data set: which dish was served first, a 5-class task that word order and negation
decide and a bag of words cannot.

Each row is one short sentence about two dishes and the label is the one served first::

    {"text": "at dinner the soup did not come after the cake", "label": "soup"}
    {"text": "the cake came after the soup, and the bread was salty", "label": "soup"}

How the first dish follows from the sentence: the subject (the dish named first) was served first exactly when
the relation is `before` and not negated, or `after` and negated; otherwise the other dish was. Some rows add a
third dish in a clause that says nothing about the order (a distractor).

Why a bag of words cannot solve it:
* every class uses the same words: five dishes, `before`/`after`, `not`, the same verbs and fillers;
* the pairs are drawn symmetrically (dishes a, b drawn independently from one distribution, equal draws redrawn),
  so for any two dishes each is served first half of the time: the words present do not tell which;
* the label is the XOR of three parts (which dish is the subject, the relation, the negation), and the words that
  could tie a dish to its role (`soup came`, `soup did`) appear with `before` and `after` equally often: a linear
  model over word and bigram counts has no interaction terms for an XOR. The only bigrams spanning two parts
  (`not come`, `came before`) carry the relation and negation, not the dish.
What makes it learnable: the rule is short and fixed, the sentences are <= 20 words (< 32 tokens), and the answer is
always one of the two dishes in the relation clause; a pretrained LM reads word order and `not` directly.

Classes are imbalanced, roughly 40/25/20/10/5 % (soup/salad/bread/pasta/cake), so accuracy alone flatters a model
that favours soup; macro F1 is the figure to watch. Deterministic for a given --seed; standard library only. Eval
sentences never occur in the training file.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

DISHES = ["soup", "salad", "bread", "pasta", "cake"]
TARGET_SHARES = [0.40, 0.25, 0.20, 0.10, 0.05]
"""The label distribution aimed at, in DISHES order."""

VERBS = [("came", "did not come"), ("arrived", "did not arrive"), ("was served", "was not served")]
"""(affirmative, negated) forms of "was served"; the negated form keeps the same relation word after it."""

PREFIXES = ["", "", "at dinner ", "yesterday ", "on friday ", "at the party ", "tonight ", "at lunch "]
SUFFIXES = ["", "", " as usual", " this time", " again", " for once"]
ADJECTIVES = ["cold", "salty", "late", "good", "warm", "small"]
DISTRACTOR_SHARE = 0.4
"""Share of rows with a third dish in a clause that says nothing about the order."""


def draw_weights(targets: list[float], rounds: int = 200) -> list[float]:
    """Weights p for drawing both dishes so that the first-served labels come out in `targets` proportions.

    With a and b drawn independently from p and equal draws redrawn, P(pair {x, y}) is proportional to p_x p_y, and
    each of x, y is served first half the time, so P(label = x) = sum over y != x of p_x p_y / Z =
    p_x (1 - p_x) / Z. Solving p_x (1 - p_x) proportional to t_x by fixed-point iteration p_x <- t_x / (1 - p_x),
    renormalised, converges for shares like these (each well under 1/2)."""
    p = list(targets)
    for _ in range(rounds):
        raw = [t / (1 - q) for t, q in zip(targets, p)]
        total = sum(raw)
        p = [r / total for r in raw]
    return p


def make_row(rng: random.Random, weights: list[float]) -> dict[str, str]:
    while True:
        a, b = rng.choices(DISHES, weights=weights, k=2)
        if a != b:
            break
    first, second = (a, b) if rng.random() < 0.5 else (b, a)  # served first, served second
    relation = rng.choice(["before", "after"])
    negated = rng.random() < 0.5
    # subject first served <=> relation is "before" XOR negated
    subject_first = (relation == "before") != negated
    subject, other = (first, second) if subject_first else (second, first)
    affirmative, negative = rng.choice(VERBS)
    clause = f"the {subject} {negative if negated else affirmative} {relation} the {other}"
    if rng.random() < DISTRACTOR_SHARE:
        third = rng.choice([d for d in DISHES if d not in (a, b)])
        aside = f"the {third} was {rng.choice(ADJECTIVES)}"
        clause = f"{clause}, and {aside}" if rng.random() < 0.5 else f"{aside}, and {clause}"
    text = f"{rng.choice(PREFIXES)}{clause}{rng.choice(SUFFIXES)}"
    return {"text": text, "label": first}


def make_split(rng: random.Random, n: int, weights: list[float], avoid: set[str]) -> list[dict[str, str]]:
    """`n` rows whose texts are not in `avoid` (the training texts, for the eval split)."""
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        row = make_row(rng, weights)
        if row["text"] not in avoid:
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "demo-classify")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    weights = draw_weights(TARGET_SHARES)
    train = make_split(random.Random(f"train-{args.seed}"), args.n_train, weights, set())
    evals = make_split(random.Random(f"eval-{args.seed}"), args.n_eval, weights, {r["text"] for r in train})
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", evals)
    shares = Counter(r["label"] for r in train)
    print(f"wrote {len(train)} train and {len(evals)} eval rows to {args.out_dir}; train labels: "
          + ", ".join(f"{d} {shares[d] / len(train):.0%}" for d in DISHES))


if __name__ == "__main__":
    main()
