"""Load a recipe: YAML with line numbers, `extends:` inheritance, `key.path=value` overrides, strict validation.

Every problem is collected and raised once as a `RecipeError` whose lines name the key path, the file and line, what
was expected, and a fix ("did you mean ..."). Callers print `str(err)`; nothing here lets a traceback escape for bad
input.

Inheritance: `extends: base.yaml` (or a list, applied left to right) is resolved relative to the file that names it;
the child is deep-merged over its parents (mappings merge key by key, everything else is replaced); cycles are
reported with the chain of files.

Planning side: imports yaml and pydantic only.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from launcher.config.schema import Recipe, is_secret_name, path_text_problem

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Location:
    """Where a key was written: file and 1-based line."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe."""

    path: str
    """Dotted key path (`optim.lr`, `data.train.0.path`), or `(file)` for file-level problems."""

    message: str
    """What was found and what was expected."""

    location: Location | None = None
    """File and line where the key was written, when known."""

    hint: str | None = None
    """How to fix it."""

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        hint = f"\n    hint: {self.hint}" if self.hint else ""
        return f"  {self.path}{where}: {self.message}{hint}"


MAX_PROBLEMS_SHOWN = 50
"""A recipe with thousands of mistakes is listed up to here (the first ones are the ones to fix)."""

# Bounds on what a recipe may cost to read (issue 18: a 300-byte alias bomb expands to gigabytes; a chain of 2,000
# extends or thousands of nested brackets exhausted the stack). Real recipes are far inside all three.
MAX_YAML_NODES = 100_000
"""Values in one file after expanding YAML aliases (`*anchor`)."""
MAX_YAML_DEPTH = 64
"""Nesting of mappings and lists."""
MAX_EXTENDS_DEPTH = 32
"""Files in one `extends` chain."""
MAX_RECIPE_BYTES = 4 << 20
"""Size of one recipe file."""


class RecipeError(Exception):
    """A recipe (or override) is invalid. `str()` lists every problem found."""

    def __init__(self, problems: Sequence[Problem], source: str = "recipe") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.__str__())

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        shown = [*map(str, self.problems[:MAX_PROBLEMS_SHOWN])]
        if n > MAX_PROBLEMS_SHOWN:
            shown.append(f"  ... and {n - MAX_PROBLEMS_SHOWN} more")
        return "\n".join([head, *shown])


@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from."""

    recipe: Recipe
    """The validated recipe; relative paths already resolved to absolute ones."""

    source: Path
    """The recipe file that was loaded (absolute)."""

    files: list[Path] = field(default_factory=list)
    """Every file read, the recipe first, then what it extends."""

    overrides: list[str] = field(default_factory=list)
    """The `key.path=value` overrides applied, in order."""

    locations: dict[KeyPath, Location] = field(default_factory=dict)
    """Where each key was written (file and line, or the override that set it)."""

    def locate(self, dotted: str) -> Location | None:
        """Where the key `a.b.0.c` (or its nearest written parent) was written; None when nothing is known."""
        path = tuple(int(k) if k.isdigit() else k for k in dotted.split("."))
        return _nearest_location(path, self.locations) if self.locations else None

    def with_locations(self, problems: Sequence[Problem]) -> list[Problem]:
        """`problems` with the file:line of the key each names filled in where it was missing (checks made after
        validation, at plan time, know only the key path)."""
        return [p if p.location else replace(p, location=self.locate(p.path)) for p in problems]


# ----------------------------------------------------------------------------------------------- YAML with lines
def _compose(text: str, file: str, locs: dict[KeyPath, Location]) -> Any:
    """Parse YAML into plain Python, recording the line of every key in `locs`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        # Constructing scalars can fail too (e.g. a bare `=` resolves to YAML's `value` tag, which SafeLoader lacks).
        return {} if node is None else _to_python(node, (), file, locs, [MAX_YAML_NODES])
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = Location(file, mark.line + 1) if mark else Location(file)
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError([Problem("(file)", f"not valid YAML: {problem}", loc, "check indentation and quoting")]) from None
    except RecursionError:  # PyYAML's composer recurses per nesting level
        raise RecipeError([Problem("(file)", "nested too deeply to read", Location(file),
                                   f"a recipe nests at most {MAX_YAML_DEPTH} levels")]) from None


def _to_python(node: yaml.Node, path: KeyPath, file: str, locs: dict[KeyPath, Location], budget: list[int]) -> Any:
    """The node as plain data. `budget` counts the values left to build: an alias is expanded where it is used, so
    a few nested aliases can stand for billions of values; the budget and the depth bound stop that early."""
    budget[0] -= 1
    if budget[0] < 0 or len(path) > MAX_YAML_DEPTH:
        what = (f"more than {MAX_YAML_NODES:,} values once its aliases (*anchor) are expanded" if budget[0] < 0
                else f"nested more than {MAX_YAML_DEPTH} levels deep (a recursive alias?)")
        raise RecipeError([Problem(_dotted(path), f"this recipe holds {what}", Location(file, node.start_mark.line + 1),
                                   "write the values out, or use `extends:` to share parts of recipes")])
    locs.setdefault(path, Location(file, node.start_mark.line + 1))
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(_scalar(key_node))
            locs[path + (key,)] = Location(file, key_node.start_mark.line + 1)
            if key in out:
                raise RecipeError([Problem(_dotted(path + (key,)), "key written twice", locs[path + (key,)], "keep one")])
            out[key] = _to_python(value_node, path + (key,), file, locs, budget)
            locs[path + (key,)] = Location(file, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), file, locs, budget) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    """A scalar with YAML's own typing (int, float, bool, null, str)."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def read_yaml(path: str | Path) -> tuple[Any, dict[KeyPath, Location]]:
    """A YAML file other than a recipe (`launch import` reads axolotl configs) as plain data, with the file:line of
    every key, under the recipe loader's bounds (size, UTF-8, aliases, depth, keys written twice). RecipeError
    otherwise."""
    source = Path(path).resolve()
    locs: dict[KeyPath, Location] = {}
    return _compose(_read_text(source), str(source), locs), locs


def _dotted(path: Iterable[str | int]) -> str:
    return ".".join(str(p) for p in path) or "(root)"


# --------------------------------------------------------------------------------------------------- inheritance
def deep_merge(base: Any, child: Any) -> Any:
    """Child over base: mappings merge key by key; lists and scalars are replaced (axolotl/torchtune behaviour)."""
    if isinstance(base, dict) and isinstance(child, dict):
        merged = dict(base)
        for key, value in child.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return child


def _load_tree(path: Path, chain: tuple[Path, ...], locs: dict[KeyPath, Location], files: list[Path]) -> dict[str, Any]:
    """Read `path` and everything it extends; return the merged mapping."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError([Problem("extends", f"inheritance cycle: {cycle}", None, "remove one of the extends entries")])
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError([Problem("extends", f"more than {MAX_EXTENDS_DEPTH} files extend one another "
                                   f"({chain[0]} -> ... -> {path})", Location(str(chain[-1])),
                                   "flatten the chain: a recipe may extend several files at once")])
    files.append(path)
    own_locs: dict[KeyPath, Location] = {}
    data = _compose(_read_text(path), str(path), own_locs)
    if not isinstance(data, dict):
        raise RecipeError([Problem("(root)", f"a recipe is a mapping of sections, got {type(data).__name__}",
                                   Location(str(path), 1), "start with keys such as `model:` and `data:`")])
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError([Problem("extends", "expected a file name or a list of file names",
                                   own_locs.get(("extends",)), "write `extends: base/common.yaml`")])
    merged: dict[str, Any] = {}
    for parent in parents:
        if (why := path_text_problem(parent)) is not None:
            raise RecipeError([Problem("extends", f"{parent[:80]!r} {why}", own_locs.get(("extends",)))])
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise RecipeError([Problem("extends", f"file not found: {parent} (resolved to {parent_path})",
                                       own_locs.get(("extends",)), "paths in extends are relative to the recipe that names them")])
        merged = deep_merge(merged, _load_tree(parent_path, chain + (path,), locs, files))
    _rebase_paths(data, path.parent)
    locs.update(own_locs)  # the child's lines win where it sets a key
    return deep_merge(merged, data)


def _read_text(path: Path) -> str:
    """A recipe file's text, or a Problem naming the file: missing, unreadable, too large, not UTF-8, NUL bytes."""
    def problem(message: str, line: int | None = None, hint: str | None = None) -> RecipeError:
        return RecipeError([Problem("(file)", message, Location(str(path), line), hint)])

    try:
        if not path.is_file():
            raise problem(f"recipe file not found: {path}", hint="check the path")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise problem(f"{path.stat().st_size:,} bytes: a recipe is at most {MAX_RECIPE_BYTES:,}")
        raw = path.read_bytes()
    except OSError as err:  # too long a name, permissions, a directory, an I/O error
        raise problem(f"cannot read the recipe: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise problem(f"not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start}", line,
                      "save the file as UTF-8") from None
    if "\0" in text:
        raise problem("holds a NUL byte (binary data?)", text[: text.index("\0")].count("\n") + 1,
                      "a recipe is YAML text")
    return text


# Keys holding file paths: made absolute relative to the recipe file that wrote them, so inherited paths still work.
_PATH_KEYS: tuple[KeyPath, ...] = (("model", "path"), ("model", "tokenizer"))


def _rebase_paths(data: dict[str, Any], base_dir: Path) -> None:
    def rebase(value: Any) -> Any:
        if isinstance(value, str) and value and path_text_problem(value) is None and not Path(value).is_absolute():
            return str((base_dir / value).resolve())
        return value

    for section, key in _PATH_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = rebase(data[section][key])
    gguf = data.get("model", {}).get("gguf") if isinstance(data.get("model"), dict) else None
    if isinstance(gguf, str) and ":" not in gguf:  # `package:file` specs are not paths
        data["model"]["gguf"] = rebase(gguf)
    template = data.get("data", {}).get("chat_template") if isinstance(data.get("data"), dict) else None
    if isinstance(template, str) and template.endswith((".jinja", ".j2")):
        data["data"]["chat_template"] = rebase(template)
    if isinstance(data.get("data"), dict):
        for split in ("train", "eval"):
            sources = data["data"].get(split)
            if isinstance(sources, dict):  # a single source is accepted and normalised to a list
                sources = data["data"][split] = [sources]
            if isinstance(sources, list):
                for source in sources:
                    if isinstance(source, dict) and "path" in source:
                        source["path"] = rebase(source["path"])


# ----------------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-4` -> (['optim', 'lr'], 0.0001). The value is read as YAML, so lists and null work."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([Problem(text, "an override is written `key.path=value`", None,
                                   "for example `optim.lr=1e-4` or `method.target_modules=[q_proj,v_proj]`")],
                          source="override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text and let the schema judge it
    if isinstance(value, str):
        value = _number_or_text(value)
    return key.split("."), value


def _number_or_text(text: str) -> Any:
    """PyYAML reads `1e-4` as a string (YAML 1.1); users mean a number."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def apply_override(data: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    """Set `value` at `keys`, creating mappings on the way; list items are addressed by index."""
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError([Problem(".".join(keys[: i + 1]), f"no list item {key} (the list has {len(node)})",
                                           None, _list_hint(keys, i, len(node), text))], source="override")
            node = node[int(key)]
        else:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            node = child
        if not isinstance(node, (dict, list)):
            raise RecipeError([Problem(".".join(keys[: i + 1]), f"is a {type(node).__name__}, not a section",
                                       None, f"in override `{text}`")], source="override")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError([Problem(".".join(keys), f"no list item {last} (the list has {len(node)})", None,
                                       _list_hint(keys, len(keys) - 1, len(node), text))], source="override")
        node[int(last)] = value
    else:
        node[last] = value


def _list_hint(keys: list[str], at: int, length: int, text: str) -> str:
    """`data.train.path=x` -> "`data.train` is a list: name an item by its index, e.g. `data.train.0.path=...`"."""
    where = ".".join(keys[:at])
    if keys[at].isdigit():
        return f"in override `{text}`: `{where}` has items 0..{length - 1}" if length else \
            f"in override `{text}`: `{where}` is empty; set the whole list, e.g. `{where}=[...]`"
    example = ".".join([*keys[:at], "0", *keys[at:]])
    return f"in override `{text}`: `{where}` is a list; name an item by its index, e.g. `{example}=...`"


MODEL_SOURCES = ("path", "gguf")
"""The model's mutually exclusive sources: an override that sets one drops the other the recipe set, so switching
from a GGUF file to a directory is one override, not two (`model.path=DIR` alone used to fail "set exactly one")."""

DATA_SOURCES = ("path", "hub")
"""A data source's, likewise (`data.train.0.hub=tatsu-lab/alpaca` on a recipe with a path); switching to a path also
drops the hub-only `subset` and `revision` the recipe set."""


def _switch_sources(data: dict[str, Any], overridden: set[tuple[str, ...]]) -> None:
    _switch_source(data.get("model"), ("model",), MODEL_SOURCES, (), overridden)
    sections = data.get("data")
    for split in ("train", "eval"):
        items = sections.get(split) if isinstance(sections, dict) else None
        for i, item in enumerate(items if isinstance(items, list) else []):
            _switch_source(item, ("data", split, str(i)), DATA_SOURCES, ("subset", "revision"), overridden)


def _switch_source(node: Any, prefix: tuple[str, ...], sources: tuple[str, ...], hub_only: tuple[str, ...],
                   overridden: set[tuple[str, ...]]) -> None:
    """When overrides set exactly one of `sources` in `node`, drop the others (and, for a path, `hub_only` keys)
    that the recipe itself set."""
    if not isinstance(node, dict):
        return
    chosen = [key for key in sources if (*prefix, key) in overridden and node.get(key) is not None]
    if len(chosen) == 1:
        dropped = [key for key in sources if key != chosen[0]] + list(hub_only if chosen[0] == "path" else ())
        for other in dropped:
            if (*prefix, other) not in overridden:
                node.pop(other, None)


# ---------------------------------------------------------------------------------------------------- validation
def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str] | None:
    """Names of the fields valid at `loc` (pydantic's error location), for "did you mean" hints."""
    annotation: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _model_of(annotation, None) or _model_of(annotation, part)
        if current is None:
            return None
        if part in current.model_fields:
            annotation = current.model_fields[part].annotation
        elif _model_of(annotation, part) is not None:  # a discriminated-union tag: ('method', 'lora', 'r')
            annotation = _model_of(annotation, part)
        else:
            return None
    current = _model_of(annotation, None)
    return sorted(current.model_fields) if current is not None else None


def _model_of(annotation: Any, tag: str | None) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation (through Optional, list, Annotated); for unions, the one whose
    `name` literal is `tag`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation if tag is None else None
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [m for a in args if (m := _model_of(a, None)) is not None]
    if tag is None:
        return models[0] if len(models) == 1 else None
    for m in models:
        name = m.model_fields.get("name")
        if name is not None and tag in typing.get_args(name.annotation):
            return m
    return None


def _yaml_path(loc: Sequence[str | int], data: Any) -> KeyPath:
    """Drop pydantic's union tags from an error location so it matches the YAML keys."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("name") == part:
            continue  # discriminated-union tag
        if isinstance(node, dict) and isinstance(part, str) and part not in node and part.startswith(("list[", "literal[")):
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _nearest_location(path: KeyPath, locs: dict[KeyPath, Location]) -> Location | None:
    for end in range(len(path), -1, -1):
        if path[:end] in locs:
            return locs[path[:end]]
    return None


def _problems(err: ValidationError, data: dict[str, Any], locs: dict[KeyPath, Location]) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors(include_url=False):
        path = _yaml_path(e["loc"], data)
        dotted = _dotted(path)
        kind = e["type"]
        hint = None
        if kind == "extra_forbidden":
            valid = _fields_at(Recipe, [p for p in e["loc"][:-1]]) or []
            close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
            message = "unknown key"
            hint = f"did you mean `{close[0]}`?" if close else (f"valid keys here: {', '.join(valid)}" if valid else None)
        elif kind == "missing":
            message = "required key is missing"
            hint = "add it to the recipe or to a file it extends"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            expected = e.get("ctx", {}).get("expected_tags", "")
            message = f"unknown method name {e.get('input', {}).get('name')!r}" if kind == "union_tag_invalid" else "method needs a `name`"
            hint = f"expected one of {expected}"
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            message = f"{e['msg']} (got {shown})"
        key = (dotted, message)
        if key in seen:
            continue
        seen.add(key)
        where = _nearest_location(path + ("name",), locs) if kind.startswith("union_tag") else _nearest_location(path, locs)
        problems.append(Problem(dotted, message, where, hint))
    return problems


# ----------------------------------------------------------------------------------------------------- the entry
def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Load, inherit, override and validate a recipe. Raises RecipeError listing every problem."""
    source = Path(path).resolve()
    locs: dict[KeyPath, Location] = {}
    files: list[Path] = []
    data = _load_tree(source, (), locs, files)
    shown: list[str] = []
    overridden: set[tuple[str, ...]] = set()
    for text in overrides:
        keys, value = parse_override(text)
        overridden.add(tuple(keys))
        shown.append(redact_override(text))
        apply_override(data, keys, value, shown[-1])
        for end in range(1, len(keys) + 1):  # new keys point at the override that made them
            prefix = tuple(int(k) if k.isdigit() else k for k in keys[:end])
            if end == len(keys) or prefix not in locs:
                locs[prefix] = Location(f"override `{shown[-1]}`")
        _rebase_paths(data, Path.cwd())  # a relative path given on the command line is relative to the shell
    _switch_sources(data, overridden)
    data.setdefault("name", source.stem)
    return LoadedRecipe(recipe=validate(data, locs, source), source=source, files=files, overrides=shown,
                        locations=locs)


REDACTED = "<redacted>"


def redact_override(text: str) -> str:
    """`cluster.env.HF_TOKEN=hf_abc` -> `cluster.env.HF_TOKEN=<redacted>`: the overrides are kept in plan.json and
    shown in errors, and a secret's value never leaves memory (docs/slurm.md, Secrets)."""
    key, sep, _ = text.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret_name(key.rsplit(".", 1)[-1]) else text


def validate(data: dict[str, Any], locs: dict[KeyPath, Location] | None = None, source: Path | str = "recipe") -> Recipe:
    """Validate plain data against the schema, turning pydantic's errors into a RecipeError."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_problems(err, data, locs or {}), source=str(source)) from None
