"""launcher/strategies/fsdp.py `read_checkpoint` (what `launch export` reads a DCP checkpoint with) against the
per-tensor `dcp.load` reference it replaced: the same names in the same order and bit-identical tensors, for a full
and a LoRA FSDP checkpoint of the tiny model written by 2 ranks, for DCP layouts FSDP2 does not write, and through
both of its paths (direct reads and the `dcp.load` fallback); and the memory budget holds (bytes of the tensors the
reader has allocated and not yet released, tracked through `torch.empty`). Speed is measured by bench/export.py,
never asserted here."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from launcher.strategies import fsdp

pytestmark = pytest.mark.slow  # 2 ranks write the checkpoints once per module (~15 s)

REPO = Path(__file__).resolve().parents[2]


def reference_read_checkpoint(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The reader as it was before batching: one `dcp.load` per tensor (re-reading the metadata each time)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / fsdp.DCP_DIR
    metadata = FileSystemReader(str(path)).read_metadata()
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith("model.") or not isinstance(meta, TensorStorageMetadata):
            continue
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load({key: tensor}, storage_reader=FileSystemReader(str(path)), no_dist=True)
        yield key.removeprefix("model."), tensor


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """OUT/{full,lora,odd}: see tests/strategies/dcp_checkpoints.py."""
    root = tmp_path_factory.mktemp("dcp")
    data = root / "train.jsonl"
    data.write_text(json.dumps({"text": "a b c"}) + "\n")
    recipes = []
    for name, method in (("full", {"name": "full"}),
                         ("lora", {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                   "target_modules": ["q_proj", "v_proj"]})):
        recipe = {"name": f"dcp-{name}", "model": {"path": str(tiny_model_dir), "dtype": "float32",
                                                   "attn_implementation": "eager"},
                  "data": {"train": {"path": str(data), "format": "text"}, "loss_on": "all"}, "method": method,
                  "output": {"root": str(root / "runs")}, "strategy": {"name": "fsdp"}}
        recipes.append(root / f"{name}.yaml")
        recipes[-1].write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).with_name("dcp_checkpoints.py")), str(root), *map(str, recipes)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def assert_same(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.is_contiguous(), name
        # Bit-identical: compare the bytes (torch.equal would call -0.0 == 0.0 and NaN != NaN).
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("name", ["full", "lora", "odd"])
def test_batched_reader_equals_the_per_tensor_reference(checkpoints: Path, name: str) -> None:
    want = list(reference_read_checkpoint(checkpoints / name))
    for budget in (fsdp.READ_BUDGET_BYTES, 1):  # one batch for the tiny model; one tensor per batch
        assert_same(list(fsdp.read_checkpoint(checkpoints / name, trainable_only=name == "lora", budget=budget)),
                    want)
    if name == "full":
        assert len(want) == 2 * 9 + 3  # 2 layers x 9 tensors, embeddings, final norm, lm_head (tied: saved twice)
        assert "model.embed_tokens.weight" in dict(want)
    elif name == "lora":
        assert {n.split(".")[-3] for n, _ in want} == {"lora_A", "lora_B"} and len(want) == 2 * 2 * 2
        assert all(t.abs().sum() > 0 for _, t in want)  # random B, not LoRA's zero init
    else:
        assert [n for n, _ in want] == ["uneven_rows", "columns", "replicated_bf16", "scalar", "empty"]


@pytest.mark.parametrize("name", ["full", "odd"])
def test_the_dcp_load_fallback_gives_the_same_tensors(checkpoints: Path, name: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks the direct reader declines (another storage format, a transform, ...) go through `dcp.load`."""
    calls: list[int] = []
    load = fsdp._dcp_load
    monkeypatch.setattr(fsdp._DirectReader, "_data_offset", lambda *args: None)
    monkeypatch.setattr(fsdp, "_dcp_load", lambda path, metadata, state: calls.append(len(state)) or
                        load(path, metadata, state))
    want = list(reference_read_checkpoint(checkpoints / name))
    for budget in (1, fsdp.READ_BUDGET_BYTES):  # a tensor per batch; one batch
        calls.clear()
        assert_same(list(fsdp.read_checkpoint(checkpoints / name, trainable_only=False, budget=budget)), want)
        assert sum(calls) == len(want) and len(calls) == (len(want) if budget == 1 else 1)  # one per batch


def test_direct_reads_need_no_dcp_load_and_read_the_metadata_once(checkpoints: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    reads: list[Any] = []
    original = FileSystemReader.read_metadata
    monkeypatch.setattr(FileSystemReader, "read_metadata", lambda self, *a, **k: reads.append(1) or original(self))
    monkeypatch.setattr(fsdp, "_dcp_load", lambda *args: pytest.fail("dcp.load used for an FSDP checkpoint"))
    for name in ("full", "lora", "odd"):
        assert list(fsdp.read_checkpoint(checkpoints / name, trainable_only=False))
    assert len(reads) == 3


@pytest.mark.parametrize("budget", [1, 2**12, 2**15, 2**30])
def test_memory_budget_bounds_the_tensors_allocated_at_once(checkpoints: Path, budget: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes allocated by the reader through `torch.empty` and not yet freed never exceed max(budget, largest
    tensor), the caller dropping each tensor once received (as `launch export` does)."""
    live = {"bytes": 0, "peak": 0, "allocations": 0}
    empty = torch.empty

    def release(nbytes: int) -> None:
        live["bytes"] -= nbytes

    def tracked(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = empty(*args, **kwargs)
        nbytes = tensor.numel() * tensor.element_size()
        live["bytes"] += nbytes
        live["peak"] = max(live["peak"], live["bytes"])
        live["allocations"] += 1
        weakref.finalize(tensor, release, nbytes)
        return tensor

    monkeypatch.setattr(torch, "empty", tracked)
    sizes = []
    for _, tensor in fsdp.read_checkpoint(checkpoints / "full", trainable_only=False, budget=budget):
        sizes.append(tensor.numel() * tensor.element_size())
        del tensor
    monkeypatch.undo()
    assert live["bytes"] == 0  # everything the reader allocated was handed out and released
    assert live["allocations"] >= len(sizes)
    assert live["peak"] <= max(budget, max(sizes))
    if budget <= max(sizes):
        assert live["peak"] < sum(sizes) / 2  # really batched (the whole model would be sum(sizes))
    else:
        assert live["peak"] == sum(sizes)  # a budget above the model: one batch
