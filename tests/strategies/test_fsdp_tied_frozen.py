"""An FSDP adapter checkpoint of a model with tied embeddings holds the adapter only: not the frozen embedding under
its tied alias `lm_head.weight` (torch's `ignore_frozen_params` drops a frozen parameter under one name only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.strategies.fsdp import DCP_DIR, FSDPStrategy

out = Path(sys.argv[1])
config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=True)
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
base = model.get_base_model()
assert base.lm_head.weight is base.model.embed_tokens.weight
strategy = FSDPStrategy(1, 0, torch.device("cpu"))
model, optimizer = strategy.wrap(model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))
model(input_ids=torch.tensor([[1, 5, 9, 20]])).logits.square().mean().backward()
optimizer.step()
strategy.save(model, optimizer, out)
strategy.load(model, optimizer, out)  # and it loads back
"""


@pytest.mark.slow
def test_adapter_checkpoint_of_a_tied_model_holds_no_frozen_weight(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = [k for k in FileSystemReader(str(tmp_path / "dcp")).read_metadata().state_dict_metadata
            if k.startswith("model.")]
    assert keys and all("lora_" in k for k in keys), keys
