"""Final outputs of a run: the adapter (PEFT format) or the model, the tokenizer, a merged model, loss.png."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from launcher.common.jsonl import read_jsonl
from launcher.common.rundir import METRICS_FILE

log = logging.getLogger("ftlaunch")


def save_outputs(model: torch.nn.Module, tokenizer: Any, run_dir: Path, merge: bool) -> list[Path]:
    """Write what a user loads with `from_pretrained`: RUN_DIR/adapter (PEFT) or RUN_DIR/model, and RUN_DIR/merged."""
    from peft import PeftModel

    from launcher.train.adapters import adapter_spec, save_adapter
    from launcher.train.model import is_quantized
    from launcher.train.tasks import head_labels, write_labels

    written: list[Path] = []
    if merge and (why := unmergeable(model)) is not None:
        raise ValueError(f"cannot merge: {why}; write the adapter alone (no merge)")
    if adapter_spec(model) is not None:  # bottleneck adapters: our own format (launcher/train/adapters.py)
        save_adapter(model, run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        return [run_dir / "adapter"]
    if isinstance(model, PeftModel):
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        # A classification adapter loads onto a base built with the same head: its labels go beside it.
        write_labels(run_dir / "adapter", head_labels(model.get_base_model()))
        written.append(run_dir / "adapter")
        if merge:
            if is_quantized(model):
                # Folding a delta into packed 4/8-bit weights would re-quantize it away: merge into the base's own
                # unquantized checkpoint (policy: docs of OutputConfig.merge / QLoraMethod), streamed tensor by
                # tensor where the adapter allows it, else loaded whole on the CPU.
                _merge_into_unquantized_base(model, run_dir / "adapter", run_dir / "merged")
            else:
                model.merge_and_unload().save_pretrained(run_dir / "merged")  # folds in place: its last use
            tokenizer.save_pretrained(run_dir / "merged")
            written.append(run_dir / "merged")
    else:
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        written.append(run_dir / "model")
    return written


def unmergeable(model: torch.nn.Module) -> str | None:
    """Why the model's adapter cannot be folded into its weights, or None. Prompt and prefix tuning add virtual
    tokens, not weight updates; a bottleneck adapter's nonlinearity folds into no weight. (Plan time refuses
    `output.merge` with them; this catches `launch export --merge`.)"""
    from launcher.train.adapters import adapter_spec

    if adapter_spec(model) is not None:
        return "bottleneck adapters are nonlinear layers of their own"
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return f"{config.peft_type.value.lower()} adds virtual tokens, not weight updates"
    return None


def _merge_into_unquantized_base(model: torch.nn.Module, adapter_dir: Path, out: Path) -> None:
    """The adapter saved in `adapter_dir` merged into the trained model's base, unquantized, written to `out`.

    The result is the original-precision base plus the update, not the dequantized 4-bit weights plus the update
    (QLoRA's usual export; the two differ by the quantization error). A LoRA adapter is folded into the base's
    safetensors one tensor at a time, in the checkpoint's own dtype (launcher/train/merge_stream.py: peak RAM one
    shard); otherwise (DoRA, modules_to_save, no safetensors) the base is loaded whole on the CPU in the dtype the
    run trained in and merged by PEFT, which needs host RAM for one copy of it.
    """
    from launcher.train.merge_stream import merge_streaming, streamable

    base_model = model.get_base_model()  # type: ignore[operator]
    source = Path(base_model.config._name_or_path)
    why_not = streamable(source, adapter_dir)
    if why_not is None:
        log.info("merge: folding the adapter into %s tensor by tensor", source)
        merge_streaming(source, adapter_dir, out)
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(base_model.config, "dtype", None) or torch.float32
    log.info("merge: loading %s unquantized (%s) on CPU to fold the adapter in (not streamed: %s)", source, dtype,
             why_not)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map={"": "cpu"})
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out)


def plot_losses(run_dir: Path) -> Path | None:
    """RUN_DIR/loss.png: train loss per step and eval loss per evaluation, from metrics.jsonl."""
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("kind") == "eval" and "eval_loss" in r]
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(run_dir.name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = run_dir / "loss.png"
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
