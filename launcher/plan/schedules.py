"""The plan's view of the per-layer schedules: the learning rate of each depth (`optim.layer_lr_decay`) and the order
of gradual unfreezing (`method.unfreeze`), from the number of layers in the model's config.json. Torch-free.

Depth (the rank side uses the same numbering, launcher/train/layers.py): the head and the final norm are at depth 0,
layer i of L at depth L - i, the embeddings at depth L + 1; a parameter at depth d trains at lr x decay^d.
"""

from __future__ import annotations

from typing import Any

from launcher.config.schema import Recipe


def depth_label(depth: int, layers: int) -> str:
    """What sits at `depth` in a model of `layers` layers."""
    if depth == 0:
        return "head, final norm"
    if depth <= layers:
        return f"layer {layers - depth}"
    return "embeddings"


def model_layers(recipe: Recipe) -> int | None:
    """Decoder (or encoder) layers of the recipe's model, from its config.json; None when it cannot be read here."""
    from launcher.plan import memory_model as mem
    from launcher.plan.memory import UNREADABLE_CONFIG, model_config_dir

    config_dir = model_config_dir(recipe)
    if config_dir is None or not (config_dir / "config.json").is_file():
        return None
    try:
        config = mem.read_model_config(config_dir)
    except (OSError, *UNREADABLE_CONFIG):
        return None
    # transformers' own names for it (`n_layer` is GPT-2's, `num_layers` T5's), read directly so that encoders and
    # other families the memory planner does not size still show their schedules.
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 100_000:
            return value
    return None


def lr_by_depth(lr: float, decay: float, layers: int) -> list[dict[str, Any]]:
    """One row per depth, top first: {group, depth, lr}."""
    return [{"group": depth_label(d, layers), "depth": d, "lr": lr * decay ** d} for d in range(layers + 2)]


def unfreeze_order(layers: int, max_layers: int | None) -> list[str]:
    """Groups in the order they become trainable (depths that hold no trainable parameter are skipped at run time)."""
    last = layers + 1 if max_layers is None else min(max_layers, layers)
    return [depth_label(d, layers) for d in range(last + 1)]


def plan_schedules(recipe: Recipe) -> dict[str, Any] | None:
    """The plan's `schedules` entry; None when the recipe uses neither per-layer schedule."""
    decay = recipe.optim.layer_lr_decay
    unfreeze = getattr(recipe.method, "unfreeze", None)
    if decay is None and unfreeze is None:
        return None
    layers = model_layers(recipe)
    out: dict[str, Any] = {"layers": layers}
    if decay is not None:
        out["layer_lr_decay"] = decay
        out["lr_by_depth"] = lr_by_depth(recipe.optim.lr, decay, layers) if layers is not None else None
    if unfreeze is not None:
        every = (f"{unfreeze.every_steps} steps" if unfreeze.every_steps is not None
                 else f"{unfreeze.every_epochs} epoch{'s' if unfreeze.every_epochs != 1 else ''}")
        out["unfreeze"] = {"every": every, "max_layers": unfreeze.max_layers,
                           "order": unfreeze_order(layers, unfreeze.max_layers) if layers is not None else None}
    return out


def schedule_rows(schedules: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, text) rows for the printed plan: `lr by depth: head, final norm 2e-04, layer 29 1.8e-04, ...`."""
    if not schedules:
        return []
    rows: list[tuple[str, str]] = []
    if "layer_lr_decay" in schedules:
        table = schedules.get("lr_by_depth")
        if table is None:
            text = f"lr x {schedules['layer_lr_decay']}^depth (layers unknown: the model's config.json is not readable)"
        else:
            cells = [f"{row['group']} {row['lr']:.3g}" for row in table]
            text = ", ".join(_elide(cells))
        rows.append(("lr by depth", text))
    if "unfreeze" in schedules:
        unfreeze = schedules["unfreeze"]
        order = unfreeze.get("order")
        text = f"every {unfreeze['every']} one more group: " + (" -> ".join(_elide(order, "...")) if order else
                                                                  "top first (layers unknown)")
        rows.append(("gradual unfreezing", text))
    return rows


def _elide(items: list[str], gap: str = "...", keep: int = 3) -> list[str]:
    """The first `keep` and the last two items of a long list, with `gap` between."""
    return items if len(items) <= keep + 3 else [*items[:keep], gap, *items[-2:]]
