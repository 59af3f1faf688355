"""Evaluation: loss/perplexity over held-out examples, and greedy generations (exact match; the task metrics of
launcher/train/task_eval.py).

Both split the eval set across ranks and sum counts with the strategy (generated texts are gathered), so every rank
gets the same figure. Under a sharded strategy (FSDP, ZeRO-3) every forward pass is collective, so every rank runs the
same number of batches (a rank short of examples repeats one with weight 0) and generation keeps ranks in step with
transformers' `synced_gpus`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, TypeVar

import torch

from launcher.train.data import collate
from launcher.config.schema import EvalConfig
from launcher.strategies.base import Strategy
from launcher.train.loss import count_label_tokens, forward_loss_sum

Item = TypeVar("Item")


def rank_batches(items: Sequence[Item], strategy: Strategy, batch_size: int) -> list[tuple[list[Item], bool]]:
    """This rank's batches, as many on every rank: (batch, counts). A filler batch repeats an item and must not count."""
    mine = list(items)[strategy.rank::strategy.world_size]
    per_rank = math.ceil(len(items) / strategy.world_size)
    n_batches = math.ceil(per_rank / batch_size) if items else 0
    out: list[tuple[list[Item], bool]] = []
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        out.append((chunk, True) if chunk else ([items[0]], False))
    return out


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: Sequence[Any], pad_id: int, strategy: Strategy, device: torch.device,
              batch_size: int, max_batches: int | None, fused_ce: bool, task: str = "causal_lm") -> float:
    """Mean token cross-entropy over the eval examples (label smoothing off: it is a measurement)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for n, (chunk, counts) in enumerate(rank_batches(examples, strategy, batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        loss = forward_loss_sum(model, batch, 0.0, fused_ce, task).double()
        if counts:
            totals[0] += loss
            totals[1] += count_label_tokens(batch["labels"], task)
    loss_sum, tokens = strategy.all_reduce_sum(totals).tolist()
    return loss_sum / max(1.0, tokens)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[tuple[list[int], str]], cfg: EvalConfig,
                     strategy: Strategy, device: torch.device, encoder_decoder: bool) -> list[tuple[str, str]]:
    """(greedy answer, reference) of every eval prompt (at most `eval.max_examples`), gathered from all ranks.

    A decoder-only model continues each left-padded prompt and the answer is what follows it; an encoder-decoder
    model reads the (right-padded, masked) source and its output is the answer."""
    model.eval()
    chosen = list(prompts)[: cfg.max_examples] if cfg.max_examples else list(prompts)
    pad = tokenizer.pad_token_id
    synced = strategy.world_size > 1 and strategy.spec.collective_forward  # every rank runs every generate step
    mine: list[tuple[str, str]] = []
    for group, counts in rank_batches(chosen, strategy, cfg.generate_batch):
        width = max(len(ids) for ids, _ in group)
        if encoder_decoder:
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in group], device=device)
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in group], device=device)
        else:
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in group], device=device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in group], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=cfg.max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced)
        if not counts:
            continue
        answers = out if encoder_decoder else out[:, width:]
        mine += [(tokenizer.decode(row, skip_special_tokens=True), reference) for row, (_, reference)
                 in zip(answers, group)]
    return gather_objects(strategy, mine)


def gather_objects(strategy: Strategy, items: list[Item]) -> list[Item]:
    """Every rank's `items`, concatenated in rank order, on every rank (metrics such as corpus BLEU or entity F1 are
    not sums of per-rank parts)."""
    if strategy.world_size == 1:
        return items
    import torch.distributed as dist

    parts: list[Any] = [None] * strategy.world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
