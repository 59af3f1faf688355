"""Exit codes of `launch` and of the rank processes (`python -m launcher.train.job`, `python -m launcher.train.prepare`),
read by the Slurm task (requeue on EXIT_INTERRUPTED only) and by tests. A leaf module: both sides import it."""

EXIT_OK = 0
"""Finished (or prepared)."""

EXIT_BAD_INPUT = 2
"""Bad input: the message was printed."""

EXIT_INTERRUPTED = 3
"""Stopped by a signal after writing a checkpoint: resumable; Slurm requeues on it."""

EXIT_DIVERGED = 4
"""Non-finite losses (`optim.max_nonfinite_steps` in a row): the last good checkpoint is intact; not requeued."""

EXIT_WRITE_FAILED = 5
"""The run directory could not be written (disk full, quota, read-only): the last complete checkpoint is intact and
the partial one removed; resumable once there is room. Not requeued (the disk does not empty itself)."""

EXIT_JOB_CANCELLED = 6
"""`launch --follow`: the Slurm job was cancelled (scancel, `launch cancel`), or preempted and not requeued."""

EXIT_JOB_TIMEOUT = 7
"""`launch --follow`: the Slurm job reached its time limit with no requeue left (resumable from its checkpoint)."""

EXIT_JOB_LOST = 8
"""`launch --follow`: following stopped without an end: neither sacct nor squeue knew the job for minutes (accounting
off, or the controller forgot it), or the run never started."""

EXIT_CTRL_C = 130
"""`launch` itself stopped by Ctrl-C before a run started, or while following one (the job keeps running): the
shell's 128 + SIGINT."""
