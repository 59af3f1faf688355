"""`launch export RUN_DIR`: the latest checkpoint as a Hugging Face directory, on one CPU process.

Builds the model the run trained (base weights + method), copies the checkpoint's trainable tensors into it, and
writes the adapter (PEFT format) or the full model; `--merge` folds a LoRA adapter into the base weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from launcher.checkpoint import resumable_checkpoints
from launcher.plan import Plan
from launcher.rundir import read_plan
from launcher.strategies.ddp import WEIGHTS_FILE

log = logging.getLogger("ftlaunch")


def export_checkpoint(run_dir: Path, merge: bool, out: Path) -> Path:
    from launcher.model import build_model, load_tokenizer
    from launcher.outputs import save_outputs

    plan = Plan.from_json(read_plan(run_dir))
    recipe = plan.typed_recipe()
    candidates = [c for c in resumable_checkpoints(run_dir) if (c / WEIGHTS_FILE).is_file()]
    if not candidates:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    torch.manual_seed(recipe.optim.seed)
    model = build_model(recipe, torch.device("cpu"))
    params = dict(model.named_parameters())
    state = load_file(str(candidates[0] / WEIGHTS_FILE))
    with torch.no_grad():
        for name, tensor in state.items():  # one tensor at a time: peak RAM stays near one model copy
            params[name].copy_(tensor)
    out.mkdir(parents=True, exist_ok=True)
    written = save_outputs(model, load_tokenizer(recipe.model), out, merge)
    log.info("exported %s from %s", ", ".join(map(str, written)), candidates[0].name)
    return out
