"""Fold a LoRA adapter into a base checkpoint on disk, one tensor at a time: W' = W + scale * B @ A.

Why not PEFT's `merge_and_unload`: it needs the whole base in memory, unquantized (a 70B bf16 base is 141 GB of host
RAM for an adapter of a few hundred MB). A LoRA update touches each target weight independently, so the merge can
stream: read a weight from the base's safetensors, add its low-rank update (computed in fp32, cast back to the
weight's dtype, as PEFT's merge does), write it to the output shard, drop it. Peak memory is one base shard being
written plus the adapter.

The update is PEFT's (peft/tuners/lora/layer.py, `get_delta_weight`): `scale * (B @ A)`, transposed for
`fan_in_fan_out` layers, with `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` under rsLoRA, per module where
`rank_pattern` / `alpha_pattern` override them. What this does not cover falls back to PEFT in memory
(`streamable` says why): DoRA (its magnitude vector renormalises every column), adapters that save whole modules
(`modules_to_save`), and bases not stored as safetensors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

ADAPTER_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>A|B)\.weight$")


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def _base_shards(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return [base_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = base_dir / "model.safetensors"
    return [single] if single.is_file() else []


def streamable(base_dir: Path, adapter_dir: Path) -> str | None:
    """None when the adapter can be merged by streaming; otherwise why not (the caller merges in memory)."""
    config = _adapter_config(adapter_dir)
    if config.get("peft_type") != "LORA":
        return f"adapter type {config.get('peft_type')} (only LoRA is merged by streaming)"
    if config.get("use_dora"):
        return "DoRA (its magnitude vector renormalises whole columns)"
    if config.get("modules_to_save"):
        return "the adapter saves whole modules (modules_to_save)"
    if not _base_shards(base_dir):
        return f"{base_dir} holds no safetensors weights"
    return None


def _updates(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """Base weight name -> (A, B, scale, fan_in_fan_out) for every LoRA pair of the adapter."""
    from safetensors.torch import load_file

    config = _adapter_config(adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key} in a LoRA adapter")
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    out = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {module} has lora_{''.join(pair)} without its other half")
        name = module.removeprefix(ADAPTER_PREFIX)
        short = name.split(".")[-1]
        r = _pattern(config.get("rank_pattern") or {}, name, short, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, name, short, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[f"{name}.weight"] = (pair["A"], pair["B"], float(scale), bool(config.get("fan_in_fan_out")))
    return out


def _pattern(patterns: dict[str, Any], name: str, short: str, default: Any) -> Any:
    """PEFT's per-module override: a key matching the end of the module's name (regex), else the default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name) or key == short:
            return value
    return default


def merge_streaming(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter to `out_dir` as safetensors shards named like the base's, plus its config files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    updates = _updates(adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = set()
    for shard in _base_shards(base_dir):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as reader:
            metadata = reader.metadata()
            for name in reader.keys():
                tensor = reader.get_tensor(name)
                if name in updates:
                    a, b, scale, transposed = updates[name]
                    delta = (b.float() @ a.float()) * scale
                    tensor = (tensor.float() + (delta.T if transposed else delta)).to(tensor.dtype)
                    merged.add(name)
                tensors[name] = tensor
        save_file(tensors, str(out_dir / shard.name), metadata=metadata or {"format": "pt"})
        del tensors
    missing = sorted(set(updates) - merged)
    if missing:
        raise ValueError(f"the adapter updates weights the base does not have: {', '.join(missing[:5])}")
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    return out_dir
