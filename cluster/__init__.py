"""Executors and the distributed environment: where and how a planned run executes."""
