"""What a job runs on (nodes, GPUs, ranks, GPU memory): a leaf module, imported by the plan and by everything the
plan is made of (strategy configs, the memory and quantization parts) without importing the plan itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """What the job runs on."""

    nodes: int = 1
    """Number of nodes (1 = this machine)."""

    gpus_per_node: int = 0
    """GPUs per node; 0 trains on CPU."""

    procs_per_node: int = 1
    """Ranks per node: one per GPU, or `--procs` on CPU."""

    gpu_mem_bytes: int | None = None
    """Memory of one GPU (`--gpu-mem 80GiB`); None when unknown (no fits/auto choice by memory)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_node > 0 else "cpu"
