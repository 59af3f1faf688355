"""launcher/train/export.py on its own: a run directory whose checkpoint holds known adapter weights exports exactly
those weights (and, merged, the base plus B @ A * alpha / r); refusals name what is wrong. One process, the tiny
model; the sharded formats are exported end to end in tests/integration/test_strategies.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cluster.local import LocalExecutor
from launcher.config.recipe import load_recipe
from launcher.plan.resources import Resources
from launcher.strategies.ddp import WEIGHTS_FILE, DDPStrategy
from launcher.train.checkpoint import TrainerState, save_checkpoint
from launcher.train.export import export_run
from launcher.train.model import build_model

pytestmark = pytest.mark.slow  # builds the tiny model a few times

R, ALPHA = 4, 8


def planned_run(tmp_path: Path, model_dir: Path) -> Path:
    """A run directory with its plan.json, as `launch` writes it, for a LoRA run on the tiny model."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "a b c"}) + "\n")
    recipe = {"name": "tiny-export", "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
              "data": {"train": {"path": str(data), "format": "text"}, "loss_on": "all"},
              "method": {"name": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
              "optim": {"micro_batch": 1, "max_steps": 1, "seed": 5}, "output": {"root": str(tmp_path / "runs")},
              "logging": {"progress": False, "tensorboard": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return LocalExecutor(Resources()).prepare(load_recipe(path)).run_dir


def checkpoint_known_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Save a checkpoint whose trainable tensors are random values unlike LoRA's init (B is zero at init)."""
    from launcher.plan.files import load_plan

    recipe = load_plan(run_dir).typed_recipe()
    model = build_model(recipe, torch.device("cpu"))
    strategy = DDPStrategy(1, 0, torch.device("cpu"))
    model, optimizer = strategy.wrap(model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param))
    save_checkpoint(run_dir, strategy, model, optimizer, scheduler, TrainerState(step=1), keep_last=1)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_export_writes_the_checkpointed_adapter_and_the_exact_merge(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = planned_run(tmp_path, tiny_model_dir)
    trained = checkpoint_known_weights(run_dir)
    assert len(trained) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)

    out = export_run(run_dir, merge=False, out=None)
    assert out == run_dir / "export"  # the adapter is the export directory itself
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(n.replace(".default", "") for n in trained)  # PEFT drops the adapter name
    for name, value in trained.items():
        assert torch.equal(adapter[name.replace(".default", "")], value), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == R
    assert "| steps | 1 |" in (out / "README.md").read_text()  # the model card, of the checkpoint's step

    merged_dir = export_run(run_dir, merge=True, out=tmp_path / "merged", quiet=True)
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert "library_name: transformers" in (merged_dir / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []  # the staging directory is gone
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(merged_dir / "model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = trained[f"{prefix}.lora_B.default.weight"] @ trained[f"{prefix}.lora_A.default.weight"] * (ALPHA / R)
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], base[key] + delta)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_export_refusals_name_the_problem(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = planned_run(tmp_path, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        export_run(run_dir, merge=False, out=None)

    checkpoint_known_weights(run_dir)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("someone's files")
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(run_dir, merge=False, out=taken)
    assert (taken / "keep.txt").read_text() == "someone's files"

    weights = run_dir / "checkpoints" / "step-00000001" / WEIGHTS_FILE
    tensors = load_file(str(weights))
    save_file({**tensors, "base_model.model.extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match="'base_model.model.extra.weight' is not a parameter"):
        export_run(run_dir, merge=False, out=tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.partial-*"))  # nothing half-written left
    save_file({k: v for k, v in list(tensors.items())[1:]}, str(weights))
    with pytest.raises(ValueError, match="lacks 1 trainable tensors"):
        export_run(run_dir, merge=False, out=tmp_path / "b")


def test_a_read_tensor_becomes_the_parameter_only_when_nothing_else_changes() -> None:
    """`_load_into` adopts the reader's tensor (no copy) when dtype, shape and ownership allow; otherwise it copies."""
    from launcher.train.export import _load_into

    with torch.no_grad():
        param = torch.nn.Parameter(torch.zeros(2, 3))
        owned = torch.arange(6.0).reshape(2, 3)
        _load_into(param, owned)
        assert param.data_ptr() == owned.data_ptr() and param.requires_grad

        param = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
        _load_into(param, owned)  # another dtype: converted by copy_
        assert param.dtype == torch.bfloat16 and param.data_ptr() != owned.data_ptr()
        assert torch.equal(param.float(), owned)

        flat = torch.arange(12.0)  # ZeRO-2 style: parameters are views into one flat buffer
        param = torch.nn.Parameter(torch.zeros(2, 3))
        _load_into(param, flat[6:].view(2, 3))
        assert param.data_ptr() != flat.data_ptr() + 6 * 4  # not aliased: save_pretrained would see shared tensors
        assert torch.equal(param, flat[6:].view(2, 3))
