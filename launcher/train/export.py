"""`launch export RUN_DIR`: the latest checkpoint as a Hugging Face directory, on one CPU process.

Builds the model the run trained (base weights + method), then streams the checkpoint's tensors into it one at a time
(any strategy: DDP safetensors, FSDP DCP shards, DeepSpeed ZeRO partitions; see `checkpoint_tensors`), and writes the
adapter (PEFT format) or the full model; `--merge` folds a LoRA adapter into the base weights. Peak RAM is one copy
of the model plus what the strategy's reader holds (a memory budget of tensors for FSDP, see its `read_checkpoint`;
the file for DDP; the fp32 master partitions for ZeRO). A tensor read takes the place of the parameter's data where
it can (`_load_into`) instead of being copied into it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from launcher.train.checkpoint import COMPLETE, STATE_FILE, TrainerState, resumable_checkpoints
from launcher.config.schema import Recipe
from launcher.plan.files import load_plan

log = logging.getLogger("ftlaunch")


def export_run(run_dir: Path, merge: bool, out: Path | None, quiet: bool = False) -> Path:
    """Write the latest checkpoint of a run as one Hugging Face directory (adapter, or a merged/full model)."""
    if quiet:
        _quiet_libraries()
    return export_checkpoint(run_dir, merge=merge, out=out or run_dir / "export")


def _quiet_libraries() -> None:
    """`launch export` prints its result, not the libraries' progress bars, deprecation notes and DeepSpeed's
    accelerator guess (PEFT's merge imports DeepSpeed where it is installed; export runs on the CPU, so saying so
    before that import also keeps it from probing CUDA)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    from launcher.common.logs import silence_known_noise

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    silence_known_noise()


def export_checkpoint(run_dir: Path, merge: bool, out: Path) -> Path:
    """`out` itself becomes what `from_pretrained` loads: the merged model with `merge`, else the adapter (or the full
    model), with its model card. Written beside `out` first and renamed into place, so a failed export leaves no
    half-written `out`; with `merge` the adapter it was folded from is not kept (the run directory has it)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as staging:
        written, state, recipe = _write_outputs(run_dir, merge, Path(staging))
        chosen = written[-1].rename(Path(staging) / out.name)  # the merged model comes after its adapter
        from launcher.common.version import version
        from launcher.train.model_card import finish_outputs

        # The card names the directory: written under its final name.
        finish_outputs([chosen], recipe, state.final_results(), version())
        if out.exists():
            out.rmdir()  # empty (checked above)
        chosen.rename(out)
    return out


def write_outputs_from_checkpoint(run_dir: Path, merge: bool, out: Path, checkpoint: Path | None = None) -> list[Path]:
    """Rebuild the trained model from a complete checkpoint (default: the newest) and write its outputs under
    `out`."""
    return _write_outputs(run_dir, merge, out, checkpoint)[0]


def _write_outputs(run_dir: Path, merge: bool, out: Path,
                   checkpoint: Path | None = None) -> tuple[list[Path], TrainerState, Recipe]:
    from launcher.train.model import build_model
    from launcher.common.model_files import load_tokenizer
    from launcher.train.outputs import save_outputs
    from launcher.train.tasks import head_config, read_labels
    from launcher.strategies import checkpoint_tensors

    plan = load_plan(run_dir)
    recipe = plan.typed_recipe()
    if checkpoint is None:
        candidates = resumable_checkpoints(run_dir)
        if not candidates:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export")
        checkpoint = candidates[0]
    written_by = json.loads((checkpoint / COMPLETE).read_text() or "{}").get("strategy", plan.strategy)
    _plain_loading()
    torch.manual_seed(recipe.optim.seed)
    tokenizer = load_tokenizer(recipe.model)
    head = head_config(recipe.task, read_labels(run_dir) or recipe.task.labels, tokenizer.pad_token_id)  # see job.py
    model = build_model(recipe, torch.device("cpu"), head=head)
    _trainable_as_saved(model, recipe, checkpoint)
    # Tied weights (lm_head = embed_tokens) are one parameter under two names; checkpoints may hold either or both.
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {name for name, _ in model.named_buffers()}
    trainable_only = any(not p.requires_grad for p in params.values())
    loaded: set[int] = set()
    with torch.no_grad():
        for name, tensor in checkpoint_tensors(written_by, checkpoint, trainable_only):
            if name in buffers:
                continue  # recomputed by the model's constructor
            if name not in params:
                raise ValueError(f"{checkpoint.name}: tensor {name!r} is not a parameter of the model built from "
                                 "the recipe (was the recipe's model or method changed?)")
            _load_into(params[name], tensor)
            loaded.add(id(params[name]))
            del tensor  # one tensor at a time
    missing = len({id(p) for p in params.values() if p.requires_grad} - loaded)
    if missing > 0:
        raise ValueError(f"{checkpoint.name} lacks {missing} trainable tensors of the model")
    out.mkdir(parents=True, exist_ok=True)
    written = save_outputs(model, tokenizer, out, merge)
    log.info("exported %s from %s (%s checkpoint)", ", ".join(map(str, written)), checkpoint.name, written_by)
    return written, TrainerState(**json.loads((checkpoint / STATE_FILE).read_text())), recipe


def _trainable_as_saved(model: torch.nn.Module, recipe: Recipe, checkpoint: Path) -> None:
    """Gradual unfreezing: the checkpoint holds the groups trainable at its step; the frozen ones are still the
    pretrained weights the model was just built with, so only the saved groups are expected (and read)."""
    unfreeze = getattr(recipe.method, "unfreeze", None)
    if unfreeze is None:
        return
    from launcher.train.layers import Unfreezing

    count = json.loads((checkpoint / STATE_FILE).read_text()).get("unfrozen_groups", 0)
    unfreezing = Unfreezing(model, unfreeze, steps_per_epoch=1)
    unfreezing.apply(count or len(unfreezing.groups))


def _load_into(param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
    """Put a checkpoint tensor's values into a model parameter.

    The reader's tensor becomes the parameter's data when that changes nothing else: a plain parameter of the same
    dtype, shape and device, and a contiguous tensor owning its whole storage (not a view into a buffer other tensors
    share, which `save_pretrained` would take for tied weights). Copying instead costs a second pass over the model
    and, since `from_pretrained` maps the base weights lazily, a page fault per 4 KiB of every parameter: 0.5-0.7 s
    for a 135M model on 2 idle cores (the whole export then takes ~2.3 s), 1.7 s while another process uses them.
    Anything else (another dtype, a quantized or otherwise subclassed parameter) is copied, converting as `copy_`
    does.
    """
    owns_storage = (tensor.is_contiguous() and tensor.storage_offset() == 0
                    and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
    if (type(param) is torch.nn.Parameter and owns_storage and not tensor.requires_grad
            and (param.dtype, param.shape, param.device) == (tensor.dtype, tensor.shape, tensor.device)):
        param.data = tensor
    else:
        param.copy_(tensor)


def _plain_loading() -> None:
    """Export builds one plain CPU model: after a ZeRO-3 run in this process, transformers must stop partitioning
    weights while loading (it does so as long as the run's HfDeepSpeedConfig is registered)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
