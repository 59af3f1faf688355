"""Streaming LoRA merge (launcher/train/merge_stream.py) against PEFT's in-memory `merge_and_unload`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def _adapter(base_dir: Path, out: Path, **lora: Any) -> Path:
    """A LoRA adapter with random (non-zero) A and B on the tiny model, saved in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(out)
    return out


def _peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize("lora, shard", [
    ({}, False),
    ({"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 32}}, True),
], ids=["plain", "rslora-patterns-sharded"])
def test_streamed_merge_equals_peft_merge(tmp_path: Path, tiny_model_dir: Path, lora: dict[str, Any],
                                          shard: bool) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher.train.merge_stream import merge_streaming, streamable

    base_dir = tiny_model_dir
    if shard:  # several shards and an index, as large checkpoints come
        base_dir = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(base_dir, max_shard_size="100KB")
        assert (base_dir / "model.safetensors.index.json").is_file()
    adapter = _adapter(base_dir, tmp_path / "adapter", **lora)
    assert streamable(base_dir, adapter) is None
    out = merge_streaming(base_dir, adapter, tmp_path / "merged")

    got: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        got.update(load_file(path))
    want = _peft_merged(base_dir, adapter)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    assert set(got) == set(want)
    changed = 0
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6)
        changed += not torch.equal(tensor, base[name])
    assert changed == 2 * 7  # every linear of the 2 layers (q, k, v, o, gate, up, down), nothing else
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # a loadable HF directory
    assert merged.config.num_hidden_layers == 2


def test_dora_is_not_streamed(tmp_path: Path, tiny_model_dir: Path) -> None:
    from launcher.train.merge_stream import streamable

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", use_dora=True)
    assert "DoRA" in (streamable(tiny_model_dir, adapter) or "")
