"""Training speed as a user reads it: tokens/s over the last steps and over the run, and the time left.

Why not the last step's tokens/s: one step is noisy (a short batch, a checkpoint write, a GC pause) and the bar used to
end on "6 tok/s" while most steps ran at 70-100. Why not rich's own ETA: it estimates from the bar's updates within a
30 s window, so steps slower than that leave it at `-:--:--`.

Definitions (all on rank 0's clock):
  * step seconds: the wall time of `train_step` (forward, backward, optimizer) -- what tokens/s divides by;
  * window tokens/s = sum(tokens) / sum(step seconds) over the last `window` steps;
  * run tokens/s = the same over every step of this process (a resumed run starts counting again);
  * ETA = steps left x the mean wall time between consecutive step ends over the window: that wall time includes the
    evaluations and checkpoints that happened in the window, so the estimate accounts for them at their rate;
  * MFU (GPUs whose data-sheet peak is known) = window tokens/s x model FLOPs per token / (peak FLOP/s x ranks):
    launcher/plan/flops.py derives the FLOPs per token (what the method trains, no recomputation counted).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


def clock(seconds: float | None) -> str:
    """`1:02:03`, `4:05`; `-` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Throughput:
    total_steps: int
    window: int = 20
    _steps: deque[tuple[float, float, float]] = field(default_factory=deque)
    """(tokens, step seconds, wall time at the step's end) of the last `window` steps."""
    _tokens: float = 0.0
    _seconds: float = 0.0
    flops_per_token: float | None = None
    """Model FLOPs of one training token (launcher/plan/flops.py); None: no MFU."""
    peak_flops: float | None = None
    """Peak FLOP/s of all the ranks together (data-sheet peak per GPU x world size); None: no MFU."""

    def __post_init__(self) -> None:
        self._steps = deque(maxlen=self.window)

    def record(self, tokens: float, seconds: float, now: float | None = None) -> None:
        """One finished step: its tokens and the seconds `train_step` took."""
        self._steps.append((tokens, seconds, time.perf_counter() if now is None else now))
        self._tokens += tokens
        self._seconds += seconds

    @property
    def window_tokens_per_s(self) -> float:
        seconds = sum(s for _, s, _ in self._steps)
        return sum(t for t, _, _ in self._steps) / seconds if seconds > 0 else 0.0

    @property
    def run_tokens_per_s(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 else 0.0

    def eta_seconds(self, step: int) -> float | None:
        """Seconds until `total_steps`, from the wall time per step over the window; None before two steps."""
        if len(self._steps) < 2:
            return None
        ends = [end for _, _, end in self._steps]
        per_step = (ends[-1] - ends[0]) / (len(ends) - 1)
        return max(0, self.total_steps - step) * per_step

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation over the window, or None before a step or when the FLOPs or the peak are unknown."""
        if not self.flops_per_token or not self.peak_flops or not self._steps:
            return None
        return self.window_tokens_per_s * self.flops_per_token / self.peak_flops

    def summary(self, step: int) -> str:
        mfu = self.mfu
        return (f"{self.window_tokens_per_s:,.0f} tok/s (run {self.run_tokens_per_s:,.0f})  "
                + (f"mfu {100 * mfu:.1f}%  " if mfu is not None else "") + f"eta {clock(self.eta_seconds(step))}")
