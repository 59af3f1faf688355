"""`launch import CONFIG.yaml [--out RECIPE.yaml] [--force]`: an axolotl config as an ftlaunch recipe.

The translation is launcher/config/axolotl/; this module reads the config, validates the recipe with the loader
`launch plan` uses (so what is written always loads), writes it without overwriting anything unless `--force`, and
prints the path (stdout: `launch plan $(launch import x.yml)` works), what was translated and what was not (stderr).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rich.markup import escape
from rich.table import Table

from launcher.cli.args import UsageError
from launcher.cli.console import console
from launcher.config.axolotl import Paths, Translation, locate, recipe_text, translate
from launcher.config.recipe import KeyPath, Location, Problem, RecipeError, load_recipe, read_yaml

SUFFIX = ".ftlaunch.yaml"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch import",
                                     description="Translate an axolotl config into an ftlaunch recipe.")
    parser.add_argument("config", type=Path, help="axolotl config (YAML)")
    parser.add_argument("--out", type=Path, default=None, metavar="RECIPE.yaml",
                        help=f"recipe to write (default: beside the config, its name + {SUFFIX})")
    parser.add_argument("--force", action="store_true", help="overwrite RECIPE.yaml if it exists")
    return parser


def default_out(config: Path) -> Path:
    return config.with_name(config.stem + SUFFIX)


def cmd_import(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    config = args.config.resolve()
    if not config.is_file():
        raise UsageError(f"{args.config}: no such file (expected an axolotl config YAML)")
    out = (args.out or default_out(config)).resolve()
    if out == config:
        raise UsageError(f"--out {args.out}: that is the axolotl config itself; choose another file")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists: pass --force to overwrite it, or --out another file")
    try:
        data, locations = read_yaml(config)
    except RecipeError as err:  # the loader calls its input a recipe: name the config instead
        raise RecipeError(err.problems, source=str(config)) from None
    # axolotl resolves relative paths against its working directory; the config's directory is tried second.
    paths = Paths(search=(Path.cwd(), config.parent), recipe_dir=out.parent)
    translation = translate(data, paths, locations, source=str(config))
    translation.recipe.setdefault("name", recipe_name(config))
    translation.recipe.setdefault("description", f"Imported from the axolotl config {config.name}.")
    translation.recipe = {"name": translation.recipe.pop("name"), "description": translation.recipe.pop("description"),
                          **translation.recipe}
    write_checked(recipe_text(translation, config), out, args.force,
                  lambda problems: _from_config(problems, translation, locations), str(config))
    print(out)
    report(translation)
    console.print(f"[bold green]written[/] {escape(str(out))}: check it with `launch plan {escape(str(out))}`")
    return 0


def recipe_name(config: Path) -> str:
    """The config's file name as a recipe name (letters, digits, `.`, `_`, `-`)."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in config.stem).lstrip("._-")
    return cleaned[:128] or "imported"


# ------------------------------------------------------------------------------------------------------- writing
def write_checked(text: str, out: Path, force: bool, explain: Callable[[list[Problem]], list[Problem]],
                  source: str) -> None:
    """Validate `text` as a recipe (from a file beside `out`, so relative paths resolve as they will), then put it
    at `out`: atomically, and never over an existing file unless `force`. `explain` points the schema's problems
    at what the user wrote."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            load_recipe(temp)
        except RecipeError as err:
            raise RecipeError(explain(err.problems), source=f"{source}: the translated recipe does not validate") \
                from None
        if force:
            os.replace(temp, out)
        else:
            os.link(temp, out)  # fails if `out` appeared meanwhile: nothing is overwritten
    except FileExistsError:
        raise UsageError(f"{out} exists: pass --force to overwrite it, or --out another file") from None
    finally:
        temp.unlink(missing_ok=True)


def _from_config(problems: Iterable[Problem], translation: Translation,
                 locations: Mapping[KeyPath, Location]) -> list[Problem]:
    """The schema's problems, each pointed at the axolotl key that set the value and its line (the temporary
    recipe they were found in is gone)."""
    found = []
    for problem in problems:
        row = translation.source_of(problem.path)
        if row is None:
            found.append(replace(problem, location=None))
            continue
        hint = f"set by axolotl's `{row.source}`; fix it there"
        found.append(replace(problem, location=locate(locations, row.source), hint=hint))
    return found


# ------------------------------------------------------------------------------------------------------ printing
def report(translation: Translation) -> None:
    table = Table(title="translated", title_justify="left")
    for column in ("axolotl key", "recipe key", "value"):
        table.add_column(column, overflow="fold")
    for row in translation.translated:
        table.add_row(escape(row.source), escape(row.target), escape(shown(row.value)))
    console.print(table)
    if translation.untranslated:
        left = Table(title="not translated", title_justify="left")
        left.add_column("axolotl keys", overflow="fold")
        left.add_column("why", overflow="fold")
        for reason, keys in grouped(translation.untranslated):
            left.add_row(escape(", ".join(keys)), escape(reason))
        console.print(left)
    for note in translation.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def grouped(rows: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Keys sharing a reason on one line (the dozen wandb_* keys, the empty ones), in order of first appearance."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in rows:
        by_reason.setdefault(reason, []).append(key)
    return list(by_reason.items())


def shown(value: Any, limit: int = 80) -> str:
    text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    text = "null" if value is None else " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
