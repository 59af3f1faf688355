"""Per-layer schedules and best checkpoints on the tiny model (2 layers): the optimizer's lr per depth, gradual
unfreezing (which parameters train at which step, and an exact resume in the middle of it), keep_best through pruning
with the final outputs from the best checkpoint, and early stopping on a metric where higher is better.

Runs happen in this process (`launcher.train.job.run_job`); evaluations are scripted where a test is about what the
loop does with their values, not about the values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import LocalExecutor
from launcher.config.recipe import load_recipe
from launcher.plan.resources import Resources
from tiny import sample_rows, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))


def recipe_data(tmp_path: Path, model_dir: Path, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train": [{"path": str(write_jsonl(tmp_path / "train.jsonl", sample_rows("messages", 64)))}],
                 "eval": [{"path": str(write_jsonl(tmp_path / "eval.jsonl", sample_rows("messages", 8, seed=1)))}],
                 "max_length": 64},
        "method": {"name": "full"},
        "optim": {"lr": 3e-3, "micro_batch": 4, "max_steps": 8, "warmup_steps": 0, "schedule": "constant",
                  "weight_decay": 0.1, "seed": 3},
        "eval": {"at_start": False},
        "logging": {"progress": False, "tensorboard": False},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data and key != "method" else value
    return data


def start(tmp_path: Path, model_dir: Path, **sections: Any) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(tmp_path, model_dir, **sections)))
    return LocalExecutor(Resources()).prepare(load_recipe(path)).run_dir


def run(run_dir: Path) -> int:
    from launcher.train.job import run_job

    return run_job(run_dir)


def rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def expected_depth(name: str) -> int:
    """By hand, for the tiny Llama (2 layers, untied head): the head and final norm 0, layer 1 1, layer 0 2,
    the embeddings 3; PEFT's prefix and adapter names do not change where a parameter sits."""
    if "embed_tokens" in name:
        return 3
    if ".layers.1." in name:
        return 1
    if ".layers.0." in name:
        return 2
    assert "lm_head" in name or name.endswith("model.norm.weight"), name
    return 0


# ---------------------------------------------------------------------------------------------- layer_lr_decay
@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "modules_to_save": ["lm_head"]}])
def test_layer_lr_decay_gives_each_depth_its_lr(tmp_path: Path, tiny_model_dir: Path, method: dict) -> None:
    import torch

    from launcher.config.schema import Recipe
    from launcher.train.model import build_model
    from launcher.train.trainer import lr_lambda, make_optimizer

    data = recipe_data(tmp_path, tiny_model_dir, method=method,
                       optim={"lr": 1e-3, "layer_lr_decay": 0.5, "weight_decay": 0.1, "warmup_steps": 4})
    recipe = Recipe.model_validate(data)
    model = build_model(recipe, torch.device("cpu"))
    optimizer = make_optimizer(model, recipe.optim)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable)
    seen = set()
    for name, param in trainable:
        group = group_of[id(param)]
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** expected_depth(name)), name
        assert group["weight_decay"] == (0.1 if param.ndim >= 2 else 0.0), name  # no decay on norms and biases
        seen.add(expected_depth(name))
    assert seen == ({0, 1, 2, 3} if method["name"] == "full" else {0, 1, 2})  # LoRA: adapters and the head only
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the head's first: its lr is the one logged
    # The schedule scales every group's own lr: warmup step 0 of 4 is 1/4 of each.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.optim, 100))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr / 4 for lr in scheduler.base_lrs])
    assert sorted(set(scheduler.base_lrs)) == pytest.approx([1e-3 * 0.5 ** d for d in sorted(seen, reverse=True)])


def test_without_layer_lr_decay_the_groups_are_the_two_they_were(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from launcher.config.schema import Recipe
    from launcher.train.model import build_model
    from launcher.train.trainer import make_optimizer

    recipe = Recipe.model_validate(recipe_data(tmp_path, tiny_model_dir))
    model = build_model(recipe, torch.device("cpu"))
    groups = make_optimizer(model, recipe.optim).param_groups
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 16), (0.0, 5)]
    assert all(g["lr"] == 3e-3 and "depth" not in g for g in groups)


# ---------------------------------------------------------------------------------------------- unfreezing
def test_gradual_unfreezing_schedule_and_exact_resume_in_its_middle(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    run_dir = start(tmp_path, tiny_model_dir, method={"name": "full", "unfreeze": {"every_steps": 2}},
                    optim={"max_steps": 6}, checkpoint={"every_steps": 3, "keep_last": 5})
    assert run(run_dir) == 0
    train = rows(run_dir, "train")
    # 4 groups (head+norm, layer 1, layer 0, embeddings), one more after steps 2, 4 and 6.
    assert [r["trainable_groups"] for r in train] == [1, 1, 2, 2, 3, 3]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "step 2: unfrozen layer 1 (2 of 4 groups trainable" in log
    assert "step 6: unfrozen embeddings (4 of 4 groups trainable" in log
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    ckpts = run_dir / "checkpoints"
    # A checkpoint holds the groups trainable after its step: step 3 is past the first unfreezing, not the second.
    at3 = tensors(ckpts / "step-00000003" / "trainable.safetensors")
    assert {expected_depth(n) for n in at3} == {0, 1}
    assert not (at3["lm_head.weight"] == base["lm_head.weight"]).all()  # trained from step 1
    # AdamW skipped the frozen ones entirely (weight decay 0.1 included): the embeddings, unfrozen after the last
    # step (6), are the pretrained weights bit for bit; layer 0, trained in steps 5-6, moved.
    at6 = tensors(ckpts / "step-00000006" / "trainable.safetensors")
    assert (at6["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()
    assert not (at6["model.layers.0.mlp.up_proj.weight"] == base["model.layers.0.mlp.up_proj.weight"]).all()
    assert json.loads((ckpts / "step-00000003" / "trainer_state.json").read_text())["unfrozen_groups"] == 2

    # Cut the run back to step 3 (between the unfreezings after steps 2 and 4) and resume: the same losses.
    shutil.rmtree(ckpts / "step-00000006")
    (ckpts / "latest").write_text("step-00000003\n")
    full = [r["loss"] for r in train]
    assert run(run_dir) == 0
    resumed = rows(run_dir, "train")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["trainable_groups"] for r in resumed] == [1, 1, 2, 2, 3, 3]
    assert [r["loss"] for r in resumed] == pytest.approx(full, rel=0, abs=1e-6)


@pytest.mark.parametrize("method, unfreeze, groups", [
    # Every 2 epochs of 3 steps; max_layers 1: the head and layer 1 only, layer 0 and the embeddings stay frozen.
    ({"name": "full"}, {"every_epochs": 2, "max_layers": 1}, [{0}, {0, 1}]),
    # freeze trains layer 1 and the head: those are the groups, whatever else the model has.
    ({"name": "freeze", "trainable_layers": 1, "trainable_patterns": ["lm_head"]}, {"every_epochs": 2}, [{0}, {0, 1}]),
    # LoRA without a trained head: its top group is the top layer's adapters.
    ({"name": "lora"}, {"every_epochs": 2}, [{1}, {1, 2}]),
])
def test_unfreezing_groups_by_method(tmp_path: Path, tiny_model_dir: Path, method: dict, unfreeze: dict,
                                     groups: list[set[int]]) -> None:
    import torch

    from launcher.config.schema import Recipe
    from launcher.train.layers import Unfreezing
    from launcher.train.model import build_model

    recipe = Recipe.model_validate(recipe_data(tmp_path, tiny_model_dir, method={**method, "unfreeze": unfreeze}))
    model = build_model(recipe, torch.device("cpu"))
    trained_by_method = {n for n, p in model.named_parameters() if p.requires_grad}
    unfreezing = Unfreezing(model, recipe.method.unfreeze, steps_per_epoch=3)
    assert [unfreezing.groups_at(step) for step in range(0, 14, 1)] == [1] * 6 + [2] * 8  # capped at 2 groups
    for count, depths in enumerate(groups, start=1):
        unfreezing.apply(count)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {expected_depth(n) for n in trainable} == depths
        assert trainable == {n for n in trained_by_method if expected_depth(n) in depths}


# ---------------------------------------------------------------------------------------------- best checkpoints
def scripted_evaluations(monkeypatch: pytest.MonkeyPatch, values: dict[int, dict[str, float]]) -> None:
    """Trainer.evaluate returns `values[step]`: what the loop does with results is under test, not the results."""
    from launcher.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "evaluate", lambda self: dict(values[self.state.step]))


def test_keep_best_survives_pruning_and_the_final_outputs_are_its_weights(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    losses = {1: 1.0, 2: 0.5, 3: 0.8, 4: 0.9, 5: 0.7}  # the best at step 2; the end (5) does not beat it
    scripted_evaluations(monkeypatch, {step: {"eval_loss": v} for step, v in losses.items()})
    run_dir = start(tmp_path, tiny_model_dir, optim={"max_steps": 5}, eval={"every_steps": 1},
                    checkpoint={"every_steps": 3, "keep_last": 1, "keep_best": "eval_loss", "final_from_best": True})
    assert run(run_dir) == 0
    ckpts = run_dir / "checkpoints"
    # keep_last 1 pruned steps 1 and 3; step 2 (saved because it improved, though every_steps is 3) stays.
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000002", "step-00000005"]
    best = json.loads((ckpts / "best.json").read_text())
    assert best == {"metric": "eval_loss", "mode": "min", "value": 0.5, "step": 2, "checkpoint": "step-00000002"}
    assert json.loads((run_dir / "outcome.json").read_text())["best"] == best
    outputs = tensors(run_dir / "model" / "model.safetensors")
    at2 = tensors(ckpts / "step-00000002" / "trainable.safetensors")
    at5 = tensors(ckpts / "step-00000005" / "trainable.safetensors")
    assert set(at2) == set(outputs)
    assert all((outputs[n] == at2[n]).all() for n in at2)
    assert not all((outputs[n] == at5[n]).all() for n in at5)  # ... and not the last step's
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "best eval_loss 0.5 at step 2 (checkpoints/step-00000002; the final outputs are its weights)" in log

    # Resume from the best step itself: the checkpoint's record carries on; later evaluations do not beat it.
    shutil.rmtree(ckpts / "step-00000005")
    shutil.rmtree(run_dir / "model")
    (ckpts / "latest").write_text("step-00000002\n")
    (ckpts / "best.json").unlink()  # as if the run died between `latest` and best.json: the resume rewrites it
    (run_dir / "outcome.json").unlink()
    assert run(run_dir) == 0
    assert json.loads((ckpts / "best.json").read_text()) == best
    outputs = tensors(run_dir / "model" / "model.safetensors")
    assert all((outputs[n] == at2[n]).all() for n in at2)


def test_early_stopping_on_a_metric_where_higher_is_better(tmp_path: Path, tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Better at 1 and 2, then not: patience 2 stops after the evaluation at step 4. Read as "lower is better",
    # step 2 would already be worse and the run would stop at step 3.
    matches = {1: 0.1, 2: 0.2, 3: 0.2, 4: 0.15, 5: 0.3, 6: 0.3}
    scripted_evaluations(monkeypatch, {step: {"eval_loss": 1.0, "eval_exact_match": v} for step, v in matches.items()})
    run_dir = start(tmp_path, tiny_model_dir, optim={"max_steps": 6}, eval={"every_steps": 1, "exact_match": True},
                    early_stopping={"metric": "eval_exact_match", "patience": 2},
                    checkpoint={"keep_best": "eval_exact_match"})
    assert run(run_dir) == 0
    assert rows(run_dir, "train")[-1]["step"] == 4
    assert json.loads((run_dir / "plan.json").read_text())["recipe"]["early_stopping"]["mode"] == "max"
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["value"], best["mode"]) == (2, 0.2, "max")  # a tie (step 3) is no improvement
