"""Run code in a fresh interpreter and report which heavy packages it loaded: the planning side's promise (no torch,
transformers, ... for `launch plan`, `launch import`, `launch baseline`, the data fingerprint) checked end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "accelerate", "datasets", "trl")
"""The packages the planning side must not load (tests/test_layering.py checks the imports statically)."""
EXIT_HEAVY = 3


def run_light(code: str, *, heavy: Sequence[str] = HEAVY, cwd: Path = REPO,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` (which may set `rc`, its exit code) in a new interpreter, then exit EXIT_HEAVY if it loaded any of
    `heavy`, naming them on stderr. The repository is on the path, whatever `env` says."""
    check = (f"\nimport sys as _sys\n_loaded = [m for m in {tuple(heavy)!r} if m in _sys.modules]\n"
             "print('HEAVY', _loaded, file=_sys.stderr)\n"
             f"_sys.exit(globals().get('rc') or ({EXIT_HEAVY} if _loaded else 0))\n")
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, cwd=cwd,
                          env=environment, timeout=300)
