"""The task metrics (launcher/common/metrics.py) against values worked out by hand in the comments."""

from __future__ import annotations

import pytest

from launcher.common.metrics import (
    CLASSIFICATION_KEYS, ENTITY_KEYS, GENERATION_KEYS, METRIC_MODES, answers_match, classification_metrics,
    entity_metrics, generation_metrics, metric_mode)


def test_classification_three_classes_by_hand() -> None:
    # index:   0  1  2  3  4  5
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    # class 0: TP 2 (0,1), FP 0, FN 1 (2)   -> P 1,   R 2/3, F1 2*(2/3)/(5/3) = 4/5
    # class 1: TP 1 (3),   FP 1 (2), FN 1 (4) -> P 1/2, R 1/2, F1 1/2
    # class 2: TP 1 (5),   FP 1 (4), FN 0   -> P 1/2, R 1,   F1 2*(1/2)/(3/2) = 2/3
    # micro: TP 4, FP 2, FN 2 -> P = R = F1 = 4/6 = accuracy
    got = classification_metrics(y_true, y_pred, num_labels=3)
    assert tuple(got) == CLASSIFICATION_KEYS
    expected = {
        "accuracy": 4 / 6,
        "f1_macro": (4 / 5 + 1 / 2 + 2 / 3) / 3,
        "f1_micro": 4 / 6,
        "precision_macro": (1 + 1 / 2 + 1 / 2) / 3,
        "recall_macro": (2 / 3 + 1 / 2 + 1) / 3,
        "precision_micro": 4 / 6,
        "recall_micro": 4 / 6,
    }
    assert got == pytest.approx(expected)


def test_classification_counts_an_absent_class_in_the_macro_average() -> None:
    # The same predictions with a fourth class that is neither true nor predicted: it scores 0 and the macro averages
    # are over 4 classes, so they stay comparable with evaluations where class 3 does appear.
    y_true, y_pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    got = classification_metrics(y_true, y_pred, num_labels=4)
    assert got["f1_macro"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 4)
    assert got["recall_macro"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 4)
    assert got["accuracy"] == got["f1_micro"] == pytest.approx(4 / 6)
    # Always predicting the majority class: accuracy 3/6, but macro F1 only class 0's F1 = 2*(1/2)/(3/2) = 2/3, over 3.
    majority = classification_metrics(y_true, [0] * 6, num_labels=3)
    assert majority["accuracy"] == pytest.approx(1 / 2)
    assert majority["f1_macro"] == pytest.approx((2 / 3) / 3)


def test_classification_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        classification_metrics([0, 3], [0, 1], num_labels=3)
    with pytest.raises(ValueError, match="pair up"):
        classification_metrics([0, 1], [0], num_labels=2)
    with pytest.raises(ValueError, match="no examples"):
        classification_metrics([], [], num_labels=2)


TRUE_TAGS = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC"], ["O", "O"]]
PRED_TAGS = [["B-PER", "O", "O", "B-LOC"],  # PER cut short (boundary error), LOC right
             ["B-LOC", "O", "I-MISC"],      # ORG read as LOC (type error); I-MISC without B- still starts MISC(2)
             ["B-PER", "O"]]                # a spurious PER


def test_entity_metrics_by_hand_under_conlleval_conventions() -> None:
    # true entities: PER(0-1), LOC(3) | ORG(0), MISC(2) | -           -> 4
    # predicted:     PER(0),   LOC(3) | LOC(0), MISC(2) | PER(0)      -> 5
    # correct (type and both ends): LOC(3), MISC(2)                   -> 2
    # P = 2/5, R = 2/4, F1 = 2 * 0.4 * 0.5 / 0.9 = 4/9
    # tokens right: 3 of 4 (I-PER missed) + 1 of 3 (only O) + 1 of 2 -> 5/9
    got = entity_metrics(TRUE_TAGS, PRED_TAGS)
    assert tuple(got) == ENTITY_KEYS
    assert got == pytest.approx({"entity_f1": 4 / 9, "entity_precision": 2 / 5, "entity_recall": 1 / 2,
                                 "token_accuracy": 5 / 9})
    # A strict IOB2 reading would drop the B-less I-MISC: 1 correct of 4 predicted. The default is not strict.
    assert got["entity_precision"] != pytest.approx(1 / 4)


def test_entity_metrics_perfect_and_mismatched_lengths() -> None:
    assert entity_metrics(TRUE_TAGS, TRUE_TAGS) == pytest.approx(dict.fromkeys(ENTITY_KEYS, 1.0))
    with pytest.raises(ValueError, match="sentence 1 has 3 true tags but 2"):
        entity_metrics(TRUE_TAGS, [PRED_TAGS[0], ["O", "O"], PRED_TAGS[2]])


def test_generation_metrics_identical_and_disjoint() -> None:
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert tuple(same) == GENERATION_KEYS
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0, "exact_match": 1.0})
    apart = generation_metrics(["green ideas sleep"], ["the cat sat on the mat"])
    assert apart == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu": 0.0, "exact_match": 0.0})


def test_generation_metrics_partial_overlap_by_hand() -> None:
    # prediction "the cat sat on the mat" (6 words) vs reference "the cat sat on a mat" (6 words):
    # 1-grams: the (clipped to 1), cat, sat, on, mat match       -> 5/6
    # 2-grams: the cat, cat sat, sat on of 5                      -> 3/5
    # 3-grams: the cat sat, cat sat on of 4                       -> 2/4
    # 4-grams: the cat sat on of 3                                -> 1/3
    # equal lengths: BP = 1; BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** (1/4) ~ 53.73
    # ROUGE-1 P = R = 5/6; ROUGE-2 P = R = 3/5; ROUGE-L: LCS "the cat sat on mat" = 5 -> 5/6
    got = generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    assert got["rouge1"] == pytest.approx(5 / 6)
    assert got["rouge2"] == pytest.approx(3 / 5)
    assert got["rougeL"] == pytest.approx(5 / 6)
    assert got["exact_match"] == 0.0


def test_generation_metrics_average_rouge_stem_and_exact_match() -> None:
    # Stemming on: cats -> cat, running and runs -> run, so example 1 has ROUGE-1 1.0 (without stemming: 1/3).
    # Example 2 shares no word: 0.0. ROUGE is the mean over examples: 0.5.
    got = generation_metrics(["the cats running", "green ideas"], ["the cat runs", "Paris"])
    assert got["rouge1"] == pytest.approx(0.5)
    assert got["exact_match"] == 0.0
    # Exact match keeps case and only strips the ends: " Paris\n" matches "Paris", "paris" does not.
    assert generation_metrics([" Paris\n", "paris"], ["Paris", "Paris"])["exact_match"] == pytest.approx(0.5)
    assert answers_match(" 42 ", "42") and not answers_match("4 2", "42")


def test_metric_modes() -> None:
    assert metric_mode("eval_loss") == metric_mode("eval_perplexity") == "min"
    for key in (*CLASSIFICATION_KEYS, *ENTITY_KEYS, *GENERATION_KEYS):
        assert metric_mode(f"eval_{key}") == "max", key
    with pytest.raises(ValueError, match=r"did you mean eval_f1_macro\?.*eval_accuracy"):
        metric_mode("f1_macro")
    assert all(name.startswith("eval_") for name in METRIC_MODES)
