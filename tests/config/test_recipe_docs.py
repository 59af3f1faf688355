"""docs/recipes.md is generated from the schema: it must be current and name every key of every section."""

from __future__ import annotations

from launcher.config import docs as recipe_docs
from launcher.config.schema import ClusterConfig, DeepSpeedOptions, QLoraMethod, Recipe


def test_docs_recipes_md_is_current() -> None:
    assert recipe_docs.main(["--check"]) == 0, "run: python -m launcher.config.docs"


def test_every_key_is_documented_with_its_docstring() -> None:
    sections = {part.split("\n", 1)[0]: part for part in recipe_docs.render().split("\n## ")[1:]}
    for model in (Recipe, QLoraMethod, DeepSpeedOptions, ClusterConfig):
        section = sections["recipe (top level)" if model is Recipe else model.__name__]
        for name, field in model.model_fields.items():
            row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
            assert recipe_docs._one_line(field.description)[:60] in row, name
