"""Where the CLI prints: rich on stderr (stdout carries only what scripts read: a job id, --json)."""

from __future__ import annotations

from typing import Iterable

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)


def wide_console() -> Console:
    """Tables (the memory table, runs) need the room."""
    return Console(width=max(Console().width, 132))


def error(text: str) -> None:
    console.print("[bold red]error:[/] " + escape(text))


def warnings(lines: Iterable[str]) -> None:
    """Request warnings and resume notes (`resume: 2 -> 1 ranks ...`)."""
    for line in lines:
        style = "yellow" if line.startswith("resume:") else None
        console.print(f"[{style}]{escape(line)}[/]" if style else f"[yellow]warning:[/] {escape(line)}")


def info(label: str, text: str) -> None:
    console.print(f"[bold]{label}[/] {escape(text)}")
