"""ftlaunch: fine-tune LLMs from a strict YAML recipe, locally, on N ranks, or on Slurm."""
