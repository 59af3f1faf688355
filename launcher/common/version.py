"""The installed ftlaunch version (`launch --version`, model cards)."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        return package_version("ftlaunch")
    except PackageNotFoundError:  # a checkout on PYTHONPATH without `pip install -e .`
        return "unknown (not installed)"
