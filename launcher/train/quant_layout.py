"""The 4-bit layout of a quantized model: described on the rank that quantized it, rebuilt on ranks that did not.

Why. A sharded strategy builds the model on the meta device on every rank but 0 and fills it from rank 0 (one copy of
the weights per node, not one per rank). For a bitsandbytes 4-bit base that is not enough: each `Linear4bit` holds
its weight as packed 4-bit codes in a float or uint8 tensor (`quant_storage`), and what those bytes mean lives beside
them in a `QuantState` (per-block absmax scales, the nf4/fp4 code book, the nested statistics of double quantization,
the original shape and dtype). That state is no parameter or buffer: a state-dict broadcast does not carry it, and a
meta rank built from the config alone has plain `nn.Linear` layers where rank 0 has `Linear4bit` ones.

So rank 0 describes every `Linear4bit` (name, features, packed shape and dtype, quantization settings, the
`QuantState` as tensors) and the other ranks replace the same modules of their meta model with `Linear4bit` layers of
that packed shape, still on meta, carrying rank 0's `QuantState`. The strategy then shards the packed weights like any
other tensor and broadcasts their bytes with the rest of the state dict. The `QuantState` itself stays whole on every
rank (a `Linear4bit` dequantizes its full gathered weight with it): about 1/64 byte per weight with double
quantization (one uint8 absmax per 64-weight block), ~1.1 GB for a 70B model, against ~35 GB of packed codes.

Chosen over torchao/torchtune's NF4 tensor subclass, which FSDP2 shards natively: that would replace bitsandbytes
for training only, while the rest of the launcher (QLoRA under DDP and ZeRO, 8-bit bases, the paged optimizers, PEFT's
`Linear4bit` LoRA layers, merging into the base) is built on bitsandbytes, whose layers already run under FSDP2 when
the packed storage has the model's float dtype (they recover the weight's `QuantState` from the module).
"""

from __future__ import annotations

from typing import Any

import torch

LAYOUT_FORMAT = 1


def _linear4bit() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Every `Linear4bit` of a quantized model and what another rank needs to rebuild it (tensors on the CPU)."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, _linear4bit()):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None) or module.quant_state
        layers.append({
            "name": name,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "packed_shape": tuple(weight.shape),
            "storage": weight.dtype,
            "compute_dtype": module.compute_dtype,
            "blocksize": weight.blocksize,
            "compress_statistics": weight.compress_statistics,
            "quant_type": weight.quant_type,
            "quant_state": {k: v.cpu() if isinstance(v, torch.Tensor) else v
                            for k, v in state.as_dict(packed=True).items()},
        })
    return {"format": LAYOUT_FORMAT, "layers": layers}


def rebuild(model: torch.nn.Module, layout: dict[str, Any], device: torch.device) -> int:
    """Replace the modules `layout` names with meta `Linear4bit` layers holding its quantization state (moved to
    `device`, where the layer will compute). Returns how many were replaced; raises if the models differ."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Params4bit

    if layout.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"4-bit layout format {layout.get('format')!r}, expected {LAYOUT_FORMAT}")
    modules = dict(model.named_modules())
    for entry in layout["layers"]:
        name = entry["name"]
        old = modules.get(name)
        if not isinstance(old, torch.nn.Linear) or (old.in_features, old.out_features) != (
                entry["in_features"], entry["out_features"]):
            raise ValueError(f"rank 0 quantized {name} ({entry['in_features']} -> {entry['out_features']}), but this "
                             f"rank's model has {type(old).__name__} there: the ranks built different models")
        new = _linear4bit()(entry["in_features"], entry["out_features"], bias=entry["bias"],
                            compute_dtype=entry["compute_dtype"], compress_statistics=entry["compress_statistics"],
                            quant_type=entry["quant_type"], quant_storage=entry["storage"], device="meta")
        state = QuantState.from_dict(dict(entry["quant_state"]), device=device)
        new.weight = Params4bit(torch.empty(entry["packed_shape"], dtype=entry["storage"], device="meta"),
                                requires_grad=False, quant_state=state, blocksize=entry["blocksize"],
                                compress_statistics=entry["compress_statistics"], quant_type=entry["quant_type"],
                                quant_storage=entry["storage"], module=new, bnb_quantized=True)
        new.quant_state = state
        if entry["bias"]:
            new.bias = torch.nn.Parameter(torch.empty_like(old.bias, device="meta"), requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
    model.is_loaded_in_4bit = True  # what PEFT and transformers read to treat the model as a 4-bit one
    return len(layout["layers"])


def move_states(model: torch.nn.Module, device: torch.device) -> None:
    """Put every `Linear4bit`'s quantization state on `device` (rank 0 quantized on the CPU; the layer computes on
    `device`, where a sharding strategy has moved its packed weight)."""
    for module in model.modules():
        if isinstance(module, _linear4bit()) and module.quant_state is not None:
            module.quant_state.to(device)  # in place (QuantState.to returns nothing)
