"""The parts every section of the translation uses: the result (Translation, Mapped), where paths are looked
up (Paths), where keys were written (locate), and the Builder that collects recipe values and reasons."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn

from launcher.config.recipe import KeyPath, Location, Problem, RecipeError


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REMOTE = ("s3://", "gs://", "gcs://", "http://", "https://", "hf://")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")
EMPTY = "empty: nothing to translate"
OFF = "false: off, as in ftlaunch"


# ------------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Mapped:
    """One translated value: an axolotl key set a recipe key."""

    source: str
    """The axolotl key path (`lora_r`, `datasets.0.type`, `deepspeed.zero_optimization.stage`)."""

    target: str
    """The recipe key path (`method.r`, `data.train.0.format`)."""

    value: Any


@dataclass
class Translation:
    """What `translate` returns."""

    recipe: dict[str, Any]
    """The recipe as plain data (validate it with launcher.config.recipe before use)."""

    translated: list[Mapped] = field(default_factory=list)
    untranslated: list[tuple[str, str]] = field(default_factory=list)
    """(axolotl key path, why it was not translated)."""

    notes: list[str] = field(default_factory=list)
    """What the user should know or do (download a hub model, a semantic difference)."""

    def source_of(self, target: str) -> Mapped | None:
        """The row that set the recipe key `target` or its nearest parent (for errors found by the schema)."""
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            for row in reversed(self.translated):
                if row.target == prefix:
                    return row
        return None


@dataclass(frozen=True)
class Paths:
    """Where axolotl's relative paths are looked up, and where the recipe will be written."""

    search: tuple[Path, ...]
    """Directories tried in order: axolotl resolves paths against its working directory, so the current directory
    first, then the config's directory."""

    recipe_dir: Path
    """The recipe's directory: local paths are written relative to it (the recipe loader resolves them from there)."""

    def locate(self, text: str) -> Path | None:
        """The existing file or directory `text` names, or None."""
        try:
            path = Path(text).expanduser()
            candidates = [path] if path.is_absolute() else [base / path for base in self.search]
            return next((c.resolve() for c in candidates if c.exists()), None)
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, `~nobody`: the schema says why
            return None

    def missing(self, text: str) -> Path:
        """Where a local path that does not exist yet would be (the first search directory)."""
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # `~user` of no user
            path = Path(text)
        return path if path.is_absolute() else Path(os.path.abspath(self.search[0] / path))

    def for_recipe(self, path: Path) -> str:
        """`path` as the recipe writes it: relative to the recipe when that stays readable, else absolute."""
        relative = os.path.relpath(path, self.recipe_dir)
        return str(path) if relative.count("..") > 2 else relative


def locate(locations: Mapping[KeyPath, Location], key: str) -> Location | None:
    """Where the axolotl key `a.0.b` (or its nearest written parent) is in the config; None when not written."""
    path: tuple[str | int, ...] = tuple(int(p) if p.isdigit() else p for p in key.split(" ")[0].split("."))
    for end in range(len(path), 0, -1):
        if path[:end] in locations:
            return locations[path[:end]]
    return None


def is_empty(value: Any) -> bool:
    """`key:` left empty, or an empty string, list or mapping: axolotl's examples list many such keys."""
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def is_hub_like(text: str) -> bool:
    """`org/name` without a data file suffix: a Hugging Face Hub repository, not a local path."""
    return bool(HUB_ID.match(text)) and not text.lower().endswith(DATA_SUFFIXES)

# ------------------------------------------------------------------------------------------------------ builder
class Builder:
    """Collects the recipe, the rows and the reasons, and knows where every axolotl key was written."""

    def __init__(self, config: Mapping[str, Any], paths: Paths, locations: Mapping[KeyPath, Location],
                 source: str) -> None:
        self.config, self.paths, self.locations, self.source = config, paths, locations, source
        self.out = Translation(recipe={})
        self.handled: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def put(self, source: str, target: str, value: Any) -> None:
        node: Any = self.out.recipe
        parts = [int(p) if p.isdigit() else p for p in target.split(".")]
        for part, following in zip(parts, parts[1:]):
            empty: Any = [] if isinstance(following, int) else {}
            if isinstance(part, int):
                while len(node) <= part:
                    node.append(empty)
                node = node[part]
            else:
                node = node.setdefault(part, empty)
        if isinstance(parts[-1], int):
            node.append(value)
        else:
            node[parts[-1]] = value
        self.out.translated.append(Mapped(source, target, value))
        self.handled.add(source.split(".")[0].split(" ")[0])

    def skip(self, key: str, reason: str) -> None:
        self.out.untranslated.append((key, reason))
        self.handled.add(key.split(".")[0])

    def note(self, text: str) -> None:
        self.out.notes.append(text)

    def where(self, key: str) -> Location | None:
        return locate(self.locations, key)

    def fail(self, key: str, message: str, hint: str | None = None) -> NoReturn:
        raise RecipeError([Problem(key, message, self.where(key), hint)], source=self.source)

    def conflict(self, first: str, second: str, hint: str) -> NoReturn:
        self.fail(second, f"conflicts with {first} ({self.where(first) or 'set above'}): ftlaunch needs one of "
                  "them", hint)

    def text(self, key: str, value: Any, what: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"expected {what}, got {type(value).__name__}")
        return value

    def names(self, key: str, value: Any) -> list[str]:
        """A name or a list of names (module names, roles, patterns)."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            self.fail(key, f"expected a name or a list of names, got {type(value).__name__}")
        return items

    def number(self, key: str, value: Any, kind: type = float) -> Any:
        """A number from the config; PyYAML reads `2e-4` as a string (YAML 1.1), axolotl converts it."""
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                self.fail(key, f"expected a number, got {value!r}", "write it as a number, e.g. 0.0002")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a number, got {type(value).__name__}", "write it as a number")
        if kind is int:
            if value != value or value in (float("inf"), float("-inf")) or value != int(value):
                self.fail(key, f"expected a whole number, got {value}", "write an integer")
            return int(value)
        return value
