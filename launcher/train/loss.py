"""The loss of a micro batch and the token counts it is normalised by (see launcher/train/trainer.py's docstring for how
a step's loss is normalised), shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a position that carries no loss."""


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a label after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
                     fused_ce: bool) -> torch.Tensor:
    """Summed loss of a micro batch. With the fused CE kernel the model computes it without materialising logits."""
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
