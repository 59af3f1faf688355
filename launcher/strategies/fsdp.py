"""FSDP2: `fully_shard` per decoder layer plus the root; checkpoints through torch.distributed.checkpoint (DCP).

Units. Each decoder layer is one unit (its parameters are gathered just before its forward/backward and freed after);
the root unit holds what is left: embeddings, final norm and lm_head. FSDP2 keeps the root's parameters gathered from
its forward to its backward, so kernels that read `lm_head.weight` directly (fused CE) see the full tensor.

Loading. Rank 0 loads the pretrained weights; the other ranks build the model on the meta device (no memory), shard
it, allocate only their shards, and receive them from rank 0 (`set_model_state_dict(..., broadcast_from_rank0=True)`):
the node needs one copy of the weights in CPU memory, not one per rank. A 4-bit base (QLoRA) is quantized by rank 0
alone while it loads; the other ranks first take its 4-bit layers and their quantization state
(`share_quantized_layout`, launcher/train/quant_layout.py), so the packed weights then shard and broadcast like any
other tensor: each rank keeps 1/N of the packed codes and the (small) quantization state whole.

Checkpoints. `get_state_dict` gives the model (only trainable tensors for adapters) and optimizer state as DTensors;
`dcp.save` writes each rank's shards plus global metadata, and `dcp.load` reshards on load, so a checkpoint resumes on
any world size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from launcher.strategies.base import Strategy
from launcher.train.model import is_quantized

DCP_DIR = "dcp"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _tensor_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers by state-dict name. Not `model.state_dict()` itself: bitsandbytes adds
    each 4-bit layer's quantization state to it as extra entries (absmax, code book, ...), which the other ranks'
    sharded models have no place for (they took that state from `share_quantized_layout`)."""
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in model.state_dict().items() if name in names}


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, world_size: int, rank: int, device: torch.device, config: dict[str, Any] | None = None) -> None:
        super().__init__(world_size, rank, device, config)
        if not dist.is_initialized():
            # One rank still needs a process group: the mesh, DTensors and DCP collectives are built on one.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)

    @property
    def meta_init(self) -> bool:
        return self.world_size > 1 and self.rank != 0

    def load_device(self) -> torch.device:
        # Rank 0 keeps the full weights in CPU memory: fully_shard moves one unit's shard at a time to the GPU, and
        # set_model_state_dict broadcasts tensor by tensor, so no GPU ever holds the whole model.
        return torch.device("cpu") if self.world_size > 1 else self.device

    # ------------------------------------------------------------------------------------------------- wrapping
    def share_quantized_layout(self, model: torch.nn.Module) -> None:
        if self.world_size == 1:
            return
        from launcher.train import quant_layout

        layout = [quant_layout.describe(model) if self.is_main else None]
        dist.broadcast_object_list(layout, src=0)
        if not self.is_main:
            quant_layout.rebuild(model, layout[0], self.device)

    def _mesh(self) -> DeviceMesh:
        shard = int(self.config.get("mesh", {}).get("shard") or self.world_size)
        if shard >= self.world_size or self.world_size % shard:  # planned for another world size: shard over all
            return init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        return init_device_mesh(self.device.type, (self.world_size // shard, shard),
                                mesh_dim_names=("replicate", "shard"))

    def wrap(self, model: torch.nn.Module,
             make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from launcher.train.model import _decoder_layers

        cfg = self.config
        weights_dtype = next(model.parameters()).dtype
        param_dtype = DTYPES[cfg["param_dtype"]] if cfg.get("param_dtype") else weights_dtype
        mixed = MixedPrecisionPolicy(param_dtype=None if param_dtype == weights_dtype else param_dtype,
                                     reduce_dtype=DTYPES[cfg.get("reduce_dtype", "float32")])
        kwargs: dict[str, Any] = {
            "mesh": self._mesh(), "mp_policy": mixed,
            "offload_policy": CPUOffloadPolicy() if cfg.get("cpu_offload") else OffloadPolicy(),
        }
        broadcast = self.world_size > 1  # rank 0 holds the weights; the others are on meta
        full_state = _tensor_state(model) if broadcast and self.is_main else {}
        for layer in _decoder_layers(model):
            if cfg.get("activation_checkpointing"):
                from torch.distributed._composable import checkpoint

                checkpoint(layer)  # composable: parameter names stay as they are (checkpoints keep their keys)
            fully_shard(layer, reshard_after_forward=cfg.get("reshard_after_forward", True), **kwargs)
        fully_shard(model, **kwargs)
        if broadcast:
            if not self.is_main:
                model.to_empty(device=self.device)
            set_model_state_dict(model, full_state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            del full_state
            # Non-persistent buffers (rotary inv_freq) are in no state dict: meta ranks take rank 0's.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        if is_quantized(model):
            from launcher.train.quant_layout import move_states

            move_states(model, self.device)  # the packed shards are on the device now; their scales must follow
        return model, make_optimizer(model)

    # ---------------------------------------------------------------------------------------------------- step
    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float | None) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):  # per-shard partial norms: reduce them to the global norm
            norm = norm.full_tensor()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        options = StateDictOptions(ignore_frozen_params=_has_frozen(model))
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state}

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        dcp.save(self._state(model, optimizer), checkpoint_id=str(directory / DCP_DIR))

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        if not (directory / DCP_DIR / ".metadata").is_file():
            raise FileNotFoundError(f"{directory} holds no FSDP (DCP) checkpoint; was it written by another strategy?")
        state = self._state(model, optimizer)
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))  # reshards to this world size
        frozen = _has_frozen(model)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=frozen, strict=not frozen))

    def full_trainable_state(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: every rank must call it; rank 0 gets the full tensors (others an empty iterator)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        yield from get_model_state_dict(model, options=options).items()


def read_checkpoint(directory: Path, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Full model tensors of a DCP checkpoint, one at a time, without a process group.

    Peak memory is one unsharded tensor: each is read alone from the shard files (DCP's `dcp_to_torch_save` would
    materialise the whole state dict first).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / DCP_DIR
    metadata = FileSystemReader(str(path)).read_metadata()
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith("model.") or not isinstance(meta, TensorStorageMetadata):
            continue
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with contextlib.redirect_stdout(None):
            dcp.load({key: tensor}, storage_reader=FileSystemReader(str(path)), no_dist=True)
        yield key.removeprefix("model."), tensor
