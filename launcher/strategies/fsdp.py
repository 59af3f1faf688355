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
import gc
import io
import sys
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

from launcher.strategies.base import Strategy, init_one_rank_group
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
        init_one_rank_group(device)

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
        frozen = _has_frozen(model)
        model_state, optim_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=frozen))
        if frozen:
            # torch (2.13) drops a frozen parameter under the one name `named_parameters()` gives it: a tied alias
            # (lm_head.weight of a model with tied embeddings) stayed in every adapter checkpoint (108 MiB for
            # SmolLM2-135M, ~1 GB for a Llama-3 vocabulary). Checkpoints that hold it still load (strict=False).
            for name, param in model.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    model_state.pop(name, None)
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


READ_BUDGET_BYTES = 64 * 2**20
"""Default memory budget of `read_checkpoint`: bytes of output tensors allocated at a time."""


def read_checkpoint(directory: Path, trainable_only: bool,
                    budget: int = READ_BUDGET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Full model tensors of a DCP checkpoint, in the checkpoint's order, without a process group.

    Every `model.*` tensor is yielded unsharded, in the dtype it was saved in (fp32 for our runs), contiguous, and
    owned by the caller (no other reference is kept). The checkpoint holds only what training saved (for adapters:
    the trainable tensors), so `trainable_only` needs no filtering here.

    Memory bound: tensors are read in batches of consecutive tensors whose sizes add up to at most `budget` bytes (a
    tensor larger than the budget is a batch of its own), and a batch is allocated only after the previous one has
    been handed out. The reader's peak is therefore max(budget, largest tensor), plus what the caller keeps and one
    chunk's temporary where a chunk is not contiguous in the full tensor: set by the budget, not by the model or by a
    shard file (whose optimizer states are never read). Why batches at all: within a batch the reads are sorted by
    file and offset, so each shard file is read front to back; why a small default budget: reading is as fast with
    64 MiB as with 256 MiB (0.6-0.9 s for 651 MB here), and `launch export` already holds the whole model.

    Why it is fast (~50x the per-tensor `dcp.load` it replaces; bench/export.py): the `.metadata`, which also lists
    every optimizer entry, is unpickled once instead of once per tensor (0.02-0.2 s each for a 135M model with its
    Adam moments, ~300k objects). Each chunk's bytes then go from its shard file straight into the output tensor
    (`_DirectReader`), where DCP's `read_data` would `torch.load` every chunk into a fresh temporary and copy it
    (twice the memory traffic and page faults). Chunks the direct reader declines go through one `dcp.load` per
    batch, reusing the metadata.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / DCP_DIR
    metadata = _read_metadata(path)
    entries = [(key, meta) for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)]
    reader = _DirectReader(path, metadata)
    try:
        for batch in _batches(entries, budget):
            tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in batch}
            slow = reader.read(batch, tensors)
            if slow:
                _dcp_load(path, metadata, {key: tensors[key] for key in slow})
            for key, _ in batch:
                yield key.removeprefix("model."), tensors.pop(key)  # popped: the caller holds the only reference
    finally:
        reader.close()


def _read_metadata(path: Path) -> Any:
    """DCP's `.metadata`, unpickled with the garbage collector paused: the ~300k objects of a 135M model's metadata
    (optimizer entries included) trigger collections that walk the growing heap again and again (0.16 s vs 0.03 s)."""
    from torch.distributed.checkpoint import FileSystemReader

    enabled = gc.isenabled()
    gc.disable()
    try:
        return FileSystemReader(str(path)).read_metadata()
    finally:
        if enabled:
            gc.enable()


def _batches(entries: list[tuple[str, Any]], budget: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive (key, TensorStorageMetadata) entries whose tensors add up to at most `budget` bytes."""
    batch: list[tuple[str, Any]] = []
    size = 0
    for key, meta in entries:
        nbytes = meta.size.numel() * meta.properties.dtype.itemsize
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append((key, meta))
        size += nbytes
    if batch:
        yield batch


def _dcp_load(path: Path, metadata: Any, state: dict[str, torch.Tensor]) -> None:
    """DCP's own loader for `state`'s tensors, with the metadata already read (no second unpickling)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class CachedMetadataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    # Flat keys are the checkpoint's own keys: nothing to flatten (which would also make DCP guess a 2.3 format).
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    with contextlib.redirect_stdout(None):
        dcp.load(state, storage_reader=CachedMetadataReader(str(path)), planner=planner, no_dist=True)


class _FileRange(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable file: one chunk's torch.save archive.

    Parsing the archive reads ~20 small pieces near its start (data.pkl, small records) and its end (the zip
    directory): those are served from one read of each end (`EDGE` bytes), not one system call each."""

    EDGE = 4096

    def __init__(self, file: Any, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0
        self._edges: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence] + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        for begin in (0, max(0, self._length - self.EDGE)):
            if begin <= self._pos and self._pos + n <= begin + self.EDGE:
                if begin not in self._edges:
                    self._file.seek(self._start + begin)
                    self._edges[begin] = self._file.read(min(self.EDGE, self._length - begin))
                edge = self._edges[begin]
                view[:n] = edge[self._pos - begin:self._pos - begin + n]
                self._pos += n
                return n
        self._file.seek(self._start + self._pos)
        n = self._file.readinto(view[:n])
        self._pos += n
        return n


class _DirectReader:
    """Reads DCP chunks written by FileSystemWriter (torch.save format) straight into their place in a tensor.

    Per chunk, `torch.load(map_location="meta")` parses the chunk's archive header without reading its data and
    records where the storage bytes start (`_checkpoint_offset`); if the saved tensor is a plain contiguous array of
    the checkpoint's dtype and shape, its bytes are read into the output tensor's region directly (through a
    contiguous temporary when that region is strided, e.g. a chunk split along dim 1). Anything else (stream
    transforms such as compression, another storage layout, a byte order other than this machine's, a torch without
    `_checkpoint_offset`) is left to `dcp.load`.
    """

    def __init__(self, path: Path, metadata: Any) -> None:
        self._path, self._metadata = path, metadata
        self._files: dict[str, Any] = {}
        self._native_order: dict[str, bool] = {}

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def read(self, batch: list[tuple[str, Any]], tensors: dict[str, torch.Tensor]) -> list[str]:
        """Fill `tensors` from the checkpoint; the keys this reader could not handle (left for `dcp.load`)."""
        slow: list[str] = []
        reads: list[tuple[str, int, torch.Tensor]] = []
        for key, meta in batch:
            planned = self._plan(key, meta, tensors[key])
            if planned is None:
                slow.append(key)
            else:
                reads.extend(planned)
        # In file and offset order: each shard file is read front to back (what a parallel filesystem streams best).
        for relative_path, offset, region in sorted(reads, key=lambda read: read[:2]):
            if region.is_contiguous():
                self._read_exact(relative_path, offset, region)
            else:  # e.g. a chunk split along dim 1: its rows are not adjacent in the tensor
                buffer = torch.empty(region.shape, dtype=region.dtype)
                self._read_exact(relative_path, offset, buffer)
                region.copy_(buffer)
        return slow

    def _plan(self, key: str, meta: Any, tensor: torch.Tensor) -> list[tuple[str, int, torch.Tensor]] | None:
        """(file, byte offset of the chunk's elements, region of `tensor` they fill) per chunk; None: use dcp.load."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if sum(chunk.sizes.numel() for chunk in meta.chunks) != tensor.numel():
            raise ValueError(f"{self._path}: the chunks of {key!r} do not cover its {tuple(tensor.shape)} elements")
        planned = []
        for chunk in meta.chunks:
            info = self._metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
            offset = self._data_offset(info, tensor.dtype, chunk.sizes)
            if offset is None:
                return None
            region = tensor
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes)):
                region = region.narrow(dim, start, length)
            if region.numel():
                planned.append((info.relative_path, offset, region))
        return planned

    def _data_offset(self, info: Any, dtype: torch.dtype, sizes: torch.Size) -> int | None:
        """Where the chunk's elements start in its file, when they are stored as one plain array; else None."""
        if info is None or getattr(info, "transform_descriptors", None) or not self._is_native_order(info):
            return None
        try:
            saved = torch.load(_FileRange(self._file(info.relative_path), info.offset, info.length),
                               map_location="meta", weights_only=True)
        except Exception:  # not a torch.save archive: another format, which dcp.load knows how to read
            return None
        if not isinstance(saved, torch.Tensor):
            return None
        storage = saved.untyped_storage()
        start = getattr(storage, "_checkpoint_offset", None)  # set by torch.load on the meta device
        end = (saved.storage_offset() + saved.numel()) * saved.element_size()
        if (start is None or saved.dtype != dtype or saved.shape != sizes or not saved.is_contiguous()
                or end > storage.nbytes()):
            return None
        return info.offset + start + saved.storage_offset() * saved.element_size()

    def _is_native_order(self, info: Any) -> bool:
        """Whether a shard file's arrays are in this machine's byte order (one writer per file: checked once)."""
        name = info.relative_path
        if name not in self._native_order:
            try:
                archive = torch._C.PyTorchFileReader(_FileRange(self._file(name), info.offset, info.length))
                order = archive.get_record("byteorder") if archive.has_record("byteorder") else b"little"
                self._native_order[name] = order == sys.byteorder.encode()
            except Exception:  # not a torch.save archive
                self._native_order[name] = False
        return self._native_order[name]

    def _file(self, relative_path: str) -> Any:
        if relative_path not in self._files:
            self._files[relative_path] = open(self._path / relative_path, "rb", buffering=0)
        return self._files[relative_path]

    def _read_exact(self, relative_path: str, offset: int, buffer: torch.Tensor) -> None:
        file = self._file(relative_path)
        view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
        file.seek(offset)
        done = 0
        while done < len(view):  # a read returns at most ~2 GiB on Linux
            n = file.readinto(view[done:])
            if not n:
                raise EOFError(f"{self._path / relative_path}: truncated at byte {offset + done}")
            done += n
