"""The methods beside LoRA on the tiny Llama: prompt tuning, prefix tuning, IA3 (PEFT) and bottleneck adapters
(launcher/train/adapters.py). Each learns end to end, its saved adapter reloads to the trained model's logits, the
planner counts its trainable parameters exactly, and a resume is exact.

Runs go through `launcher.train.job.run_job` in this process (see tests/train/test_train.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from test_train import make_recipe, metrics, run, start_run

pytestmark = pytest.mark.slow

METHODS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 6, "init_text": "reverse the word"},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 6, "projection": True,
                      "encoder_hidden_size": 32},
    "ia3": {"name": "ia3", "modules_to_save": ["lm_head"]},
    "adapter": {"name": "adapter", "bottleneck": 16},
}
"""One configuration per method, each exercising its less common options (init text, the projection MLP)."""

COUNTED: list[dict[str, Any]] = [
    *METHODS.values(),
    {"name": "prompt_tuning", "num_virtual_tokens": 5},
    {"name": "prefix_tuning", "num_virtual_tokens": 5},
    {"name": "ia3"},
    {"name": "ia3", "target_modules": ["q_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj"]},
    {"name": "adapter", "placement": ["mlp"], "reduction_factor": 8, "activation": "gelu"},
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def recipe_obj(model_dir: Path, method: dict[str, Any], **extra: Any) -> Any:
    from launcher.config.schema import Recipe

    return Recipe.model_validate({"model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager",
                                            **extra}, "data": {"train": [{"path": "unused.jsonl"}]},
                                  "method": method})


def sample_batch(tokenizer: Any) -> dict[str, Any]:
    """Two prompts of different lengths, right-padded as training pads them."""
    from launcher.train.data import Example, collate

    rows = [tokenizer("reverse moon = noom")["input_ids"], tokenizer("reverse sun")["input_ids"]]
    return collate([Example(input_ids=ids, labels=list(ids)) for ids in rows], tokenizer.pad_token_id)


def trained_recipe(run_dir: Path) -> Any:
    from launcher.plan.files import load_plan

    return load_plan(run_dir).typed_recipe()


def trained_model(run_dir: Path) -> Any:
    """The model of a finished run rebuilt from its last checkpoint (every trainable tensor, the prefix MLP too)."""
    import torch
    from safetensors.torch import load_file

    from launcher.train.checkpoint import resumable_checkpoints
    from launcher.train.model import build_model

    model = build_model(trained_recipe(run_dir), torch.device("cpu"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(resumable_checkpoints(run_dir)[0] / "trainable.safetensors")).items():
            params[name].copy_(tensor)
    return model.eval()


def reloaded_model(run_dir: Path, model_dir: Path, method: str) -> Any:
    """The saved adapter on a freshly loaded base, the way a user loads it."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    if method == "adapter":
        from launcher.train.adapters import load_adapter

        return load_adapter(base, run_dir / "adapter").eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, run_dir / "adapter").eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_and_its_adapter_reloads(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
                                                    method: str) -> None:
    import torch

    from launcher.train.model import build_model

    # Prompt tuning's usual learning rate is large (Lester et al.: 0.3). A random tiny model's near-uniform output
    # moves little through virtual tokens alone; the loss still falls clearly (by 0.15 for prompt tuning, 0.4 for
    # prefix tuning and adapters; IA3 trains lm_head too).
    lr = 0.3 if method == "prompt_tuning" else 3e-2
    virtual = method in ("prompt_tuning", "prefix_tuning")  # generation goes through PEFT's virtual tokens
    run_dir = start_run(make_recipe(tmp_path, tiny_model_dir, method=METHODS[method],
                                    optim={"lr": lr, "max_steps": 12, "schedule": "constant"},
                                    eval={"exact_match": virtual, "max_examples": 4, "max_new_tokens": 4}))
    assert run(run_dir) == 0
    evals = metrics(run_dir, "eval")
    print(method, [round(e["eval_loss"], 3) for e in evals])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1, evals
    assert not virtual or all(0.0 <= e["eval_exact_match"] <= 1.0 for e in evals)
    train = [r["loss"] for r in metrics(run_dir, "train")]
    assert sum(train[-3:]) < sum(train[:3])
    saved = {p.name for p in (run_dir / "adapter").iterdir()}
    assert ("bottleneck_adapter.safetensors" if method == "adapter" else "adapter_model.safetensors") in saved
    assert not (run_dir / "model").exists()  # the base is not written again

    trained = trained_model(run_dir)
    torch.manual_seed(3)  # the recipe's optim.seed: the adapter as the run initialised it
    initial = dict(build_model(trained_recipe(run_dir), torch.device("cpu")).named_parameters())
    unchanged = [torch.equal(param, initial[name]) for name, param in trained.named_parameters() if param.requires_grad]
    assert unchanged and not any(unchanged), "every trainable tensor (adapter, projection MLP, IA3 vectors) is trained"

    batch = sample_batch(tiny_tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = trained(**inputs).logits
        got = reloaded_model(run_dir, tiny_model_dir, method)(**inputs).logits
    real = batch["attention_mask"].bool()
    n_virtual = got.size(1) - batch["input_ids"].size(1)  # prompt tuning returns its virtual tokens' logits too
    assert got.shape == expected.shape
    assert torch.allclose(got[:, n_virtual:][real], expected[:, n_virtual:][real], atol=1e-5)

    # `launch export` writes the same adapter from the checkpoint; merging is refused but for IA3, whose merged
    # model computes what the adapter does.
    from launcher.train.export import export_checkpoint

    if method != "ia3":
        with pytest.raises(ValueError, match="cannot merge"):
            export_checkpoint(run_dir, merge=True, out=tmp_path / "merged")
        return
    export_checkpoint(run_dir, merge=True, out=tmp_path / "export")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits[real], expected[real], atol=1e-4)


def test_trainable_counts_match_the_planner(tiny_model_dir: Path) -> None:
    """launcher/plan/method_params.py's counts equal the real models' (PEFT's, ours), for every method and option."""
    import torch

    from launcher.plan import memory_model as mem
    from launcher.plan.memory import training_arguments
    from launcher.train.model import build_model, count_parameters

    counts = mem.count_parameters(mem.read_model_config(tiny_model_dir))
    for method in COUNTED:
        recipe = recipe_obj(tiny_model_dir, method)
        model = build_model(recipe, torch.device("cpu"))
        trainable, _ = count_parameters(model)
        assert training_arguments(recipe, counts)["trainable_params"] == trainable, method


def test_ia3_defaults_agree_with_peft() -> None:
    """Where PEFT has (IA)^3 defaults for an architecture, ours are the same (Mixtral excepted: PEFT's `w2` matches
    no module of transformers 5's fused experts)."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    from launcher.plan.method_params import IA3_DEFAULTS

    shared = (set(TARGETS) & set(IA3_DEFAULTS)) - {"mixtral"}
    assert len(shared) >= 7
    for model_type in shared:
        assert IA3_DEFAULTS[model_type] == (tuple(TARGETS[model_type]), tuple(FEEDFORWARD[model_type])), model_type


def test_adapter_starts_as_identity_and_reloads(tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    """A fresh bottleneck adapter changes no logit (up-projection at zero); once changed, save/load round-trips it
    and a wrong directory or model is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.train.adapters import CONFIG_FILE, AdapterSpec, add_adapters, load_adapter, save_adapter

    batch = sample_batch(tiny_tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = base(**inputs).logits
        model = add_adapters(base, AdapterSpec(8, ("attention", "mlp"), "silu"))
        assert torch.equal(model(**inputs).logits, plain)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert len(trainable) == 2 * 2 * 4 and all(".adapter_" in name for name in trainable)
        for name, param in model.named_parameters():
            if ".up." in name:
                param.normal_(std=0.1)
        adapted = model(**inputs).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)
    save_adapter(model, tmp_path / "a")
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, adapted)
    assert not any(p.requires_grad for p in reloaded.parameters())
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match="hidden_size 32"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_fused_kernels_give_the_same_loss_with_virtual_tokens(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                              method: str) -> None:
    """Prompt and prefix tuning under `kernels: all` (PyTorch paths on CPU): the fused loss equals the eager one on
    the same model, so the virtual tokens' label padding (PEFT) and the fused CE agree."""
    import torch

    from launcher.train.loss import forward_loss_sum
    from launcher.train.model import build_model

    torch.manual_seed(0)
    recipe = recipe_obj(tiny_model_dir, METHODS[method]).model_copy(update={"kernels": "all"})
    model = build_model(recipe, torch.device("cpu")).eval()
    batch = sample_batch(tiny_tokenizer)
    with torch.no_grad():
        fused = forward_loss_sum(model, batch, 0.0, fused_ce=True)
        eager = forward_loss_sum(model, batch, 0.0, fused_ce=False)
    assert torch.allclose(fused, eager, rtol=1e-4), (fused, eager)


def test_resume_of_prefix_tuning_is_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    """2N steps == N steps + resume + N steps for prefix tuning with its projection MLP (which only the checkpoint
    holds: the saved adapter keeps the projected prefix)."""
    recipe = make_recipe(tmp_path, tiny_model_dir, method=METHODS["prefix_tuning"],
                         optim={"lr": 1e-2, "max_steps": 6, "grad_accum": 2, "micro_batch": 2},
                         checkpoint={"every_steps": 3, "keep_last": 5}, eval={"at_start": False})
    run_dir = start_run(recipe)
    assert run(run_dir) == 0
    full = [r["loss"] for r in metrics(run_dir, "train")]
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step-00000006")
    (ckpts / "latest").write_text("step-00000003\n")
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train" and json.loads(line)["step"] <= 3]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert run(run_dir) == 0
    resumed = [r["loss"] for r in metrics(run_dir, "train")]
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 7))
    assert resumed == pytest.approx(full, rel=0, abs=1e-6)
