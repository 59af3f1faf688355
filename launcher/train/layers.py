"""Where each parameter sits below the top of the model, and the two schedules built on it: discriminative learning
rates (`optim.layer_lr_decay`, the optimizer's parameter groups) and gradual unfreezing (`method.unfreeze`).

Depth, counted down from the output (launcher/plan/schedules.py prints the same numbering in the plan):

    depth 0        the head (lm_head, score, classifier, a PEFT modules_to_save copy of it) and the final norm:
                   every parameter after the layer stack
    depth L - i    layer i of the L layers (the top layer, L - 1, is depth 1): its weights, or its LoRA adapters
    depth L + 1    the embeddings: every parameter before the layer stack (tied output embeddings are the input
                   embedding's parameter, so they sit here too)

"Before" and "after" follow `named_parameters()` order, which is the order modules were registered: every
transformers model registers its embeddings before its layers and its head after them. The layer stack is the one
ModuleList of `config.num_hidden_layers` modules (nested lists inside a layer, such as MoE experts, are not
candidates). Names are those of the model the strategy hands to `make_optimizer`: the unwrapped module under DDP,
the sharded one under FSDP2 (fully_shard keeps names), the plain one before DeepSpeed's engine wraps it; PEFT's
`base_model.model.` prefix is part of the stack's name, so adapters find their layer the same way.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch

from launcher.config.schema import OptimConfig, UnfreezeConfig
from launcher.plan.schedules import depth_label

log = logging.getLogger("ftlaunch")


def layer_stack(model: torch.nn.Module) -> tuple[str, int]:
    """(qualified name, length) of the model's stack of decoder/encoder layers."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{type(model).__name__}: no num_hidden_layers in its config, so its layers cannot be "
                         "numbered for optim.layer_lr_decay / method.unfreeze")
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    outer = [name for name in found if not any(name.startswith(other + ".") for other in found if other != name)]
    if len(outer) != 1:
        raise ValueError(f"{type(model).__name__}: {'no' if not outer else len(outer)} stacks of {count} layers "
                         f"({', '.join(outer) or 'none found'}); optim.layer_lr_decay and method.unfreeze need exactly "
                         "one (encoder-decoder models have two)")
    return outer[0], count


def parameter_depths(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every parameter (by name, as `named_parameters()` gives them) and the number of layers L."""
    stack, layers = layer_stack(model)
    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    depths: dict[str, int] = {}
    after_stack = False
    for name, _ in model.named_parameters():
        match = pattern.match(name)
        if match:
            depths[name] = layers - int(match.group(1))
            after_stack = True
        else:
            depths[name] = 0 if after_stack else layers + 1
    return depths, layers


# --------------------------------------------------------------------------------------------- optimizer groups
def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """The optimizer's parameter groups over the trainable parameters: weight decay on matrices only (no decay on
    biases and norm weights, the 1-D tensors), and with `layer_lr_decay` one lr per depth, lr x decay^depth.

    Without layer_lr_decay the groups are the two they always were (decay, then no decay), so checkpoints written
    before it existed load unchanged. With it, groups go top first (depth 0, full lr): the first group's lr is the
    one logged as `lr`. LambdaLR multiplies each group's own initial lr by the schedule's factor, so every depth
    follows the same warmup and decay curve at its own height.
    """
    decay = optim.layer_lr_decay
    depths = parameter_depths(model)[0] if decay is not None else {}
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(depths.get(name, 0), param.ndim < 2)].append(param)
    out = []
    for (depth, no_decay), params in sorted(groups.items()):
        group: dict = {"params": params, "weight_decay": 0.0 if no_decay else optim.weight_decay}
        if decay is not None:
            group.update(lr=optim.lr * decay ** depth, depth=depth)
        out.append(group)
    return out


# ----------------------------------------------------------------------------------------- gradual unfreezing
class Unfreezing:
    """Which of the method's trainable parameters train at each step.

    Groups are the depths that hold a parameter the method trains (requires_grad when this is built, right after
    the strategy wrapped the model and built the optimizer over all of them), top first, those deeper than
    `max_layers` left out; group k (0-based) becomes trainable after step k x interval. Everything stays in the
    optimizer: a frozen parameter gets no gradient (its grad stays None; DDP leaves a parameter unused on every rank
    untouched), and AdamW (torch's and bitsandbytes') skips a parameter whose grad is None: no moment update, no
    step count, no weight decay. Its weights stay exactly the pretrained ones until it is unfrozen, and its Adam
    state then starts from zero at that step, as if it had just been added to the optimizer.
    """

    def __init__(self, model: torch.nn.Module, cfg: UnfreezeConfig, steps_per_epoch: int) -> None:
        depths, self.layers = parameter_depths(model)
        by_depth: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
        for name, param in model.named_parameters():
            if param.requires_grad:
                by_depth[depths[name]].append(param)
        if not by_depth:
            raise ValueError("method.unfreeze: the method trains no parameter")
        self.by_depth = dict(by_depth)
        limit = cfg.max_layers
        self.groups = sorted(d for d in by_depth if limit is None or d <= limit)
        if not self.groups:
            raise ValueError(f"method.unfreeze.max_layers({limit}): no trainable parameter at depths 0..{limit}")
        self.interval = cfg.every_steps if cfg.every_steps is not None else cfg.every_epochs * steps_per_epoch

    def groups_at(self, step: int) -> int:
        """Groups trainable after `step` optimizer steps: 1 from the start, one more every `interval` steps."""
        return min(len(self.groups), 1 + step // self.interval)

    def apply(self, count: int) -> None:
        """Make the top `count` groups trainable and every other parameter the method trains frozen."""
        open_depths = set(self.groups[:count])
        for depth, params in self.by_depth.items():
            for param in params:
                param.requires_grad_(depth in open_depths)

    def label(self, index: int) -> str:
        """What group `index` (0-based) holds."""
        return depth_label(self.groups[index], self.layers)
