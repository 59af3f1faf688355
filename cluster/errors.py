"""The error every executor raises for a submission it refuses (a leaf: the CLI catches it without importing Slurm)."""


class SubmitError(Exception):
    """A run that cannot be submitted as asked: the message says why and what to change."""
