"""Without triton installed, every kernel module imports and falls back to its PyTorch path."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError, as if it were not installed
import torch
from ftkernels import fused_ce, rmsnorm, rope, swiglu
assert not any(m.TRITON_AVAILABLE for m in (fused_ce, rmsnorm, rope, swiglu))
x, w = torch.randn(3, 96, requires_grad=True), torch.randn(96)
rmsnorm.rms_norm(x, w).sum().backward()
q, k, cos, sin = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
rope.apply_rotary_pos_emb(q, k, cos, sin)
swiglu.swiglu(x, x)
h = torch.randn(5, 96, requires_grad=True)
loss = fused_ce.fused_linear_cross_entropy(h, torch.randn(50, 96), torch.randint(0, 50, (5,)), chunk_size=2)
loss.backward()
print("ok")
"""


def test_kernels_import_and_run_without_triton() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
