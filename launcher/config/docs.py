"""docs/recipes.md, generated from the recipe schema's field docstrings: one table per section, every key with its
type, default and meaning. The schema is the single source; tests/config/test_recipe_docs.py fails when the file is stale.

    python -m launcher.config.docs            # rewrite docs/recipes.md
    python -m launcher.config.docs --check    # exit 1 when docs/recipes.md differs from what the schema gives
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from launcher.config.schema import Recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"

HEADER = """# Recipe reference

Every key a recipe may hold, generated from the schema (`launcher/config/schema.py`) by `python -m launcher.config.docs`;
do not edit by hand. Unknown keys are errors. `extends:` (a file or a list of files, merged left to right, the
recipe last) and command-line overrides `key.path=value` are described in the README.
"""


def _type_name(annotation: Any) -> str:
    """A short, readable type: `int`, `str | null`, `"nf4" | "fp4"`, `list[str]`, a section's name."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if isinstance(a, str) else str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        name = getattr(value, "name", None)
        return f"`{name}`, its defaults" if isinstance(name, str) else "its defaults"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def _sections(model: type[BaseModel], seen: list[type[BaseModel]]) -> None:
    """Depth-first list of the section classes reachable from `model`, each once, in field order."""
    if model in seen:
        return
    seen.append(model)
    for field in model.model_fields.values():
        for candidate in _models_in(field.annotation):
            _sections(candidate, seen)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def render() -> str:
    sections: list[type[BaseModel]] = []
    _sections(Recipe, sections)
    out = [HEADER]
    for model in sections:
        title = "recipe (top level)" if model is Recipe else model.__name__
        out.append(f"\n## {model.__name__}\n" if model is not Recipe else f"\n## {title}\n")
        if model.__doc__ and model is not Recipe and not model.__doc__.startswith("Base of every"):
            out.append(_one_line(model.__doc__) + "\n")
        out.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
                       f"{_one_line(field.description)} |\n")
    return "".join(out)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python -m launcher.config.docs`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
