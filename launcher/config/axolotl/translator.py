"""The entry: `translate` runs the sections in order; `recipe_text` writes the recipe with what was left out."""

from __future__ import annotations

import textwrap
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel

from launcher.config.recipe import KeyPath, Location, Problem, RecipeError
from launcher.config.axolotl.builder import Builder, Paths, Translation
from launcher.config.schema import Recipe
from launcher.config.axolotl.data import data_section
from launcher.config.axolotl.leftovers import leftovers
from launcher.config.axolotl.model import method_section, model_section
from launcher.config.axolotl.strategy import strategy_section
from launcher.config.axolotl.training import optim_section, output_section, schedule_section, tracking_section


# ---------------------------------------------------------------------------------------------------- the entry
def translate(config: Any, paths: Paths, locations: Mapping[KeyPath, Location] | None = None,
              source: str = "axolotl config") -> Translation:
    """The recipe an axolotl config stands for. Raises RecipeError (naming the key, what was expected and the fix)
    for input that cannot be translated."""
    if not isinstance(config, dict):
        raise RecipeError([Problem("(root)", f"an axolotl config is a mapping of keys, got "
                                   f"{type(config).__name__}", (locations or {}).get(()),
                                   "start from an axolotl example such as examples/llama-3/qlora.yml")], source)
    b = Builder(config, paths, locations or {}, source)
    _refuse_other_trainers(b)
    dtype = model_section(b)
    data_section(b)
    method_section(b, dtype)
    optim_section(b)
    schedule_section(b)
    output_section(b)
    tracking_section(b)
    strategy_section(b)
    leftovers(b)
    b.out.recipe = order_like_schema(b.out.recipe)
    return b.out


def _refuse_other_trainers(b: Builder) -> None:
    for key in ("rl", "reward_model", "process_reward_model"):
        if b.get(key):
            b.fail(key, f"{b.get(key)!r} selects a trainer ftlaunch does not have: it trains supervised "
                   "fine-tuning only", "import the config of the supervised (SFT) stage instead")

# ------------------------------------------------------------------------------------------------------- output
def order_like_schema(data: dict[str, Any], model: type[BaseModel] = Recipe) -> dict[str, Any]:
    """`data` with keys in the schema's field order, section by section (the order of docs/recipes.md and of the
    shipped recipes), so an imported recipe reads like a written one."""
    ordered: dict[str, Any] = {}
    fields = model.model_fields
    # `name` leads, as in the shipped recipes (pydantic lists an inherited section's own fields last).
    for name in sorted(fields, key=lambda n: n != "name"):
        if name in data:
            ordered[name] = _order_value(data[name], fields[name].annotation)
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    return ordered


def _order_value(value: Any, annotation: Any) -> Any:
    if isinstance(value, list):
        return [_order_value(v, annotation) for v in value]
    if not isinstance(value, dict):
        return value
    section = _section(annotation, value.get("name"))
    return order_like_schema(value, section) if section is not None else value


def _section(annotation: Any, tag: Any) -> type[BaseModel] | None:
    """The Section class inside an annotation (Optional, list, a union told apart by its `name` literal)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [s for a in typing.get_args(annotation) if (s := _section(a, tag)) is not None]
    for section in found:
        name = section.model_fields.get("name")
        if name is not None and tag in typing.get_args(name.annotation):
            return section
    return found[0] if len(found) == 1 else None


def recipe_text(translation: Translation, config: Path) -> str:
    """The recipe as YAML: a header naming the config and the notes, the recipe, then the keys left out."""
    def comment(text: str, indent: str = "") -> list[str]:
        flat = " ".join(text.split())  # a key or value holding a newline must not end the comment
        return [f"#{indent} {line}" for line in textwrap.wrap(flat, 116 - len(indent), break_on_hyphens=False)]

    head = comment(f"Imported from {config} (an axolotl config) by `launch import`: {len(translation.translated)} "
                   f"values translated, {len(translation.untranslated)} keys not (listed at the end). Check it "
                   "with `launch plan` on this file.")
    for note in translation.notes:
        head += comment("note: " + note)
    body = yaml.safe_dump(translation.recipe, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          width=116)
    tail = ["# Not translated from the axolotl config:"] if translation.untranslated else []
    for key, reason in translation.untranslated:
        tail += comment(f"{key}: {reason}", "  ")
    return "\n".join([*head, body.rstrip("\n"), *tail]) + "\n"
