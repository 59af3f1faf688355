"""Evaluation: loss/perplexity over held-out examples, and exact match of greedy generations.

Both split the eval set across ranks and sum counts with the strategy, so every rank gets the same figure.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from launcher.data import collate
from launcher.schema import EvalConfig
from launcher.strategies.base import Strategy
from launcher.train import count_label_tokens, forward_loss_sum


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: Sequence[Any], pad_id: int, strategy: Strategy, device: torch.device,
              batch_size: int, max_batches: int | None, fused_ce: bool) -> float:
    """Mean token cross-entropy over the eval examples (label smoothing off: it is a measurement)."""
    model.eval()
    mine = list(examples)[strategy.rank::strategy.world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for n, start in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(mine[start:start + batch_size], pad_id).items()}
        totals[0] += forward_loss_sum(model, batch, 0.0, fused_ce).double()
        totals[1] += count_label_tokens(batch["labels"])
    loss_sum, tokens = strategy.all_reduce_sum(totals).tolist()
    return loss_sum / max(1.0, tokens)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[tuple[list[int], str]], cfg: EvalConfig,
                strategy: Strategy, device: torch.device) -> float:
    """Fraction of eval prompts whose greedy answer, stripped, equals the reference answer, stripped."""
    model.eval()
    chosen = list(prompts)[: cfg.max_examples] if cfg.max_examples else list(prompts)
    mine = chosen[strategy.rank::strategy.world_size]
    pad = tokenizer.pad_token_id
    correct = 0
    for start in range(0, len(mine), cfg.generate_batch):
        group = mine[start:start + cfg.generate_batch]
        width = max(len(ids) for ids, _ in group)
        # Left padding: generation continues every row from its last real token.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in group], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in group], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=cfg.max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, (_, reference) in zip(out[:, width:], group):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            correct += int(answer.strip() == reference.strip())
    totals = strategy.all_reduce_sum(torch.tensor([float(correct), float(len(mine))], device=device))
    return float(totals[0] / max(1.0, float(totals[1])))
