"""Recipe loading: every shipped recipe validates; bad input gives precise messages, never a traceback."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.config.recipe import RecipeError, deep_merge, load_recipe, parse_override
from launcher.config.schema import LoraMethod, Recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (REPO / "recipes").glob("*.yaml"))
MINIMAL = {"model": {"path": "model"}, "data": {"train": {"path": "train.jsonl"}}}


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides or [])
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe: Path) -> None:
    loaded = load_recipe(recipe)
    assert isinstance(loaded.recipe, Recipe)
    assert loaded.recipe.name


def test_shipped_recipes_exist() -> None:
    assert any(p.name == "demo.yaml" for p in SHIPPED)


def test_unknown_key_names_path_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  path: m\ndata:\n  train: {path: t.jsonl}\noptim:\n  lr: 1e-4\n  micro_bach: 2\n")
    [problem] = problems_of(path)
    assert "optim.micro_bach" in problem and f"{path}:7" in problem and "did you mean `micro_batch`" in problem


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {**MINIMAL, "optim": {"lr": -1, "grad_accum": "many", "warmup": 3},
                                      "method": {"name": "lora", "r": 0, "alfa": 2}})
    found = "\n".join(problems_of(path))
    for expected in ("optim.lr", "optim.grad_accum", "optim.warmup", "method.r", "method.alfa", "did you mean `alpha`"):
        assert expected in found


def test_wrong_type_and_range(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {**MINIMAL, "data": {"train": {"path": "t"}, "max_length": "long"}})
    [problem] = problems_of(path)
    assert "data.max_length" in problem and "valid integer" in problem and "'long'" in problem


def test_unknown_method_lists_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {**MINIMAL, "method": {"name": "lorra"}})
    [problem] = problems_of(path)
    assert "unknown method name 'lorra'" in problem and "'lora'" in problem


def test_method_fields_are_checked_per_method(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {**MINIMAL, "method": {"name": "full", "r": 8}})
    [problem] = problems_of(path)
    assert "method.r" in problem and "unknown key" in problem


def test_missing_required_section(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {"model": {"path": "m"}})
    [problem] = problems_of(path)
    assert problem.strip().startswith("data") and "missing" in problem


def test_model_needs_exactly_one_source(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {**MINIMAL, "model": {"path": "m", "gguf": "x.gguf"}})
    assert "exactly one of model.path or model.gguf" in problems_of(path)[0]


def test_invalid_yaml_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  path: [unclosed\ndata: {}\n")
    [problem] = problems_of(path)
    assert "not valid YAML" in problem and str(path) in problem


def test_yaml_value_tag_is_a_recipe_error(tmp_path: Path) -> None:
    """Found by hypothesis: a bare `=` is YAML's `value` tag, which the safe loader cannot construct."""
    assert "not valid YAML" in problems_of(write(tmp_path, "r.yaml", "="))[0]


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  path: a\n  path: b\ndata: {train: {path: t}}\n")
    assert "written twice" in problems_of(path)[0]


def test_extends_deep_merges_and_resolves_paths_relative_to_each_file(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "common.yaml", {"model": {"path": "../models/m"}, "optim": {"lr": 1e-3, "micro_batch": 4}})
    child = write(tmp_path, "child.yaml", {"extends": "base/common.yaml", "data": {"train": {"path": "d.jsonl"}},
                                            "optim": {"lr": 5e-4}})
    recipe = load_recipe(child).recipe
    assert recipe.optim.lr == 5e-4 and recipe.optim.micro_batch == 4  # merged, child wins
    assert recipe.model.path == str((tmp_path / "models" / "m").resolve())
    assert recipe.data.train[0].path == str(tmp_path / "d.jsonl")


def test_extends_list_applies_left_to_right(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", {"optim": {"lr": 1.0, "seed": 1}})
    write(tmp_path, "b.yaml", {"optim": {"lr": 2.0}})
    child = write(tmp_path, "c.yaml", {"extends": ["a.yaml", "b.yaml"], **MINIMAL})
    optim = load_recipe(child).recipe.optim
    assert (optim.lr, optim.seed) == (2.0, 1)


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    b = write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    [problem] = problems_of(b)
    assert "inheritance cycle" in problem and "a.yaml" in problem and "b.yaml" in problem


def test_extends_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", {"extends": "nope.yaml", **MINIMAL})
    [problem] = problems_of(path)
    assert "file not found: nope.yaml" in problem and f"{path}:1" in problem


def test_error_in_parent_points_at_parent_line(tmp_path: Path) -> None:
    parent = write(tmp_path, "p.yaml", "optim:\n  lr: 1e-4\n  betaz: [0.9, 0.99]\n")
    child = write(tmp_path, "c.yaml", {"extends": "p.yaml", **MINIMAL})
    [problem] = problems_of(child)
    assert f"{parent}:3" in problem and "did you mean `betas`" in problem


def test_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    recipe = load_recipe(path, ["optim.lr=3e-5", "method.name=dora", "method.r=4", "data.packing=true",
                                "method.target_modules=[q_proj,v_proj]"]).recipe
    assert recipe.optim.lr == 3e-5 and recipe.data.packing is True
    assert recipe.method.name == "dora" and recipe.method.r == 4 and recipe.method.target_modules == ["q_proj", "v_proj"]


def test_bad_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert "did you mean `lr`" in problems_of(path, ["optim.lrr=1"])[0]
    assert "override `optim.micro_batch=x`" in problems_of(path, ["optim.micro_batch=x"])[0]
    assert "key.path=value" in problems_of(path, ["optim.lr"])[0]
    assert "not a section" in problems_of(path, ["model.path.x=1"])[0]
    assert "valid number" in problems_of(path, ["optim.lr.x=1"])[0]


def test_parse_override_reads_yaml_1_2_numbers() -> None:
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)
    assert parse_override("output.name=run-1") == (["output", "name"], "run-1")
    assert parse_override("optim.max_grad_norm=null") == (["optim", "max_grad_norm"], None)


def test_deep_merge_replaces_lists() -> None:
    assert deep_merge({"a": {"x": [1, 2], "y": 1}}, {"a": {"x": [3]}}) == {"a": {"x": [3], "y": 1}}


def test_default_method_is_lora(tmp_path: Path) -> None:
    assert isinstance(load_recipe(write(tmp_path, "r.yaml", MINIMAL)).recipe.method, LoraMethod)


# ----------------------------------------------------------------------------------------------- property-based
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _paths(value, prefix + (key,))
    return out


@st.composite
def mutated_recipes(draw: st.DrawFn) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    base.pop("extends", None)
    base["model"] = {"path": "m"}
    recipe = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(recipe)
        target = draw(st.sampled_from(paths))
        parent = recipe
        for key in target[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["set", "delete", "rename", "add"]))
        if action == "set":
            parent[target[-1]] = draw(VALUES)
        elif action == "delete":
            parent.pop(target[-1], None)
        elif action == "rename":
            parent[target[-1] + draw(st.text(min_size=1, max_size=3))] = parent.pop(target[-1])
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    return recipe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(recipe=mutated_recipes())
def test_mutated_recipes_never_raise_anything_but_recipe_error(tmp_path: Path, recipe: dict[str, Any]) -> None:
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(path)
    except RecipeError as err:
        text = str(err)
        assert err.problems and "problem" in text
        assert all(p.path for p in err.problems)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_random_override_text_never_tracebacks(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    try:
        load_recipe(path, [text])
    except RecipeError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_yaml_text_never_tracebacks(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError:
        pass


def test_an_override_into_a_list_without_an_index_names_the_indexed_path(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    (problem,) = problems_of(path, ["data.train.path=other.jsonl"])
    assert "no list item path (the list has 1)" in problem and "`data.train.0.path=...`" in problem
    (problem,) = problems_of(path, ["data.train.3.path=other.jsonl"])
    assert "items 0..0" in problem


def test_one_override_switches_the_model_source(tmp_path: Path) -> None:
    gguf = write(tmp_path, "g.yaml", {**MINIMAL, "model": {"gguf": "m.gguf"}})
    switched = load_recipe(gguf, ["model.path=other"]).recipe.model
    assert (switched.path, switched.gguf) == (str((Path.cwd() / "other").resolve()), None)
    back = load_recipe(write(tmp_path, "p.yaml", MINIMAL), ["model.gguf=x.gguf"]).recipe.model
    assert back.path is None and back.gguf.endswith("x.gguf")
    # Both on the command line is still the user's contradiction, reported as before.
    assert "exactly one of model.path or model.gguf" in problems_of(gguf, ["model.path=a", "model.gguf=b.gguf"])[0]


def test_a_relative_path_from_an_override_is_relative_to_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.plan.checks import data_problems

    (tmp_path / "recipes").mkdir()
    path = write(tmp_path / "recipes", "r.yaml", MINIMAL)
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(path, ["data.train.0.path=here.jsonl"])
    assert loaded.recipe.data.train[0].path == str(tmp_path / "here.jsonl")
    (problem,) = data_problems(loaded.recipe)
    assert str(tmp_path / "here.jsonl") in str(problem) and "command-line override to the current directory" in \
        str(problem)
    hub = load_recipe(path, ["data.train.0.path=tatsu-lab/alpaca"]).recipe
    assert "name it with hub instead of path: `data.train.0: {hub: tatsu-lab/alpaca, split: train}`" in \
        str(data_problems(hub)[0])
