"""datasets / test_datasets and the data settings -> `data:` (formats, field layouts, roles, chat templates)."""

from __future__ import annotations

import json
import re
from typing import Any

from launcher.config.axolotl.builder import Builder, EMPTY, REMOTE, is_empty, is_hub_like


# ftlaunch's messages format (launcher/train/data.py, rank side, so copied here; tests/config/test_axolotl_import.py
# checks the copies): which role names it reads in each message layout, and the shipped template names.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
"""Roles of `from`/`value` messages -> ftlaunch's roles."""
ROLES = {"system", "user", "assistant", "tool"}
"""Roles of `role`/`content` messages (read as they are)."""
MESSAGE_LISTS = ("messages", "conversations")
"""Row keys ftlaunch reads a conversation from."""
MESSAGE_LAYOUTS = {("role", "content"), ("from", "value")}
SHIPPED_TEMPLATES = ("chatml", "smollm2")


def data_section(b: Builder) -> None:
    datasets = b.config.get("datasets")
    if datasets is None and b.get("pretraining_dataset"):
        b.fail("pretraining_dataset", "ftlaunch trains from local datasets, not streamed pretraining data",
               "save the data as a local .jsonl with a `text` field and list it under datasets with type: completion")
    if isinstance(datasets, dict):  # one dataset written without the list
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        b.fail("datasets", "required: a list of datasets, each with path and type",
               "add `datasets: [{path: data/train.jsonl, type: alpaca}]`")
    templates: list[tuple[str, str | None, str | None]] = []
    alpaca: list[str] = []
    _sources(b, "datasets", datasets, "train", templates, alpaca)
    tests = b.config.get("test_datasets")
    if tests:
        if b.get("val_set_size"):
            b.conflict("val_set_size", "test_datasets", "hold out data with val_set_size or give test_datasets")
        _sources(b, "test_datasets", tests if isinstance(tests, list) else [tests], "eval", templates, alpaca)
    if alpaca:  # axolotl's `type: alpaca` renders the classic Alpaca prompt, not the chat template
        b.put(alpaca[0], "data.prompt_style", "alpaca")
    _chat_templates(b, templates)
    _data_settings(b)


def _sources(b: Builder, key: str, datasets: list[Any], split: str,
             templates: list[tuple[str, str | None, str | None]], alpaca: list[str]) -> None:
    """Each dataset as data.{split}.N sources; the chat templates they name go to `templates`, the type keys of
    plain `type: alpaca` datasets to `alpaca`."""
    index = 0
    for i, ds in enumerate(datasets):
        prefix = f"{key}.{i}"
        if not isinstance(ds, dict):
            b.fail(prefix, f"expected a mapping with path and type, got {type(ds).__name__}",
                   "write `- path: data/train.jsonl` and `type: alpaca` under it")
        fmt = _format(b, prefix, ds)
        if ds.get("type") == "alpaca":
            alpaca.append(f"{prefix}.type")
        for path_key, path in _dataset_paths(b, prefix, ds):
            target = f"data.{split}.{index}"
            _dataset_path(b, path_key, path, target, ds, prefix)
            b.put(f"{prefix}.type", f"{target}.format", fmt)
            index += 1
        if ds.get("ds_type") is not None:
            b.skip(f"{prefix}.ds_type", "ftlaunch infers the file type from the extension")
        if ds.get("chat_template") is not None or ds.get("chat_template_jinja") is not None:
            templates.append((prefix, ds.get("chat_template"), ds.get("chat_template_jinja")))
        _dataset_leftovers(b, prefix, ds)


DATASET_KEYS_DONE = {"path", "data_files", "type", "chat_template", "chat_template_jinja"}
"""Dataset keys answered whatever their value (chat templates after all datasets are read, by `_chat_templates`)."""


def _dataset_paths(b: Builder, prefix: str, ds: dict[str, Any]) -> list[tuple[str, str]]:
    """(axolotl key, path) of each file a dataset reads: its data_files when given (`path: json` names only the
    loader then), else its path."""
    files = ds.get("data_files")
    if files:
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            b.fail(f"{prefix}.data_files", "expected a file name or a list of file names")
        if ds.get("path") is not None:
            b.skip(f"{prefix}.path", "data_files name the files; ftlaunch infers the file type from the extension")
        return [(f"{prefix}.data_files.{j}", f) for j, f in enumerate(files)]
    path = ds.get("path")
    if not isinstance(path, str) or not path:
        b.fail(f"{prefix}.path", "required: the dataset's file or directory",
               "set path to a local .jsonl/.json/.parquet/.csv file or a save_to_disk directory")
    return [(f"{prefix}.path", path)]


def _dataset_path(b: Builder, key: str, text: str, target: str, ds: dict[str, Any], prefix: str) -> None:
    split = ds.get("split")
    local = b.paths.locate(text)
    if local is None and is_hub_like(text):
        _hub_dataset(b, key, text, target, ds, prefix)
        return
    placeholder = local is None and text.startswith(REMOTE)
    if local is not None:
        b.put(key, f"{target}.path", b.paths.for_recipe(local))
    elif placeholder:
        directory = b.paths.recipe_dir / "data" / re.sub(r"[^\w.-]+", "__", text.split("://")[-1]).strip("_")
        b.put(key, f"{target}.path", b.paths.for_recipe(directory))
        b.note(f"{key}: {text} is a URL, and ftlaunch reads local files and Hub datasets: save it to {directory} "
               f"(`python -c \"import datasets; datasets.load_dataset('{text}').save_to_disk('{directory}')\"`)")
    else:
        missing = b.paths.missing(text)
        b.put(key, f"{target}.path", b.paths.for_recipe(missing))
        b.note(f"{key}: {missing} does not exist here; put the data there or change the path")
    if split is None:
        return
    if placeholder or (local is not None and local.is_dir()):  # a save_to_disk directory holds named splits
        b.put(f"{prefix}.split", f"{target}.split", str(split))
    elif not any(k == f"{prefix}.split" for k, _ in b.out.untranslated):  # once for all of its data_files
        b.skip(f"{prefix}.split", "a file holds one split: ftlaunch reads it whole")


def _hub_dataset(b: Builder, key: str, repo: str, target: str, ds: dict[str, Any], prefix: str) -> None:
    """A Hub dataset name: a `hub:` source, with axolotl's split, name (the subset) and revision; `launch` downloads
    it into the Hub cache, the job reads it from there."""
    b.put(key, f"{target}.hub", repo)
    for name, recipe_key in (("split", "split"), ("name", "subset"), ("revision", "revision")):
        if ds.get(name) is not None:
            b.put(f"{prefix}.{name}", f"{target}.{recipe_key}", str(ds[name]))
    b.note(f"{key}: {repo} is read from the Hugging Face Hub cache: `launch` downloads it there first where the Hub "
           "is reachable, and the job reads it offline (put HF_HOME on storage the nodes share)")


# axolotl's dataset `type` -> ftlaunch's DataSource.format
CHAT_TYPES = ("chat_template", "sharegpt", "messages")
FORMATS = {"alpaca": "alpaca", **{t: "messages" for t in CHAT_TYPES}, "completion": "text"}


def _format(b: Builder, prefix: str, ds: dict[str, Any]) -> str:
    kind = ds.get("type")
    key = f"{prefix}.type"
    if kind is None:
        b.fail(key, "required: the dataset type", f"use one of {', '.join(FORMATS)}")
    if isinstance(kind, dict):
        b.fail(key, "a user-defined prompt format (a mapping) has no ftlaunch equivalent",
               f"convert the rows to one of ftlaunch's formats and use a type among {', '.join(FORMATS)}")
    kind = b.text(key, kind, "a dataset type name")
    base = kind.split(":")[0]
    if base not in FORMATS:
        b.fail(key, f"unknown dataset type {kind!r}: ftlaunch reads alpaca, chat_template (or sharegpt, messages) "
               "and completion data", "convert the rows to one of those formats (alpaca: instruction/input/output; "
               "chat: messages [{role, content}]; completion: text) and set type accordingly")
    if base != kind:
        b.note(f"{key}: {kind}: the part after ':' (a prompt style) is not used; ftlaunch renders the rows as its "
               "data.prompt_style says (alpaca where a dataset has plain type alpaca, else the chat template)")
    if base == "completion":
        _completion_field(b, prefix, ds)
    else:
        _message_fields(b, prefix, ds, sharegpt=base == "sharegpt")
    return FORMATS[base]


def _completion_field(b: Builder, prefix: str, ds: dict[str, Any]) -> None:
    column = ds.get("field")
    if column is None:
        return
    if column != "text":
        b.fail(f"{prefix}.field", f"ftlaunch's text format reads the `text` field, not {column!r}",
               f"rename the {column!r} field to `text` in the data")
    b.skip(f"{prefix}.field", "ftlaunch default already: the text format reads `text`")


def _message_fields(b: Builder, prefix: str, ds: dict[str, Any], sharegpt: bool) -> None:
    """Check that the rows' layout is one ftlaunch reads: `messages` or `conversations`, holding role/content or
    from/value messages. Other layouts cannot be read, so they are refused rather than written into a recipe whose
    data would fail on its first row."""
    column = ds.get("field_messages") or ("conversations" if sharegpt else "messages")
    if column not in MESSAGE_LISTS:
        b.fail(f"{prefix}.field_messages", f"ftlaunch reads conversations from a `messages` or `conversations` "
               f"field, not {column!r}", f"rename the {column!r} field to `messages` in the data")
    if ds.get("field_messages") is not None:
        b.skip(f"{prefix}.field_messages", "ftlaunch default already: it reads `messages` or `conversations`")
    role_key, content_key = _layout(b, prefix, ds, sharegpt)
    _roles(b, prefix, ds, role_key)
    _roles_to_train(b, prefix, ds, role_key)
    eos = ds.get("train_on_eos")
    if eos is not None:
        b.skip(f"{prefix}.train_on_eos", "ftlaunch default already: the loss covers what the template's "
               "{% generation %} markers wrap, each assistant turn's end token included (the shipped templates)"
               if eos == "turn" else f"{eos!r}: no ftlaunch equivalent (it trains on each assistant turn's end, "
               "like `turn`)")


def _layout(b: Builder, prefix: str, ds: dict[str, Any], sharegpt: bool) -> tuple[str, str]:
    mappings = ds.get("message_property_mappings") or {}
    if not isinstance(mappings, dict):
        b.fail(f"{prefix}.message_property_mappings", "expected a mapping such as {role: from, content: value}")
    default_role, default_content = ("from", "value") if sharegpt else ("role", "content")
    role_key = ds.get("message_field_role") or mappings.get("role", default_role)
    content_key = ds.get("message_field_content") or mappings.get("content", default_content)
    if not isinstance(role_key, str) or not isinstance(content_key, str) or \
            (role_key, content_key) not in MESSAGE_LAYOUTS:
        key = next((f"{prefix}.{k}" for k in ("message_field_role", "message_field_content") if ds.get(k)),
                   f"{prefix}.message_property_mappings")
        b.fail(key, f"messages with role in {role_key!r} and content in {content_key!r}: ftlaunch reads "
               "{role, content} (OpenAI) or {from, value} (ShareGPT) messages", "rename the message fields in the "
               "data to role/content")
    for name in ("message_property_mappings", "message_field_role", "message_field_content"):
        if ds.get(name) is not None:
            b.skip(f"{prefix}.{name}", f"ftlaunch default already: it reads {role_key}/{content_key} messages")
    for extra in sorted(set(mappings) - {"role", "content"}):
        b.skip(f"{prefix}.message_property_mappings.{extra}", "no ftlaunch equivalent: messages carry a role and "
               "a content only")
    return role_key, content_key


def _ftlaunch_role(role_key: str, name: str) -> str | None:
    """The role ftlaunch reads `name` as, in messages whose role is under `role_key`; None: it refuses the row."""
    return SHAREGPT_ROLES.get(name) if role_key == "from" else (name if name in ROLES else None)


def _roles(b: Builder, prefix: str, ds: dict[str, Any], role_key: str) -> None:
    roles = ds.get("roles")
    if roles is None:
        return
    if not isinstance(roles, dict):
        b.fail(f"{prefix}.roles", "expected a mapping {target role: [names in the data]}")
    unknown = [f"{name!r} -> {target}" for target, names in roles.items()
               for name in b.names(f"{prefix}.roles.{target}", names or [])
               if _ftlaunch_role(role_key, name) != target]
    if not unknown:
        b.skip(f"{prefix}.roles", "ftlaunch default already: it maps these role names the same way")
        return
    b.skip(f"{prefix}.roles", f"ftlaunch maps role names itself and not {', '.join(unknown)}")
    b.note(f"{prefix}.roles: rows using {', '.join(unknown)} will be refused by ftlaunch's data loader (unknown "
           "role): rename those roles in the data to system, user, assistant or tool")


def _roles_to_train(b: Builder, prefix: str, ds: dict[str, Any], role_key: str) -> None:
    roles = ds.get("roles_to_train")
    if roles is None:
        return
    names = b.names(f"{prefix}.roles_to_train", roles)
    if {_ftlaunch_role(role_key, n) or n for n in names} == {"assistant"}:
        b.skip(f"{prefix}.roles_to_train", "ftlaunch default already: data.loss_on: assistant")
    else:
        b.skip(f"{prefix}.roles_to_train", f"{names}: no ftlaunch equivalent: the loss covers assistant tokens or "
               "all tokens (data.loss_on, from train_on_inputs)")


DATASET_REASONS = {
    "name": "a Hub dataset configuration: it applies to Hub datasets (hub:), not to a local path",
    "revision": "a Hub revision: it applies to Hub datasets (hub:), not to a local path",
    "trust_remote_code": "a Hub loading script: ftlaunch reads data files (.jsonl/.json/.parquet/.csv), never runs "
                         "a dataset's code",
    "drop_system_message": "no ftlaunch equivalent: system messages are kept",
    "field_system": "no ftlaunch equivalent: the alpaca format reads `system`",
    "field_tools": "no ftlaunch equivalent: tool definitions are not passed to the template",
    "field_thinking": "no ftlaunch equivalent: reasoning traces are not passed to the template",
    "message_field_training": "no ftlaunch equivalent: per-turn loss switches are not read",
    "message_field_training_detail": "no ftlaunch equivalent: per-span loss switches are not read",
    "shards": "no ftlaunch equivalent: the whole dataset is read (data.train[].max_rows caps rows)",
    "shards_idx": "no ftlaunch equivalent: the whole dataset is read",
    "preprocess_shards": "ftlaunch tokenizes in shards already (data.num_proc)",
}


def _dataset_leftovers(b: Builder, prefix: str, ds: dict[str, Any]) -> None:
    answered = {key.split(".")[2] for key, _ in b.out.untranslated if key.startswith(prefix + ".")}
    answered |= {row.source.split(".")[2] for row in b.out.translated if row.source.startswith(prefix + ".")}
    for name, value in ds.items():
        if name in answered:
            continue
        if is_empty(value):
            b.skip(f"{prefix}.{name}", EMPTY)
        elif name not in DATASET_KEYS_DONE:
            b.skip(f"{prefix}.{name}", DATASET_REASONS.get(name, "not a dataset key this importer knows"))


def _chat_templates(b: Builder, found: list[tuple[str, str | None, str | None]]) -> None:
    """data.chat_template from the config-wide and per-dataset templates: ftlaunch renders all data with one."""
    if b.config.get("chat_template") is not None or b.config.get("chat_template_jinja") is not None:
        found.insert(0, ("", b.config.get("chat_template"), b.config.get("chat_template_jinja")))
    chosen: tuple[str, str | None] | None = None
    for prefix, name, jinja in found:
        key = f"{prefix}.chat_template" if prefix else "chat_template"
        if name is None and jinja is not None:
            key, name = key + "_jinja", "jinja"
        value = _template_value(b, key, str(name), jinja)
        if value is not None and chosen is not None and value != chosen[1]:
            b.conflict(chosen[0], key, "ftlaunch renders every dataset with one chat template: use the same")
        if value is not None:
            chosen = chosen or (key, value)
            b.put(key, "data.chat_template", value)
        if jinja is not None and not key.endswith("_jinja"):
            b.skip(key + "_jinja", "read as the template of " + key if name == "jinja" else
                   f"axolotl uses it only with chat_template: jinja, and {key} is {name}")


def _template_value(b: Builder, key: str, name: str, jinja: Any) -> str | None:
    """The data.chat_template value axolotl's template name stands for; None: the tokenizer's (or left out)."""
    if name == "tokenizer_default":
        b.skip(key, "ftlaunch default already: the tokenizer's own template")
        return None
    if name == "jinja":
        return _jinja_template(b, key, jinja)
    if name.startswith("tokenizer_default_fallback_"):
        fallback = name.removeprefix("tokenizer_default_fallback_")
        if _tokenizer_has_template(b):  # what axolotl decides when it loads the tokenizer, decided here
            b.skip(key, "ftlaunch default already: the tokenizer has a template, which axolotl uses too")
            return None
        if fallback not in SHIPPED_TEMPLATES:
            b.skip(key, f"{fallback}: not a template ftlaunch ships ({', '.join(SHIPPED_TEMPLATES)}), and the "
                   "tokenizer has none here: set data.chat_template to a .jinja file")
            return None
        return fallback
    if name in SHIPPED_TEMPLATES:
        return name
    b.skip(key, f"{name}: ftlaunch ships {' and '.join(SHIPPED_TEMPLATES)} only; the tokenizer's own template is "
           "used (for this model family it usually is that one), or set data.chat_template to a .jinja file")
    return None


def _jinja_template(b: Builder, key: str, jinja: Any) -> str:
    if not isinstance(jinja, str) or not jinja.strip():
        b.fail(key, "chat_template: jinja needs chat_template_jinja (a Jinja string or a file)",
               "set chat_template_jinja")
    if "{" in jinja:
        return jinja
    local = b.paths.locate(jinja)
    if local is None or not local.is_file():
        b.fail(key, f"{jinja}: file not found", "give an existing .jinja file or the template text")
    # The recipe loader resolves only .jinja/.j2 names against the recipe: other names are written absolute.
    return b.paths.for_recipe(local) if local.suffix in (".jinja", ".j2") else str(local)


def _tokenizer_has_template(b: Builder) -> bool:
    """Whether the local model (or tokenizer) directory ships a chat template; False when it cannot be read."""
    directory = b.paths.locate(str(b.get("tokenizer_config") or b.get("base_model")))
    if directory is None or not directory.is_dir():
        return False
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _data_settings(b: Builder) -> None:
    length = b.config.get("sequence_len")
    # axolotl's default length (512) differs from ftlaunch's (1024): write it, so both train the same examples.
    b.put("sequence_len" if length is not None else "sequence_len (axolotl default)", "data.max_length",
          512 if length is None else b.number("sequence_len", length, int))
    if b.config.get("sample_packing") is not None:
        b.put("sample_packing", "data.packing", bool(b.config["sample_packing"]))
    if b.config.get("train_on_inputs") is not None:
        b.put("train_on_inputs", "data.loss_on", "all" if b.config["train_on_inputs"] else "assistant")
    _val_set_size(b)
    if b.config.get("dataset_processes") is not None:
        b.put("dataset_processes", "data.num_proc", b.number("dataset_processes", b.config["dataset_processes"], int))
    if b.get("default_system_message") is not None:
        b.put("default_system_message", "data.system_prompt", str(b.get("default_system_message")))


def _val_set_size(b: Builder) -> None:
    size = b.config.get("val_set_size")
    if size is None:
        return
    size = b.number("val_set_size", size)
    if size == 0:
        b.skip("val_set_size", "0: no held-out split (ftlaunch default)")
    elif 0 < size < 1:
        b.put("val_set_size", "data.eval_fraction", size)
        if b.config.get("seed") is not None:  # axolotl splits with the run's seed; ftlaunch's split has its own
            b.put("seed", "data.eval_seed", b.number("seed", b.config["seed"], int))
    else:
        b.skip("val_set_size", f"{size}: a row count (or all rows) has no ftlaunch equivalent: data.eval_fraction "
               "is a fraction below 1")
