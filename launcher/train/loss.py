"""The loss of a micro batch and the token counts it is normalised by (see launcher/train/trainer.py's docstring for how
a step's loss is normalised), shared by training and evaluation.

Tasks (`task.type`). Every task's loss is a sum of cross-entropies over labelled items divided by the step's count of
them, so accumulation and world size change nothing for any of them:
  - causal_lm: next-token CE, labels shifted by one (a sequence's first token is never predicted);
  - token_classification: CE of each labelled sub-token's tag (no shift: a token's logits are its own tag's);
  - seq2seq: CE of each target token (the model shifts the labels right into its decoder inputs, so logits and labels
    are aligned);
  - sequence_classification: CE of each example's class; each example counts 1.
The classification and seq2seq models compute the same cross-entropy themselves when given labels, but as a mean
(and without label smoothing for some): the sum is computed here from their logits instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a position that carries no loss."""


def count_label_tokens(labels: torch.Tensor, task: str = "causal_lm") -> int:
    """Items that carry a label: tokens after the causal shift (causal_lm), labelled tokens (token classification,
    seq2seq), examples (sequence classification: labels is [batch, 1])."""
    if task == "causal_lm":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) input tokens; packed batches carry no attention mask and are nearly pad-free."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions (fp32)."""
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)


def forward_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float,
                     fused_ce: bool, task: str = "causal_lm") -> torch.Tensor:
    """Summed loss of a micro batch. With the fused CE kernel the model computes it without materialising logits."""
    if task != "causal_lm":
        return task_loss_sum(task_forward(model, batch, task), batch["labels"], label_smoothing)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if fused_ce:
        from ftkernels.patch import set_loss_options

        set_loss_options(model, label_smoothing=label_smoothing)  # per call: training smooths, evaluation does not
        labels = batch["labels"]
        n_items = torch.tensor(max(1, count_label_tokens(labels)), device=labels.device)
        # A sequence's first label is never a target after the shift, and is not counted in n_items; but prompt
        # tuning (PEFT) prepends virtual tokens, the last of which would predict it. Masked, it is a target nowhere.
        labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, 1:]], dim=1)
        out = model(**inputs, labels=labels, num_items_in_batch=n_items, use_cache=False)
        return out.loss * n_items  # the patched loss is sum / n_items
    out = model(**inputs, use_cache=False)
    # Prompt tuning (PEFT) puts its virtual tokens before the input and returns their logits too: the last
    # labels-many positions are the input's.
    logits = out.logits[:, -batch["labels"].size(1):]
    return causal_lm_loss_sum(logits, batch["labels"], label_smoothing)


def task_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The logits of a non-causal task's micro batch: [batch, classes] (sequence classification), [batch, tokens,
    classes] (token classification) or [batch, target tokens, vocab] (seq2seq, decoder inputs from the labels)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "seq2seq":
        return model(**inputs, labels=batch["labels"], use_cache=False).logits
    return model(**inputs).logits


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum of cross-entropy over the labelled items (fp32), logits aligned with labels (no shift)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum", label_smoothing=label_smoothing)
