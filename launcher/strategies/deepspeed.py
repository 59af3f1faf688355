"""DeepSpeed ZeRO 1/2/3 through DeepSpeed's engine, with the plan's resolved config (RUN_DIR/ds_config.json).

The optimizer is the trainer's torch AdamW, handed to `deepspeed.initialize`: a DeepSpeed-built Adam would compile
the fused_adam op first (minutes), and our LR scheduler drives the torch optimizer's param_groups, which ZeRO keeps
(it only swaps their params for its fp32 partitions). The engine owns accumulation, clipping and the step, so the
trainer's hooks map onto it: `no_sync` marks the accumulation boundary, `backward` is `engine.backward` (without its
1/grad_accum scaling: the trainer already normalises by the step's label tokens), `optimizer_step` is `engine.step`.

ZeRO-3 partitions the weights while `from_pretrained` loads them, which transformers does when an `HfDeepSpeedConfig`
object is alive (a manual `deepspeed.zero.Init()` fails on transformers' `_init_weights`): `model_init` creates it.

Checkpoints are DeepSpeed's own (`save_checkpoint`/`load_checkpoint`) under DIR/ds/. On another world size they are
first converted by DeepSpeed's `ds_to_universal` into DIR/ds_universal/ (once, by rank 0) and loaded as a universal
checkpoint, which DeepSpeed reshards to the new data-parallel size.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch

from launcher.plan.strategy_config import for_world_size
from launcher.strategies.base import Strategy, init_one_rank_group

log = logging.getLogger("ftlaunch")

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


def _import_deepspeed(device_type: str) -> Any:
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: DeepSpeed picks its accelerator then
    import deepspeed

    if device_type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm) when its comm
        # starts: about 60 s of g++ on a fresh machine, and a killed build leaves a lock that makes every later start
        # wait forever. Only `inference_all_reduce` uses that op; training's collectives go through the gloo process
        # group, so the op is marked unavailable and never built (DeepSpeed's own compatibility table, deepspeed/ops).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def saved_world_size(directory: Path) -> int:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint: one ZeRO optimizer file per rank."""
    return len(list((directory / TAG).glob("*optim_states.pt")))


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"  # zero1/zero2/zero3 once built
    can_skip_step = False

    def __init__(self, world_size: int, rank: int, device: torch.device, config: dict[str, Any] | None = None) -> None:
        if not config:
            raise ValueError("the DeepSpeed strategy needs the plan's strategy_config (re-plan this run)")
        super().__init__(world_size, rank, device, for_world_size(config, world_size))
        self.stage = int(self.config["zero_optimization"]["stage"])
        self.name = f"zero{self.stage}"
        self._ds = _import_deepspeed(device.type)
        # DeepSpeed reuses an existing process group; a one-rank run gets one on an in-process store, not a port.
        init_one_rank_group(device)
        self._ds.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self._hf_config: Any = None
        self.engine: Any = None

    def model_init(self) -> ContextManager[Any]:
        if self.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Kept on self: transformers only sees ZeRO-3 while this object is alive (weak reference).
            self._hf_config = HfDeepSpeedConfig(self.config)
        return contextlib.nullcontext()

    def wrap(self, model: torch.nn.Module,
             make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        optimizer = make_optimizer(model)
        self.engine, _, _, _ = self._ds.initialize(model=model, optimizer=optimizer, config=self.config)
        return self.engine, optimizer

    # ---------------------------------------------------------------------------------------------------- step
    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool) -> ContextManager[None]:
        # DeepSpeed's documented way to let the caller own accumulation: reduce (and step) only at the boundary.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
        self.engine.step()  # clips to the config's gradient_clipping (= optim.max_grad_norm), steps, zeroes grads
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float | None) -> float:
        raise NotImplementedError("DeepSpeed clips inside engine.step(); use optimizer_step")

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _adapter_only(self) -> bool:
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        # Frozen base weights are not saved with an adapter: they come from the base model again.
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=self._adapter_only())

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        saved = saved_world_size(directory)
        if saved == 0:
            raise FileNotFoundError(f"{directory} holds no DeepSpeed checkpoint; was it written by another strategy?")
        strict = not self._adapter_only()
        if saved == self.world_size:
            path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=strict,
                                                  load_lr_scheduler_states=False)
        else:
            log.info("DeepSpeed checkpoint of %d ranks, resuming on %d: converting it to a universal checkpoint",
                     saved, self.world_size)
            self._convert_to_universal(directory)
            self.engine._config.load_universal_checkpoint = True  # read by load_checkpoint and the ZeRO optimizer
            try:
                path, _ = self.engine.load_checkpoint(str(directory), tag=UNIVERSAL_TAG, load_module_strict=strict,
                                                      load_lr_scheduler_states=False)
            finally:
                self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def _convert_to_universal(self, directory: Path) -> None:
        """DeepSpeed's ds_to_universal, once per checkpoint (rank 0; the others wait), published by a rename."""
        target = directory / UNIVERSAL_TAG
        if self.is_main and not target.is_dir():
            from deepspeed.checkpoint import ds_to_universal

            tmp = directory / f".{UNIVERSAL_TAG}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            args = argparse.Namespace(input_folder=str(directory / TAG), output_folder=str(tmp),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            ds_to_universal.main(args)
            os.replace(tmp, target)
        self.barrier()

    def full_trainable_state(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError("export DeepSpeed runs from their checkpoint (launch export RUN_DIR)")


def read_checkpoint(directory: Path, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """fp32 tensors of a ZeRO checkpoint through DeepSpeed's zero_to_fp32, one materialised at a time.

    Peak RAM: zero_to_fp32 loads each rank's optimizer file in turn and keeps the fp32 master partitions of every
    rank (4 bytes x trainable parameters in all); lazy mode then materialises one merged tensor at a time instead of
    a second full fp32 copy. The Adam moments (8 bytes/param) are dropped file by file.
    """
    _import_deepspeed("cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG,
                                                     exclude_frozen_parameters=trainable_only, lazy_mode=True)
    for name in list(state):
        yield name, state.pop(name).contiguous()
