"""The rank side: the job a rank runs (`python -m launcher.train.job`), data preparation, the training loop, loss,
evaluation, checkpoints, export and outputs. Imports torch; the planning side never imports it at module level."""
