"""A one-rank sharded run makes its process group on an in-process store: it must not need MASTER_PORT free.

Two one-rank FSDP or ZeRO runs on one machine (two CI workers, two single-GPU jobs on a workstation) both took
MASTER_PORT 29500 and the second failed with EADDRINUSE. Here the port is held by this test while the strategy starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import torch
import torch.distributed as dist

from launcher.strategies.fsdp import FSDPStrategy
from launcher.strategies.base import init_one_rank_group

FSDPStrategy(1, 0, torch.device("cpu"))
assert dist.get_world_size() == 1 and dist.get_rank() == 0
init_one_rank_group(torch.device("cpu"))  # a second strategy in the same process reuses the group
from launcher.strategies.deepspeed import _import_deepspeed

deepspeed = _import_deepspeed("cpu")
deepspeed.comm.init_distributed(dist_backend="gloo")  # as DeepSpeedStrategy does: it reuses the group, no port
assert deepspeed.comm.get_world_size() == 1
print("ok")
"""


@pytest.mark.slow
def test_one_rank_group_starts_while_master_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_RANK": "0", "GLOO_SOCKET_IFNAME": "lo",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
