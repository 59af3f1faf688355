"""Task metrics, torch-free: classification, entity (token classification) and generated-text scores, and which
direction of each eval metric is better.

Both sides use them: the trainer at every evaluation (each key recorded as `eval_<key>` in metrics.jsonl) and
`launch baseline` on a login node, so the libraries (scikit-learn, seqeval, rouge-score, sacrebleu) are imported
inside the functions: importing this module costs nothing and `launch plan` stays light.

The libraries are the reference implementations people compare against (conlleval's chunking in seqeval, Google's
ROUGE, sacrebleu's standard tokenisation): hand-written versions would give figures nobody can compare.
"""

from __future__ import annotations

from typing import Literal, Sequence

Mode = Literal["min", "max"]

CLASSIFICATION_KEYS = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "precision_micro",
                       "recall_micro")
ENTITY_KEYS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
GENERATION_KEYS = ("rouge1", "rouge2", "rougeL", "bleu", "exact_match")

METRIC_MODES: dict[str, Mode] = {
    "eval_loss": "min",
    "eval_perplexity": "min",
    **{f"eval_{key}": "max" for key in (*CLASSIFICATION_KEYS, *ENTITY_KEYS, *GENERATION_KEYS)},
}
"""Every eval metric key that can appear in metrics.jsonl -> whether lower ("min") or higher ("max") is better (early
stopping, keep_best, the sweep report). The task metrics all grow with quality; only the loss and its exponential fall.
"""


def metric_mode(name: str) -> Mode:
    """Whether a lower or a higher value of the eval metric `name` is better; a clear error for an unknown name."""
    try:
        return METRIC_MODES[name]
    except KeyError:
        known = ", ".join(sorted(METRIC_MODES))
        hint = f" (did you mean eval_{name}?)" if f"eval_{name}" in METRIC_MODES else ""
        raise ValueError(f"unknown eval metric {name!r}{hint}. Known metrics: {known}") from None


def _check_pairs(first: Sequence[object], second: Sequence[object], what: str) -> None:
    if len(first) != len(second):
        raise ValueError(f"{what}: {len(first)} references but {len(second)} predictions; they must pair up")
    if not first:
        raise ValueError(f"{what}: no examples to score")


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro/micro precision, recall and F1 of single-label predictions (label ids 0..num_labels-1).

    Per class c: P_c = TP_c / (TP_c + FP_c), R_c = TP_c / (TP_c + FN_c), F1_c = 2 P_c R_c / (P_c + R_c).
    Macro averages P_c, R_c, F1_c over all num_labels classes with equal weight, so a rare class counts as much as a
    common one (what matters on imbalanced data: always answering the top class scores high accuracy, low macro F1).
    Micro pools the counts first: with one label per example every FP of one class is an FN of another, so micro
    P = R = F1 = accuracy; they are reported because people look for them.

    The classes are fixed to range(num_labels) rather than the labels seen in this batch: scikit-learn would otherwise
    average over the classes present in y_true or y_pred only, so macro figures would silently change denominator from
    one evaluation (or eval split) to the next and could not be compared. A class neither present nor predicted then
    scores 0 (zero_division=0: no division-by-zero warnings, and an undefined score never flatters the model) — keep
    every class in the eval split, or a perfect model tops out at (K - missing) / K macro F1.
    """
    _check_pairs(y_true, y_pred, "classification metrics")
    bad = sorted({int(v) for v in (*y_true, *y_pred) if not 0 <= int(v) < num_labels})
    if bad:
        raise ValueError(f"classification metrics: label ids {bad} are outside 0..{num_labels - 1} (num_labels="
                         f"{num_labels})")
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = list(range(num_labels))
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = float(p), float(r), float(f)
    return {key: out[key] for key in CLASSIFICATION_KEYS}


def entity_metrics(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 of BIO tag sequences, and token accuracy, by seqeval's default
    (conlleval) conventions.

    An entity is a maximal chunk of one type: it starts at B-X, or at an I-X that does not continue an X chunk (an I-
    without a B- still counts as an entity, as conlleval reads it), and ends before the next B-, O or change of type.
    A predicted entity is correct only when its type and both boundaries equal a true one: P = correct / predicted,
    R = correct / true, F1 = 2PR / (P + R) pooled over all sentences (micro over entities). Token accuracy is the share
    of tokens whose tag is exactly right, O included (high even for a model that finds no entity).
    """
    _check_pairs(true_tags, pred_tags, "entity metrics")
    for index, (truth, pred) in enumerate(zip(true_tags, pred_tags)):
        if len(truth) != len(pred):
            raise ValueError(f"entity metrics: sentence {index} has {len(truth)} true tags but {len(pred)} predicted")
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "entity_f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
        "entity_precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
        "entity_recall": float(recall_score(true_tags, pred_tags, zero_division=0)),
        "token_accuracy": float(accuracy_score(true_tags, pred_tags)),
    }


def normalise_answer(text: str) -> str:
    """The exact-match normalisation: surrounding whitespace dropped (a generation often ends with a newline), case
    and inner spacing kept, as the exact match at evaluation (launcher/train/evaluate.py) has always done."""
    return text.strip()


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match after `normalise_answer` on both sides."""
    return normalise_answer(prediction) == normalise_answer(reference)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (0-1, Porter stemming), corpus BLEU (0-100) and exact match (0-1) of generated text.

    ROUGE-n F = 2PR / (P + R) with P = overlapping n-grams / prediction n-grams, R = overlapping / reference n-grams
    (ROUGE-L: the longest common subsequence in place of the overlap), per example, then averaged over examples.
    rouge-score's tokeniser lowercases and keeps only [a-z0-9] runs, so text in other scripts scores 0.
    BLEU = BP * exp(mean over n=1..4 of log p_n), p_n the clipped n-gram precision pooled over the whole corpus and
    BP = min(1, exp(1 - ref_len / hyp_len)): sacrebleu's corpus BLEU with its 13a tokenisation, as papers report it
    (an average of sentence BLEUs would be a different, lower number).
    """
    _check_pairs(references, predictions, "generation metrics")
    import sacrebleu
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction): the order matters for P and R
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    n = len(predictions)
    out = {kind: totals[kind] / n for kind in kinds}
    out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    out["exact_match"] = sum(answers_match(p, r) for p, r in zip(predictions, references)) / n
    return {key: out[key] for key in GENERATION_KEYS}
