"""Evaluation of the tasks beside causal LM, and the generation metrics of every generating task: predictions ->
the metric functions of launcher/common/metrics.py, each result recorded as `eval_<key>` in metrics.jsonl.

* sequence_classification: eval_loss (mean CE per example) and, from the argmax class of each example,
  classification_metrics (accuracy, macro/micro F1, precision, recall);
* token_classification: eval_loss (mean CE per labelled word) and, from the argmax tag on each word's first
  sub-token, entity_metrics (seqeval entity F1/precision/recall, token accuracy);
* seq2seq: eval_loss and eval_perplexity per target token, and generation_metrics (ROUGE-1/2/L, BLEU, exact match)
  of greedy generations of `eval.max_new_tokens` tokens;
* causal_lm with `eval.exact_match`: the same generation_metrics of its greedy answers (eval_exact_match as always).

Classification predictions come from the forward pass that measures the loss (one pass over the eval set, capped by
`eval.max_batches`). Across ranks, sums are all-reduced (loss, the confusion matrix) and what is not a sum (the tag
sequences, generated texts) is gathered, so every rank gets the same figures.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from launcher.config.schema import EvalConfig, Recipe
from launcher.strategies.base import Strategy
from launcher.train.data import DataBundle, collate
from launcher.train.evaluate import eval_loss, gather_objects, generate_answers, rank_batches
from launcher.train.loss import IGNORE_INDEX, count_label_tokens, task_forward, task_loss_sum


def evaluate_task(model: torch.nn.Module, tokenizer: Any, data: DataBundle, recipe: Recipe, strategy: Strategy,
                  device: torch.device) -> dict[str, float]:
    """The eval metrics of a non-causal task (see the module docstring)."""
    task = recipe.task.type
    pad = tokenizer.pad_token_id
    results: dict[str, float] = {}
    if data.eval and task in ("sequence_classification", "token_classification"):
        assert data.labels, "classification data carries its labels"
        results.update(classification_eval(model, data.eval, data.labels, pad, strategy, device, task,
                                           recipe.optim.micro_batch, recipe.eval.max_batches))  # type: ignore[arg-type]
    elif data.eval:
        loss = eval_loss(model, data.eval, pad, strategy, device, recipe.optim.micro_batch,  # type: ignore[arg-type]
                         recipe.eval.max_batches, False, task)
        results["eval_loss"] = loss
        results["eval_perplexity"] = math.exp(min(loss, 50.0))
    if task == "seq2seq" and data.eval_generation:
        results.update(generation_results(model, tokenizer, data.eval_generation, recipe.eval, strategy, device,
                                          encoder_decoder=True))
    return results


@torch.no_grad()
def classification_eval(model: torch.nn.Module, examples: Sequence[Any], labels: list[str], pad_id: int,
                        strategy: Strategy, device: torch.device, task: str, batch_size: int,
                        max_batches: int | None) -> dict[str, float]:
    """eval_loss and the task's metrics, from one forward pass per eval batch."""
    from launcher.common.metrics import classification_metrics, entity_metrics

    model.eval()
    n_labels = len(labels)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.float64, device=device)  # [true, predicted]
    tagged: list[tuple[list[int], list[int]]] = []  # token classification: (true, predicted) tag ids per example
    for n, (chunk, counts) in enumerate(rank_batches(examples, strategy, batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = task_forward(model, batch, task)  # every rank runs every batch (collective forwards)
        if not counts:
            continue
        gold = batch["labels"]
        totals[0] += task_loss_sum(logits, gold, 0.0).double()
        totals[1] += count_label_tokens(gold, task)
        predicted = logits.argmax(-1)
        if task == "sequence_classification":
            confusion.index_put_((gold[:, 0], predicted), torch.ones_like(predicted, dtype=torch.float64),
                                 accumulate=True)
        else:
            for row_gold, row_predicted in zip(gold, predicted):
                words = row_gold != IGNORE_INDEX
                tagged.append((row_gold[words].tolist(), row_predicted[words].tolist()))
    loss_sum, count = strategy.all_reduce_sum(totals).tolist()
    results = {"eval_loss": loss_sum / max(1.0, count)}
    if task == "sequence_classification":
        counts_by_pair = strategy.all_reduce_sum(confusion).round().long().cpu()
        y_true: list[int] = []
        y_pred: list[int] = []
        for (true_id, predicted_id), times in zip(torch.cartesian_prod(torch.arange(n_labels), torch.arange(n_labels))
                                                  .tolist(), counts_by_pair.flatten().tolist()):
            y_true += [true_id] * times
            y_pred += [predicted_id] * times
        if y_true:
            results.update({f"eval_{k}": v for k, v in classification_metrics(y_true, y_pred, n_labels).items()})
        return results
    everything = gather_objects(strategy, tagged)
    if everything:
        true_tags = [[labels[i] for i in gold] for gold, _ in everything]
        pred_tags = [[labels[i] for i in predicted] for _, predicted in everything]
        results.update({f"eval_{k}": v for k, v in entity_metrics(true_tags, pred_tags).items()})
    return results


def generation_results(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[tuple[list[int], str]],
                       cfg: EvalConfig, strategy: Strategy, device: torch.device,
                       encoder_decoder: bool) -> dict[str, float]:
    """generation_metrics of greedy answers to the eval prompts, as eval_<key> (eval_exact_match among them)."""
    from launcher.common.metrics import generation_metrics

    pairs = generate_answers(model, tokenizer, prompts, cfg, strategy, device, encoder_decoder)
    if not pairs:
        return {}
    metrics = generation_metrics([answer for answer, _ in pairs], [reference for _, reference in pairs])
    return {f"eval_{k}": v for k, v in metrics.items()}
