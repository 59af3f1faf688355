"""Bottleneck adapter layers (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), and their
saved format.

Why our own module: PEFT 0.21 has no bottleneck adapters, and AdapterHub's `adapters` library (1.3.0, the newest)
requires `transformers~=4.57.6`, while this project pins transformers 5.23. The method is small: in every decoder
layer, the output y of the attention block and/or of the MLP block becomes

    y + up(act(down(y)))        down: Linear(h, b), up: Linear(b, h), both with bias

before the layer adds its residual. `up` starts at zero, so an adapted model computes exactly what its base does
until training moves it. Adapters are float32 (as PEFT keeps LoRA weights) whatever the model's dtype: the block
output is cast up for the adapter and its update cast back. They sit in the model as children of each decoder layer
(`<layer>.adapter_attention`, `<layer>.adapter_mlp`), applied by forward hooks on the blocks, so the base modules,
their names and any kernel patched into them stay as they are.

Saved format (a directory, version 1), written by `save_adapter` and read by `load_adapter`:

    bottleneck_adapter_config.json   {"format": "ftlaunch-bottleneck-adapter", "version": 1, "bottleneck": b,
                                      "placement": ["attention", "mlp"], "activation": "relu", "hidden_size": h,
                                      "num_layers": L, "model_type": ..., "base_model_name_or_path": ...}
    bottleneck_adapter.safetensors   only the adapter tensors, float32, named as in the model
                                     (`model.layers.0.adapter_attention.down.weight`, ...)

    model = AutoModelForCausalLM.from_pretrained(base)
    load_adapter(model, "RUN_DIR/adapter")        # adds the adapters and loads their weights (frozen)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

FORMAT = "ftlaunch-bottleneck-adapter"
VERSION = 1
CONFIG_FILE = "bottleneck_adapter_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
PLACEMENTS = ("attention", "mlp")
BLOCK_NAMES: dict[str, tuple[str, ...]] = {"attention": ("self_attn", "attention", "attn"),
                                           "mlp": ("mlp", "feed_forward", "block_sparse_moe")}
"""Attribute names of a decoder layer's attention and MLP blocks across transformers architectures (Llama, Mistral,
Qwen, Gemma, Phi-3: self_attn / mlp; GPT-NeoX: attention / mlp)."""
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapted model holds: the bottleneck width, where the adapters are, and their nonlinearity."""

    bottleneck: int
    placement: tuple[str, ...]
    activation: str


class BottleneckAdapter(nn.Module):
    """y -> y + up(act(down(y))), computed in float32; identity at initialisation (up = 0).

    `down` keeps nn.Linear's default (Kaiming-uniform) init: with `up` at zero the output does not depend on it, and
    a unit-scale bottleneck lets `up` learn from the first step."""

    def __init__(self, hidden: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=torch.float32)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(hidden_states.to(self.down.weight.dtype))))
        return hidden_states + delta.to(hidden_states.dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the ModuleList with `config.num_hidden_layers` entries (the rule
    launcher.train.model uses too; kept here so that loading an adapter needs this module only)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", -1)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to put adapters in")


def _block(layer: nn.Module, placement: str) -> nn.Module:
    for name in BLOCK_NAMES[placement]:
        block = getattr(layer, name, None)
        if isinstance(block, nn.Module):
            return block
    raise ValueError(f"{type(layer).__name__} has no {placement} block (looked for {', '.join(BLOCK_NAMES[placement])})")


def _hook(adapter: BottleneckAdapter) -> Callable[[nn.Module, Any, Any], Any]:
    """A forward hook putting `adapter` on a block's output (attention blocks return (output, weights))."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def add_adapters(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Freeze `model` and put a trainable adapter after each chosen block of every decoder layer (in place)."""
    if adapter_spec(model) is not None:
        raise ValueError("the model already has bottleneck adapters")
    unknown = set(spec.placement) - set(PLACEMENTS)
    if unknown or spec.activation not in ACTIVATIONS:
        raise ValueError(f"unknown placement {sorted(unknown)} or activation {spec.activation!r}")
    model.requires_grad_(False)
    hidden = int(model.config.hidden_size)
    for layer in decoder_layers(model):
        device = next(layer.parameters()).device
        for placement in spec.placement:
            adapter = BottleneckAdapter(hidden, spec.bottleneck, spec.activation).to(device)
            layer.add_module(f"adapter_{placement}", adapter)
            _block(layer, placement).register_forward_hook(_hook(adapter))
    model._ftlaunch_adapter_spec = spec  # what save_adapter writes; also marks the model as adapted
    return model


def adapter_spec(model: nn.Module) -> AdapterSpec | None:
    """The adapters a model holds, or None."""
    return getattr(model, "_ftlaunch_adapter_spec", None)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, by their names in the model."""
    spec = adapter_spec(model)
    if spec is None:
        return {}
    names = tuple(f".adapter_{p}." for p in spec.placement)
    return {name: param for name, param in model.named_parameters() if any(n in name for n in names)}


def save_adapter(model: nn.Module, directory: Path) -> Path:
    """Write the adapter (config + float32 tensors, nothing of the base model) into `directory`."""
    from safetensors.torch import save_file

    spec = adapter_spec(model)
    if spec is None:
        raise ValueError("the model has no bottleneck adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    meta = {"format": FORMAT, "version": VERSION, **asdict(spec), "placement": list(spec.placement),
            "hidden_size": int(config.hidden_size), "num_layers": int(config.num_hidden_layers),
            "model_type": getattr(config, "model_type", None),
            "base_model_name_or_path": getattr(config, "_name_or_path", None)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in adapter_state(model).items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    """The saved adapter's config, checked to be this format and a version this code reads."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}: not a bottleneck adapter saved by ftlaunch")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this code reads "
                         f"{FORMAT!r} version {VERSION}")
    return meta


def load_adapter(model: nn.Module, directory: Path, is_trainable: bool = False) -> nn.Module:
    """Put the adapter saved in `directory` into `model` (the base it was trained on, freshly loaded), in place.
    The adapters are frozen unless `is_trainable`; the base is frozen either way."""
    from safetensors.torch import load_file

    meta = read_config(directory)
    config = model.config
    if (meta["hidden_size"], meta["num_layers"]) != (config.hidden_size, config.num_hidden_layers):
        raise ValueError(f"adapter for hidden_size {meta['hidden_size']} x {meta['num_layers']} layers; the model "
                         f"has {config.hidden_size} x {config.num_hidden_layers}")
    add_adapters(model, AdapterSpec(int(meta["bottleneck"]), tuple(meta["placement"]), str(meta["activation"])))
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    params = adapter_state(model)
    if set(state) != set(params):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"{directory}: adapter tensors do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
            params[name].requires_grad_(is_trainable)
    return model
