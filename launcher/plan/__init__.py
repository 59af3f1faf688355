"""From a recipe and the resources to a checked plan: strategy resolution, cross-field checks, per-strategy configs,
the memory model and the report. Torch-free: `launch plan` and the login node import only this side."""
