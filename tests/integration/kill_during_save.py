"""Rank entry point for the crash test: `launcher.train.job`, except that rank $KILL_RANK SIGKILLs itself in the middle
of writing checkpoint number $KILL_AT_SAVE, after its strategy files are on disk and before the checkpoint is
published. Started by torchrun like the real job; nothing in the launcher knows about it.
"""

from __future__ import annotations

import os
import signal

import launcher.train.checkpoint as checkpoint
from launcher.train.job import main

_saves = 0
_rng_state = checkpoint._rng_state  # called by every rank right after strategy.save, inside save_checkpoint


def _rng_state_or_die() -> dict:
    global _saves
    _saves += 1
    if _saves == int(os.environ["KILL_AT_SAVE"]) and os.environ.get("RANK") == os.environ["KILL_RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return _rng_state()


checkpoint._rng_state = _rng_state_or_die

if __name__ == "__main__":
    raise SystemExit(main())
