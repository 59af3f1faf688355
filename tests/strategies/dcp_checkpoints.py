"""Small DCP checkpoints written by 2 gloo ranks, for tests/strategies/test_fsdp_read_checkpoint.py.

    torchrun --standalone --nproc-per-node 2 tests/strategies/dcp_checkpoints.py OUT FULL_RECIPE LORA_RECIPE

OUT/full and OUT/lora: the recipe's (tiny) model through the project's save path, `FSDPStrategy.wrap` (rank 0 loads,
rank 1 builds on meta) + one AdamW step + `FSDPStrategy.save`, with every trainable weight set to random values
first (LoRA's B starts at zero); so each holds both ranks' shards of the weights and the Adam moments, and the LoRA
one only the adapter.
OUT/odd: layouts FSDP2 does not write but DCP does: a dim-0 split of unequal halves, a dim-1 split (a chunk's rows are
not adjacent in the full tensor), a replicated bf16 tensor, a 0-d tensor, an empty tensor and a non-tensor entry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from launcher.config.recipe import load_recipe
from launcher.strategies.fsdp import DCP_DIR, FSDPStrategy
from launcher.train.model import build_model


def fsdp_checkpoint(recipe_file: Path, out: Path, rank: int) -> None:
    recipe = load_recipe(recipe_file).recipe
    strategy = FSDPStrategy(2, rank, torch.device("cpu"))
    model = build_model(recipe, torch.device("cpu"), meta=strategy.meta_init)
    model, optimizer = strategy.wrap(model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))
    torch.manual_seed(100 + rank)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.to_local().copy_(torch.randn(param.to_local().shape))
    model(input_ids=torch.tensor([[1, 5, 9, 20, 33, 7]])).logits.float().square().mean().backward()
    optimizer.step()
    strategy.save(model, optimizer, out)


def odd_checkpoint(out: Path) -> None:
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(7)  # the same full tensors on both ranks: distribute_tensor takes each rank's slice
    state = {
        "model.uneven_rows": distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)]),
        "model.columns": distribute_tensor(torch.randn(3, 5), mesh, [Shard(1)]),
        "model.replicated_bf16": distribute_tensor(torch.randn(4, 2).to(torch.bfloat16), mesh, [Replicate()]),
        "model.scalar": torch.tensor(2.5),
        "model.empty": torch.empty(0, 3),
        "model.step": 5,
        "optimizer.state.x": distribute_tensor(torch.randn(6), mesh, [Shard(0)]),
    }
    dcp.save(state, checkpoint_id=str(out / DCP_DIR))


def main() -> None:
    out, full, lora = (Path(arg) for arg in sys.argv[1:4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fsdp_checkpoint(full, out / "full", rank)
    fsdp_checkpoint(lora, out / "lora", rank)
    odd_checkpoint(out / "odd")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
