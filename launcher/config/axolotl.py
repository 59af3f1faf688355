"""Translate an axolotl config into an ftlaunch recipe (`launch import CONFIG.yaml`).

`translate(config, paths)` is the whole translation: axolotl's keys in, a recipe mapping out, with one row per
translated key (axolotl key -> recipe key = value), the keys left out with the reason for each, and notes. It reads
the file system only to tell local paths from Hugging Face Hub ids and to read a `deepspeed:` JSON file.

What maps:
  model     base_model (a local directory; a hub id gets a placeholder directory and a note saying to download it),
            tokenizer_config, trust_remote_code, gradient_checkpointing, bf16 / fp16 -> model.dtype,
            flash_attention / sdp_attention / eager_attention -> model.attn_implementation
  data      datasets / test_datasets -> data.train / data.eval (a local path, or a Hub id -> hub with split, name ->
            subset, revision): alpaca -> alpaca with data.prompt_style: alpaca (axolotl's Alpaca prompt text);
            chat_template, sharegpt and messages -> messages when the rows hold `messages` or `conversations` with
            role/content or from/value (the two layouts ftlaunch reads; other field mappings are refused);
            completion (field `text`) -> text. Also sequence_len, sample_packing, train_on_inputs, val_set_size,
            chat_template(_jinja), default_system_message, dataset_processes
  method    adapter, load_in_4bit / load_in_8bit, peft_use_dora, lora_r / lora_alpha / lora_dropout,
            lora_target_modules / lora_target_linear, lora_modules_to_save, bnb_config_kwargs, unfrozen_parameters
  optim     optimizer (AdamW and its bitsandbytes 8-bit / paged variants), learning_rate, lr_scheduler (linear,
            cosine, constant), cosine_min_lr_ratio, warmup_steps / warmup_ratio, weight_decay, max_grad_norm,
            adam_beta1 / adam_beta2 / adam_epsilon, micro_batch_size, gradient_accumulation_steps (or batch_size),
            num_epochs, max_steps, seed
  schedule  eval_steps, save_steps (a fraction of the run only with max_steps), save_total_limit,
            early_stopping_patience, logging_steps, use_tensorboard, output_dir -> output.root + output.name
  strategy  deepspeed JSON (ZeRO stage, optimizer / parameter offload, buckets, overlap_comm, ...) -> zero1/2/3;
            fsdp / fsdp_config (reshard, sharding strategy, CPU offload, activation checkpointing) -> fsdp (FSDP2)

  tracking  wandb_project / wandb_entity / wandb_name / wandb_mode / wandb_log_model -> logging.wandb;
            mlflow_tracking_uri / mlflow_experiment_name / mlflow_run_name / hf_mlflow_log_artifacts -> logging.mlflow

What does not map is listed with its reason: other trackers (comet_*, swanlab_*) and W&B keys ftlaunch handles
itself (wandb_run_id, wandb_watch), the Hub, other projects' kernels and patches, per-epoch schedules (ftlaunch counts
optimizer steps; steps per epoch are known only after tokenizing), added or special tokens, per-role loss, and any key
this module does not know.

Refused with a RecipeError naming the key (the CLI exits 2): a config that is not a mapping, no base_model or no
datasets, a dataset type or field mapping ftlaunch cannot read, conflicting keys (load_in_4bit with load_in_8bit,
bf16 with fp16, deepspeed with fsdp, two attention kernels, warmup_steps with warmup_ratio, val_set_size with
test_datasets), a deepspeed JSON that cannot be read, and `rl` (ftlaunch trains supervised fine-tuning only).

Planning side: no torch; the caller reads the YAML (launcher.config.recipe.read_yaml) and validates the result.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, NoReturn

import yaml
from pydantic import BaseModel

from launcher.config.recipe import KeyPath, Location, Problem, RecipeError
from launcher.config.schema import LORA_TARGET_ALL, Recipe

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
class _Builder:
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


# ---------------------------------------------------------------------------------------------------- the entry
def translate(config: Any, paths: Paths, locations: Mapping[KeyPath, Location] | None = None,
              source: str = "axolotl config") -> Translation:
    """The recipe an axolotl config stands for. Raises RecipeError (naming the key, what was expected and the fix)
    for input that cannot be translated."""
    if not isinstance(config, dict):
        raise RecipeError([Problem("(root)", f"an axolotl config is a mapping of keys, got "
                                   f"{type(config).__name__}", (locations or {}).get(()),
                                   "start from an axolotl example such as examples/llama-3/qlora.yml")], source)
    b = _Builder(config, paths, locations or {}, source)
    _refuse_other_trainers(b)
    dtype = _model(b)
    _data(b)
    _method(b, dtype)
    _optim(b)
    _schedule(b)
    _output(b)
    _tracking(b)
    _strategy(b)
    _leftovers(b)
    b.out.recipe = order_like_schema(b.out.recipe)
    return b.out


def _refuse_other_trainers(b: _Builder) -> None:
    for key in ("rl", "reward_model", "process_reward_model"):
        if b.get(key):
            b.fail(key, f"{b.get(key)!r} selects a trainer ftlaunch does not have: it trains supervised "
                   "fine-tuning only", "import the config of the supervised (SFT) stage instead")


# --------------------------------------------------------------------------------------------------------- model
ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager"}
OTHER_ATTENTION = ("xformers_attention", "flex_attention", "s2_attention")


def _model(b: _Builder) -> str | None:
    """model.*; returns the training dtype when a key decides it (QLoRA's compute dtype follows it)."""
    _base_model(b)
    tokenizer = b.get("tokenizer_config")
    if tokenizer is not None and not isinstance(tokenizer, str):
        b.fail("tokenizer_config", "expected a tokenizer directory")
    if tokenizer is not None:
        local = b.paths.locate(tokenizer)
        if local is not None:
            b.put("tokenizer_config", "model.tokenizer", b.paths.for_recipe(local))
        else:
            b.skip("tokenizer_config", f"{tokenizer} is not a local directory: ftlaunch works offline; download it "
                   "and set model.tokenizer")
    if b.get("trust_remote_code") is not None:
        b.put("trust_remote_code", "model.trust_remote_code", bool(b.get("trust_remote_code")))
    _gradient_checkpointing(b)
    _attention(b)
    return _precision(b)


def _base_model(b: _Builder) -> None:
    base = b.get("base_model")
    if not isinstance(base, str) or not base.strip():
        b.fail("base_model", "required: the model to fine-tune (a string)",
               "set base_model to a local Hugging Face model directory")
    local = b.paths.locate(base)
    if local is not None:
        b.put("base_model", "model.path", b.paths.for_recipe(local))
        return
    if is_hub_like(base) or base.startswith(REMOTE):
        target = b.paths.recipe_dir / "models" / PurePosixPath(base.rstrip("/")).name
        b.put("base_model", "model.path", b.paths.for_recipe(target))
        fetch = (f"`huggingface-cli download {base} --local-dir {target}`" if is_hub_like(base)
                 else f"copy it to {target}")
        b.note(f"base_model {base} is not a local directory (a Hugging Face Hub id or a URL), and ftlaunch trains "
               f"offline from local directories: download it first ({fetch}), or set model.path to a copy you have")
        return
    missing = b.paths.missing(base)
    b.put("base_model", "model.path", b.paths.for_recipe(missing))
    b.note(f"base_model {base}: {missing} does not exist here; put the model directory there or change model.path")


def _gradient_checkpointing(b: _Builder) -> None:
    value = b.config.get("gradient_checkpointing")
    if value is None:
        return
    b.put("gradient_checkpointing", "model.gradient_checkpointing", bool(value))
    if isinstance(value, str):  # `offload` / `offload_disk`: recomputation plus moving activations off the GPU
        b.note(f"gradient_checkpointing: {value}: ftlaunch recomputes activations but does not offload them")
    if b.get("gradient_checkpointing_kwargs"):
        b.skip("gradient_checkpointing_kwargs", "no ftlaunch equivalent: ftlaunch checkpoints each decoder layer "
               "with its own settings")


def _attention(b: _Builder) -> None:
    chosen = [key for key in (*ATTENTION, *OTHER_ATTENTION) if b.get(key)]
    if len(chosen) > 1:
        b.conflict(chosen[0], chosen[1], "keep one attention implementation")
    for key in (*ATTENTION, *OTHER_ATTENTION):
        value = b.config.get(key)
        if value is None:
            continue
        if not value:
            b.skip(key, OFF)
        elif key in ATTENTION:
            b.put(key, "model.attn_implementation", ATTENTION[key])
        else:
            b.skip(key, "no ftlaunch equivalent: model.attn_implementation is eager, sdpa (default) or "
                   "flash_attention_2")


def _precision(b: _Builder) -> str | None:
    bf16, fp16 = b.config.get("bf16"), b.config.get("fp16")
    if bf16 in (True, "full") and fp16:
        b.conflict("bf16", "fp16", "keep bf16 (Ampere GPUs and later) or fp16")
    if fp16:
        b.put("fp16", "model.dtype", "float16")
        if bf16 is not None:
            b.skip("bf16", "fp16 decides the dtype")
        return "float16"
    if fp16 is not None:
        b.skip("fp16", OFF)
    if bf16 is None:
        return None  # axolotl's default `auto` is bf16 on every GPU ftlaunch targets: ftlaunch's default too
    if bf16 is False:
        b.put("bf16", "model.dtype", "float32")
        return "float32"
    b.put("bf16", "model.dtype", "bfloat16")
    if bf16 == "auto":
        b.note("bf16: auto trains in bf16 where the GPU has it; ftlaunch trains in model.dtype (bfloat16 here; "
               "set model.dtype: float32 for CPU runs)")
    return "bfloat16"


# ---------------------------------------------------------------------------------------------------------- data
def _data(b: _Builder) -> None:
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


def _sources(b: _Builder, key: str, datasets: list[Any], split: str,
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


def _dataset_paths(b: _Builder, prefix: str, ds: dict[str, Any]) -> list[tuple[str, str]]:
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


def _dataset_path(b: _Builder, key: str, text: str, target: str, ds: dict[str, Any], prefix: str) -> None:
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


def _hub_dataset(b: _Builder, key: str, repo: str, target: str, ds: dict[str, Any], prefix: str) -> None:
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


def _format(b: _Builder, prefix: str, ds: dict[str, Any]) -> str:
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


def _completion_field(b: _Builder, prefix: str, ds: dict[str, Any]) -> None:
    column = ds.get("field")
    if column is None:
        return
    if column != "text":
        b.fail(f"{prefix}.field", f"ftlaunch's text format reads the `text` field, not {column!r}",
               f"rename the {column!r} field to `text` in the data")
    b.skip(f"{prefix}.field", "ftlaunch default already: the text format reads `text`")


def _message_fields(b: _Builder, prefix: str, ds: dict[str, Any], sharegpt: bool) -> None:
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


def _layout(b: _Builder, prefix: str, ds: dict[str, Any], sharegpt: bool) -> tuple[str, str]:
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


def _roles(b: _Builder, prefix: str, ds: dict[str, Any], role_key: str) -> None:
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


def _roles_to_train(b: _Builder, prefix: str, ds: dict[str, Any], role_key: str) -> None:
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


def _dataset_leftovers(b: _Builder, prefix: str, ds: dict[str, Any]) -> None:
    answered = {key.split(".")[2] for key, _ in b.out.untranslated if key.startswith(prefix + ".")}
    answered |= {row.source.split(".")[2] for row in b.out.translated if row.source.startswith(prefix + ".")}
    for name, value in ds.items():
        if name in answered:
            continue
        if is_empty(value):
            b.skip(f"{prefix}.{name}", EMPTY)
        elif name not in DATASET_KEYS_DONE:
            b.skip(f"{prefix}.{name}", DATASET_REASONS.get(name, "not a dataset key this importer knows"))


def _chat_templates(b: _Builder, found: list[tuple[str, str | None, str | None]]) -> None:
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


def _template_value(b: _Builder, key: str, name: str, jinja: Any) -> str | None:
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


def _jinja_template(b: _Builder, key: str, jinja: Any) -> str:
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


def _tokenizer_has_template(b: _Builder) -> bool:
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


def _data_settings(b: _Builder) -> None:
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


def _val_set_size(b: _Builder) -> None:
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


# -------------------------------------------------------------------------------------------------------- method
QUANT_KWARGS = {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
                "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage"}
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
             "lora_modules_to_save", "lora_model_dir", "lora_fan_in_fan_out", "peft_use_dora", "peft_use_rslora",
             "bnb_config_kwargs")


def _method(b: _Builder, dtype: str | None) -> None:
    adapter, q4, q8 = b.get("adapter"), bool(b.get("load_in_4bit")), bool(b.get("load_in_8bit"))
    if q4 and q8:
        b.conflict("load_in_4bit", "load_in_8bit", "keep load_in_4bit (QLoRA) or load_in_8bit")
    for key, on in (("load_in_4bit", q4), ("load_in_8bit", q8)):
        if b.config.get(key) is not None and not on:
            b.skip(key, OFF)
    if adapter is None:
        _full_method(b, q4, q8)
        return
    if adapter not in ("lora", "qlora"):
        b.fail("adapter", f"adapter {adapter!r} has no ftlaunch method", "use adapter: lora or qlora, or leave it "
               "out for full fine-tuning")
    if adapter == "qlora" and q8:
        b.conflict("adapter", "load_in_8bit", "qlora quantizes the base to 4 bits: use adapter: lora with "
                   "load_in_8bit, or load_in_4bit")
    bits = 8 if q8 else 4 if (q4 or adapter == "qlora") else None
    _adapter_name(b, adapter, bits)
    _lora_fields(b)
    if bits is not None:
        _quant_fields(b, bits, dtype)
    elif b.get("bnb_config_kwargs"):
        b.skip("bnb_config_kwargs", "the base is not quantized (no load_in_4bit / load_in_8bit)")
    if b.get("unfrozen_parameters"):
        b.skip("unfrozen_parameters", "an adapter trains its own weights: ftlaunch's freeze method is for full "
               "fine-tuning")


def _full_method(b: _Builder, q4: bool, q8: bool) -> None:
    if q4 or q8:
        key = "load_in_4bit" if q4 else "load_in_8bit"
        b.fail(key, "a quantized base trains adapters only, and no adapter is set",
               "set adapter: qlora (with load_in_4bit) or adapter: lora, or drop the quantization")
    patterns = b.get("unfrozen_parameters")
    if patterns:
        b.put("unfrozen_parameters", "method.name", "freeze")
        b.put("unfrozen_parameters", "method.trainable_patterns", b.names("unfrozen_parameters", patterns))
    else:
        b.put("adapter (not set)", "method.name", "full")  # ftlaunch's default method is lora: say full
    for key in LORA_ONLY:
        if b.config.get(key) is not None:
            b.skip(key, "no adapter is set: axolotl ignores it as well")


def _adapter_name(b: _Builder, adapter: str, bits: int | None) -> None:
    dora = b.get("peft_use_dora")
    if dora and bits is not None:
        b.conflict("load_in_4bit" if bits == 4 else "load_in_8bit", "peft_use_dora",
                   "ftlaunch's dora trains on an unquantized base: drop peft_use_dora or the quantization")
    if dora:  # both keys decide it: adapter: lora plus peft_use_dora
        b.put("adapter", "method.name", "dora")
        b.put("peft_use_dora", "method.name", "dora")
    else:
        b.put("adapter", "method.name", "qlora" if bits is not None else "lora")
        if b.config.get("peft_use_dora") is not None:
            b.skip("peft_use_dora", OFF)
    if bits is not None:
        source = f"load_in_{bits}bit" if b.get(f"load_in_{bits}bit") else "adapter"
        b.put(source, "method.bits", bits)
        if source == "adapter":
            b.note("adapter: qlora without load_in_4bit (axolotl refuses that): translated as a 4-bit base")


def _lora_fields(b: _Builder) -> None:
    if b.config.get("lora_r") is not None:
        b.put("lora_r", "method.r", b.number("lora_r", b.config["lora_r"], int))
    if b.config.get("lora_alpha") is not None:
        b.put("lora_alpha", "method.alpha", b.number("lora_alpha", b.config["lora_alpha"]))
    dropout = b.config.get("lora_dropout")
    # axolotl's default dropout is 0 and ftlaunch's 0.05: write it either way.
    b.put("lora_dropout" if dropout is not None else "lora_dropout (axolotl default)", "method.dropout",
          0.0 if dropout is None else b.number("lora_dropout", dropout))
    _lora_targets(b)
    if b.get("lora_modules_to_save"):
        b.put("lora_modules_to_save", "method.modules_to_save", b.names("lora_modules_to_save",
                                                                        b.get("lora_modules_to_save")))
    reasons = {"lora_model_dir": "no ftlaunch equivalent: training starts from new adapters",
               "lora_fan_in_fan_out": "no ftlaunch equivalent (PEFT detects Conv1D layers itself)",
               "peft_use_rslora": "no ftlaunch equivalent: updates are scaled by alpha / r"}
    for key, reason in reasons.items():
        value = b.config.get(key)
        if value is not None:
            b.skip(key, reason if value else OFF)


def _lora_targets(b: _Builder) -> None:
    modules, linear = b.config.get("lora_target_modules"), b.get("lora_target_linear")
    if linear:
        b.put("lora_target_linear", "method.target_modules", LORA_TARGET_ALL)
        if modules:
            b.skip("lora_target_modules", "covered: lora_target_linear adapts every linear layer, these included")
        return
    if b.config.get("lora_target_linear") is not None:
        b.skip("lora_target_linear", OFF)
    if not modules:
        b.note("neither lora_target_modules nor lora_target_linear is set: ftlaunch adapts every linear layer "
               "(method.target_modules: all-linear)")
        return
    if isinstance(modules, str):
        if modules.replace("_", "-") == LORA_TARGET_ALL:
            b.put("lora_target_modules", "method.target_modules", LORA_TARGET_ALL)
            return
        if not re.fullmatch(r"\w+", modules):
            b.fail("lora_target_modules", f"{modules!r} is a regular expression; ftlaunch takes module names",
                   "list the module names (q_proj, v_proj, ...) or set lora_target_linear: true")
    b.put("lora_target_modules", "method.target_modules", b.names("lora_target_modules", modules))


def _quant_fields(b: _Builder, bits: int, dtype: str | None) -> None:
    kwargs = b.get("bnb_config_kwargs", {})
    if not isinstance(kwargs, dict):
        b.fail("bnb_config_kwargs", "expected a mapping of BitsAndBytesConfig arguments")
    for name, value in kwargs.items():
        key = f"bnb_config_kwargs.{name}"
        if name in QUANT_KWARGS and bits == 4:
            text = str(value).removeprefix("torch.")
            b.put(key, f"method.{QUANT_KWARGS[name]}", value if isinstance(value, bool) else text)
        else:
            b.skip(key, "no ftlaunch equivalent" if bits == 4 else "8-bit bases take no quantization options")
    if bits == 4 and dtype is not None and "bnb_4bit_compute_dtype" not in kwargs:
        # axolotl computes the 4-bit matmuls in the training dtype.
        b.put("bf16" if dtype != "float16" else "fp16", "method.compute_dtype", dtype)


# --------------------------------------------------------------------------------------------------------- optim
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw_32bit": "paged_adamw_32bit"}
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _optim(b: _Builder) -> None:
    _optimizer(b)
    if b.config.get("learning_rate") is not None:
        b.put("learning_rate", "optim.lr", b.number("learning_rate", b.config["learning_rate"]))
    _schedule_kind(b)
    _warmup(b)
    if b.config.get("weight_decay") is not None:
        b.put("weight_decay", "optim.weight_decay", b.number("weight_decay", b.config["weight_decay"]))
    if b.config.get("max_grad_norm") is not None:
        norm = b.number("max_grad_norm", b.config["max_grad_norm"])
        b.put("max_grad_norm", "optim.max_grad_norm", norm or None)  # 0 turns clipping off, as null does here
    _adam(b)
    _batch(b)
    if b.config.get("num_epochs") is not None:
        b.put("num_epochs", "optim.epochs", b.number("num_epochs", b.config["num_epochs"]))
    if b.config.get("max_steps") is not None:
        b.put("max_steps", "optim.max_steps", b.number("max_steps", b.config["max_steps"], int))
    if b.config.get("seed") is not None:
        b.put("seed", "optim.seed", b.number("seed", b.config["seed"], int))


def _optimizer(b: _Builder) -> None:
    name = b.config.get("optimizer")
    if name is None:
        return
    if b.text("optimizer", name, "an optimizer name") in OPTIMIZERS:
        b.put("optimizer", "optim.name", OPTIMIZERS[name])
    else:
        b.skip("optimizer", f"{name}: ftlaunch has AdamW (torch, 8-bit, paged 8/32-bit) only; AdamW is used")


def _schedule_kind(b: _Builder) -> None:
    name = b.config.get("lr_scheduler")
    if name is not None:
        if b.text("lr_scheduler", name, "a scheduler name") in SCHEDULES:
            b.put("lr_scheduler", "optim.schedule", SCHEDULES[name])
        else:
            b.skip("lr_scheduler", f"{name}: ftlaunch has linear, cosine and constant; cosine (its default) is used")
    ratio = b.config.get("cosine_min_lr_ratio")
    if ratio is not None:
        if name in (None, "cosine"):
            b.put("cosine_min_lr_ratio", "optim.min_lr_ratio", b.number("cosine_min_lr_ratio", ratio))
        else:
            b.skip("cosine_min_lr_ratio", "applies to the cosine schedule only")
    for key in ("cosine_constant_lr_ratio", "lr_scheduler_kwargs", "lr_quadratic_warmup", "lr_div_factor"):
        if b.config.get(key) is not None:
            b.skip(key, "no ftlaunch equivalent: schedules are linear warmup then linear, cosine or constant")


def _warmup(b: _Builder) -> None:
    steps, ratio = b.config.get("warmup_steps"), b.config.get("warmup_ratio")
    if steps and ratio:
        b.conflict("warmup_steps", "warmup_ratio", "keep warmup_steps or warmup_ratio")
    if steps is not None:
        b.put("warmup_steps", "optim.warmup_steps", b.number("warmup_steps", steps, int))
    if ratio is not None:
        b.put("warmup_ratio", "optim.warmup_ratio", b.number("warmup_ratio", ratio))


def _adam(b: _Builder) -> None:
    beta1, beta2 = b.config.get("adam_beta1"), b.config.get("adam_beta2")
    if beta1 is not None or beta2 is not None:  # the one not given keeps torch's default, as in axolotl
        betas = [b.number("adam_beta1", 0.9 if beta1 is None else beta1),
                 b.number("adam_beta2", 0.999 if beta2 is None else beta2)]
        b.put("adam_beta1" if beta1 is not None else "adam_beta2", "optim.betas", betas)
        if beta1 is not None and beta2 is not None:
            b.put("adam_beta2", "optim.betas", betas)
    if b.config.get("adam_epsilon") is not None:
        b.put("adam_epsilon", "optim.eps", b.number("adam_epsilon", b.config["adam_epsilon"]))


def _batch(b: _Builder) -> None:
    micro, accum, total = (b.config.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "batch_size"))
    if micro is not None:
        b.put("micro_batch_size", "optim.micro_batch", b.number("micro_batch_size", micro, int))
    if accum is not None:
        b.put("gradient_accumulation_steps", "optim.grad_accum", b.number("gradient_accumulation_steps", accum, int))
    if total is None:
        return
    total = b.number("batch_size", total, int)
    if accum is None:
        # axolotl's own rule: gradient_accumulation_steps = batch_size // micro_batch_size.
        b.put("batch_size", "optim.grad_accum", max(1, total // (b.number("micro_batch_size", micro or 1, int))))
    else:
        b.skip("batch_size", "gradient_accumulation_steps is set: axolotl recomputes batch_size from it")


# ----------------------------------------------------------------------------------------- eval, save, log, output
def _schedule(b: _Builder) -> None:
    has_eval = bool(b.out.recipe.get("data", {}).get("eval") or b.out.recipe.get("data", {}).get("eval_fraction"))
    _every("eval_steps", "eval.every_steps", b, has_eval)
    _every("save_steps", "checkpoint.every_steps", b, True)
    for key, what, target in (("evals_per_epoch", "evaluation", "eval.every_steps"),
                              ("saves_per_epoch", "checkpoints", "checkpoint.every_steps")):
        if b.config.get(key) is not None:
            b.skip(key, f"ftlaunch schedules {what} every N optimizer steps, and steps per epoch are known only "
                   f"after tokenizing: set {target}")
    if b.config.get("save_total_limit") is not None:
        b.put("save_total_limit", "checkpoint.keep_last",
              b.number("save_total_limit", b.config["save_total_limit"], int))
    patience = b.config.get("early_stopping_patience")
    if patience is not None:
        if b.out.recipe.get("eval", {}).get("every_steps"):
            b.put("early_stopping_patience", "early_stopping.patience",
                  b.number("early_stopping_patience", patience, int))
        else:
            b.skip("early_stopping_patience", "needs periodic evaluation (eval_steps as a step count), which this "
                   "config does not translate to")
    if b.config.get("logging_steps") is not None:
        b.put("logging_steps", "logging.every_steps", b.number("logging_steps", b.config["logging_steps"], int))
    if b.config.get("use_tensorboard") is not None:
        b.put("use_tensorboard", "logging.tensorboard", bool(b.config["use_tensorboard"]))


def _every(key: str, target: str, b: _Builder, applies: bool) -> None:
    value = b.config.get(key)
    if value is None:
        return
    if not applies:
        b.skip(key, "no evaluation data (val_set_size 0, no test_datasets)")
        return
    value = b.number(key, value)
    if value >= 1:
        b.put(key, target, b.number(key, value, int))
        return
    max_steps = b.config.get("max_steps")
    if max_steps:  # a fraction of the run, as in transformers
        b.put(key, target, max(1, round(value * b.number("max_steps", max_steps, int))))
    else:
        b.skip(key, f"{value}: a fraction of the run needs max_steps (steps per epoch are known only after "
               "tokenizing): set " + target)


def _output(b: _Builder) -> None:
    out = b.config.get("output_dir")
    if is_empty(out):
        return
    path = PurePosixPath(b.text("output_dir", out, "a directory").rstrip("/") or "/")
    # ftlaunch writes a run to output.root/output.name (relative to the working directory, as axolotl's output_dir).
    b.put("output_dir", "output.root", str(path.parent))
    if NAME_PATTERN.match(path.name) and len(path.name) <= 128:
        b.put("output_dir", "output.name", path.name)
        b.note(f"output_dir {out}: ftlaunch writes the run directory there (adapter/ or model/, checkpoints/, "
               "metrics.jsonl), and adds a suffix instead of overwriting an existing run")
    else:
        b.note(f"output_dir {out}: {path.name!r} is not a run name ftlaunch takes (letters, digits, `.`, `_`, `-`): "
               f"runs go to {path.parent}/<recipe name>")


# ------------------------------------------------------------------------------------------------------ tracking
WANDB_KEYS = {"wandb_project": "project", "wandb_entity": "entity", "wandb_name": "name"}
MLFLOW_KEYS = {"mlflow_tracking_uri": "tracking_uri", "mlflow_experiment_name": "experiment",
               "mlflow_run_name": "run_name"}


def _tracking(b: _Builder) -> None:
    """W&B and MLflow as axolotl turns them on: W&B when `wandb_project` is set (or `use_wandb`), offline with
    `wandb_mode: offline`; MLflow when `mlflow_tracking_uri` is set (or `use_mlflow`)."""
    if b.config.get("wandb_mode") == "disabled" or b.config.get("use_wandb") is False:
        for key in b.config:
            if key.startswith(("wandb_", "use_wandb")):
                b.skip(key, "W&B is turned off in this config (wandb_mode: disabled / use_wandb: false)")
    elif not is_empty(b.config.get("wandb_project")) or b.config.get("use_wandb") is True:
        _tracker_keys(b, WANDB_KEYS, "logging.wandb")
        mode = b.config.get("wandb_mode")
        if mode in ("online", "offline"):
            b.put("wandb_mode", "logging.wandb.mode", mode)
        elif "logging" not in b.out.recipe or "wandb" not in b.out.recipe["logging"]:
            b.put("use_wandb", "logging.wandb.mode", "online")
        log_model = b.config.get("wandb_log_model")
        if log_model in ("end", "checkpoint"):
            b.put("wandb_log_model", "logging.wandb.log_artifacts", True)
            if log_model == "checkpoint":
                b.note("wandb_log_model: checkpoint: ftlaunch logs the final adapter/model as an artifact, not each "
                       "checkpoint")
        b.handled.add("use_wandb")
    for key, why in (("wandb_run_id", "ftlaunch keeps the W&B run id itself (RUN_DIR/tracking.json): a resumed run "
                      "continues it"), ("wandb_watch", "ftlaunch does not log gradients or weights to W&B")):
        if not is_empty(b.config.get(key)) and key not in b.handled:
            b.skip(key, why)
    if not is_empty(b.config.get("mlflow_tracking_uri")) or b.config.get("use_mlflow") is True:
        _tracker_keys(b, MLFLOW_KEYS, "logging.mlflow")
        if "mlflow" not in b.out.recipe.get("logging", {}):
            b.put("use_mlflow", "logging.mlflow", {})  # every field defaulted: a store in the run directory
        if b.config.get("hf_mlflow_log_artifacts") is True:
            b.put("hf_mlflow_log_artifacts", "logging.mlflow.log_artifacts", True)
        b.handled.add("use_mlflow")


def _tracker_keys(b: _Builder, keys: Mapping[str, str], section: str) -> None:
    for key, name in keys.items():
        value = b.config.get(key)
        if not is_empty(value):
            b.put(key, f"{section}.{name}", b.text(key, value, "a name"))


# ------------------------------------------------------------------------------------------------------ strategy
def _strategy(b: _Builder) -> None:
    uses_fsdp = bool(b.get("fsdp")) or bool(b.get("fsdp_config"))
    if b.get("deepspeed") and uses_fsdp:
        b.conflict("deepspeed", "fsdp_config" if b.get("fsdp_config") else "fsdp", "keep deepspeed or fsdp")
    if b.get("deepspeed"):
        _deepspeed(b, _deepspeed_json(b))
    if uses_fsdp:
        _fsdp(b)
    else:
        for key in ("fsdp", "fsdp_config", "fsdp_version", "fsdp_final_state_dict_type"):
            if b.config.get(key) is not None and key not in b.handled:
                b.skip(key, "FSDP is not turned on (no fsdp / fsdp_config)" if b.get(key) else EMPTY)


def _deepspeed_json(b: _Builder) -> dict[str, Any]:
    value = b.get("deepspeed")
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        b.fail("deepspeed", "expected the path of a DeepSpeed JSON file (or its content as a mapping)")
    path = b.paths.locate(value)
    if path is None or not path.is_file():
        looked = ", ".join(dict.fromkeys(str(d) for d in b.paths.search))
        b.fail("deepspeed", f"{value}: file not found (looked in {looked})",
               "give the path of the JSON (`axolotl fetch deepspeed_configs` writes axolotl's)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        b.fail("deepspeed", f"{path}: not a readable JSON file ({err})", "fix the JSON")
    if not isinstance(data, dict):
        b.fail("deepspeed", f"{path}: expected a JSON object, got {type(data).__name__}")
    b.note(f"deepspeed: read {path}")
    return data


ZERO_OPTIONS = {"overlap_comm": bool, "contiguous_gradients": bool, "reduce_bucket_size": int,
                "allgather_bucket_size": int, "stage3_prefetch_bucket_size": int,
                "stage3_param_persistence_threshold": int, "stage3_gather_16bit_weights_on_model_save": bool,
                "gather_16bit_weights_on_model_save": bool}
"""zero_optimization keys that are strategy.deepspeed options of the same name (the last one is the old name)."""
DS_FROM_RECIPE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def _deepspeed(b: _Builder, ds: dict[str, Any]) -> None:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        b.fail("deepspeed", "zero_optimization: expected a JSON object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        b.fail("deepspeed", f"zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    b.put("deepspeed.zero_optimization.stage", "strategy.name", f"zero{stage}" if stage else "ddp")
    for name, value in zero.items():
        key = f"deepspeed.zero_optimization.{name}"
        if name == "stage":
            continue
        if not stage:
            b.skip(key, "ZeRO stage 0 is plain data parallelism: translated as ddp, which has no such option")
        elif name in ("offload_optimizer", "offload_param"):
            _offload(b, key, name, value, stage)
        elif name in ZERO_OPTIONS:
            _zero_option(b, key, name, value)
        else:
            b.skip(key, "no ftlaunch option: ftlaunch writes the rest of RUN_DIR/ds_config.json itself")
    for name, value in ds.items():
        if name == "zero_optimization":
            continue
        why = ("ftlaunch fills it from the recipe (optim.*, model.dtype)" if name in DS_FROM_RECIPE
               else "no ftlaunch option: ftlaunch writes the rest of RUN_DIR/ds_config.json itself")
        b.skip(f"deepspeed.{name}", why)


def _offload(b: _Builder, key: str, name: str, value: Any, stage: int) -> None:
    if not isinstance(value, dict):
        b.fail(key, "expected a JSON object with a device")
    device = str(value.get("device", "none"))
    if device not in ("none", "cpu", "nvme"):
        b.fail(key, f"device {device!r}: expected none, cpu or nvme")
    target = "offload_optimizer" if name == "offload_optimizer" else "offload_params"
    if device != "none" and name == "offload_param" and stage < 3:
        b.skip(key, f"ZeRO-{stage} keeps whole weights on every rank: DeepSpeed ignores offload_param below stage 3")
        return
    if device == "nvme" and stage < 3:
        b.skip(key, f"NVMe optimizer offload needs ZeRO-3 (ZeRO-{stage} would use CPU memory): not translated")
        return
    b.put(f"{key}.device", f"strategy.deepspeed.{target}", device)
    if value.get("nvme_path") and device == "nvme":
        b.put(f"{key}.nvme_path", "strategy.deepspeed.nvme_path", str(value["nvme_path"]))
    for sub in value:
        if sub == "pin_memory":
            b.skip(f"{key}.pin_memory", "ftlaunch pins CPU offload memory itself")
        elif sub not in ("device", "nvme_path"):
            b.skip(f"{key}.{sub}", "no ftlaunch option: DeepSpeed's default is used")


def _zero_option(b: _Builder, key: str, name: str, value: Any) -> None:
    target = "stage3_gather_16bit_weights_on_model_save" if name == "gather_16bit_weights_on_model_save" else name
    if value == "auto":
        b.skip(key, "ftlaunch default already: derived from the model's hidden size as DeepSpeed's Hugging Face "
               "integration does")
    elif ZERO_OPTIONS[name] is bool:
        b.put(key, f"strategy.deepspeed.{target}", bool(value))
    else:
        b.put(key, f"strategy.deepspeed.{target}", b.number(key, value, int))


FSDP1_ONLY = ("use_orig_params", "sync_module_states", "backward_prefetch", "backward_prefetch_policy",
              "forward_prefetch", "limit_all_gathers")
FSDP_REASONS = {
    "state_dict_type": "ftlaunch checkpoints are always sharded (torch.distributed.checkpoint); `launch export` "
                       "writes a whole model",
    "final_state_dict_type": "ftlaunch writes a whole model at the end and on `launch export`",
    "cpu_ram_efficient_loading": "no ftlaunch option",
    "cpu_offload_pin_memory": "no ftlaunch option: offloaded state is pinned",
    "mixed_precision_policy": "ftlaunch gathers parameters in model.dtype (strategy.fsdp.param_dtype)",
    "min_num_params": "ftlaunch wraps each decoder layer, not by size",
    "transformer_layer_cls_to_wrap": "ftlaunch default already: it wraps each decoder layer",
}
SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "1": True, "2": False}


def _fsdp(b: _Builder) -> None:
    source = "fsdp_config" if b.get("fsdp_config") else "fsdp"
    b.put(source, "strategy.name", "fsdp")
    words = b.get("fsdp") or []
    # transformers also takes the words as one string (`fsdp: "full_shard auto_wrap"`)
    for j, word in enumerate(words.split() if isinstance(words, str) else b.names("fsdp", words)):
        _fsdp_word(b, f"fsdp.{j}", word)
    config = b.get("fsdp_config", {})
    if not isinstance(config, dict):
        b.fail("fsdp_config", "expected a mapping of FSDP settings")
    for name, value in config.items():
        _fsdp_setting(b, f"fsdp_config.{name}", name.removeprefix("fsdp_"), value)
    for key in ("fsdp_version", "fsdp_final_state_dict_type"):
        if b.config.get(key) is not None:
            _fsdp_setting(b, key, key.removeprefix("fsdp_"), b.config[key])


def _fsdp_word(b: _Builder, key: str, word: str) -> None:
    """One entry of axolotl's older `fsdp:` list (full_shard, shard_grad_op, offload, auto_wrap, ...)."""
    if word in ("full_shard", "shard_grad_op"):
        b.put(key, "strategy.fsdp.reshard_after_forward", word == "full_shard")
    elif word == "offload":
        b.put(key, "strategy.fsdp.cpu_offload", True)
    elif word == "auto_wrap":
        b.skip(key, "ftlaunch default already: it wraps each decoder layer")
    elif word.startswith("hybrid_shard"):
        b.skip(key, "set strategy.fsdp.hybrid_shard_size to the GPUs per node (ftlaunch needs the group size)")
    else:
        b.skip(key, f"{word}: no ftlaunch FSDP option")


def _fsdp_setting(b: _Builder, key: str, name: str, value: Any) -> None:
    if value is None:
        b.skip(key, EMPTY)
    elif name == "version":
        b.skip(key, "ftlaunch's fsdp is FSDP2 (fully_shard) already" if str(value) == "2" else
               "FSDP1: ftlaunch runs FSDP2 (fully_shard); the settings were mapped as axolotl's FSDP1 -> FSDP2 "
               "table maps them")
    elif name in ("offload_params", "activation_checkpointing", "reshard_after_forward"):
        target = "cpu_offload" if name == "offload_params" else name
        b.put(key, f"strategy.fsdp.{target}", bool(value))
    elif name == "sharding_strategy":
        if str(value).upper() in SHARDING:
            b.put(key, "strategy.fsdp.reshard_after_forward", SHARDING[str(value).upper()])
        else:
            b.skip(key, f"{value}: set strategy.fsdp.hybrid_shard_size for hybrid sharding, or strategy.name: ddp "
                   "for none")
    elif name == "auto_wrap_policy":
        b.skip(key, "ftlaunch default already: it wraps each decoder layer" if value == "TRANSFORMER_BASED_WRAP"
               else f"{value}: ftlaunch wraps each decoder layer, not by size")
    elif name in FSDP1_ONLY:
        b.skip(key, "an FSDP1 setting: FSDP2 has none")
    else:
        b.skip(key, FSDP_REASONS.get(name, "no ftlaunch FSDP option"))


# ---------------------------------------------------------------------------------------------------- leftovers
TRACKING = ("experiment tracking in ftlaunch is W&B (wandb_project, ...) and MLflow (mlflow_tracking_uri, ...): "
            "this tracker or key has no equivalent")
HUB = "ftlaunch does not use the Hugging Face Hub: it works offline with local directories"
TOKENS = ("ftlaunch does not change the tokenizer or the embeddings: give a tokenizer directory that already has "
          "the tokens (model.tokenizer)")
KERNELS = ("another project's kernels or patches: ftlaunch has its own (`kernels: [rmsnorm, rope, swiglu, "
           "fused_ce]`), not turned on by import")
RUNTIME = "set at launch time (`launch --procs N`, `--nodes N`), not in the recipe"
NO_EQUIVALENT = "no ftlaunch equivalent"

REASONS: dict[str, str] = {
    **dict.fromkeys(("hub_model_id", "hub_strategy", "hub_revision", "push_dataset_to_hub", "hf_use_auth_token",
                     "push_to_hub", "revision_of_model", "base_model_ignore_patterns"), HUB),
    **dict.fromkeys(("tokens", "added_tokens_overrides", "resize_token_embeddings_to_32x", "mean_resizing_embeddings",
                     "shrink_embeddings", "fix_untrained_tokens", "eot_tokens"), TOKENS),
    **dict.fromkeys(("unsloth_cross_entropy_loss", "unsloth_lora_mlp", "unsloth_lora_qkv", "unsloth_lora_o",
                     "unsloth_rms_norm", "unsloth_rope", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
                     "plugins", "cut_cross_entropy", "flash_attn_cross_entropy", "flash_attn_rms_norm",
                     "flash_attn_fuse_qkv", "flash_attn_fuse_mlp", "flash_optimum", "use_kernels"), KERNELS),
    **dict.fromkeys(("local_rank", "world_size", "ddp", "device", "device_map"), RUNTIME),
    **dict.fromkeys(("ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters"),
                    "no ftlaunch option: its DDP settings come from the strategy"),
    **dict.fromkeys(("resume_from_checkpoint", "auto_resume_from_checkpoints"),
                    "ftlaunch resumes a run from its own checkpoints: `launch --resume RUN_DIR`"),
    **dict.fromkeys(("dataset_prepared_path", "dataset_keep_in_memory", "skip_prepare_dataset", "is_preprocess",
                     "preprocess_iterable", "dataset_num_proc"),
                    "ftlaunch caches tokenized data itself, under $FTLAUNCH_CACHE/tokenized"),
    **dict.fromkeys(("dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
                     "dataloader_drop_last"), "no ftlaunch option: ranks memory-map the tokenized cache"),
    **dict.fromkeys(("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size", "heads_k_stride",
                     "ring_attn_func", "dp_shard_size", "dp_replicate_size"),
                    "ftlaunch has no sequence, context or tensor parallelism"),
    **dict.fromkeys(("torch_compile", "torch_compile_backend", "torch_compile_mode"), "ftlaunch does not compile the "
                    "model"),
    **dict.fromkeys(("model_type", "model_config_type", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy",
                     "processor_type", "cls_model_config", "is_llama_derived_model", "is_mistral_derived_model",
                     "is_falcon_derived_model", "is_qwen_derived_model"),
                    "ftlaunch loads AutoModelForCausalLM and AutoTokenizer, which read the classes from the model "
                    "directory"),
    **dict.fromkeys(("dpo_beta", "rl_beta", "orpo_alpha", "rpo_alpha", "simpo_gamma", "cpo_alpha", "trl", "vllm",
                     "kto_desirable_weight", "kto_undesirable_weight", "dpo_use_weighting",
                     "dpo_use_logits_to_keep", "max_prompt_len"), "an RL trainer setting: ftlaunch trains SFT"),
    **dict.fromkeys(("eval_batch_size", "eval_table_size", "eval_max_new_tokens", "do_causal_lm_eval",
                     "eval_causal_lm_metrics", "do_bench_eval", "bench_dataset", "bench_split",
                     "metric_for_best_model", "greater_is_better", "load_best_model_at_end", "eval_strategy",
                     "evaluation_strategy", "save_strategy"),
                    "no ftlaunch equivalent: ftlaunch evaluates loss and perplexity every eval.every_steps, and "
                    "checkpoints every checkpoint.every_steps"),
    "base_model_config": "ftlaunch reads config.json from model.path",
    "strict": "ftlaunch recipes are always strict (unknown keys fail)",
    "special_tokens": TOKENS,
    "pad_to_sequence_len": "no ftlaunch equivalent: batches are padded to their longest row (packing fills "
                           "data.max_length)",
    "eval_sample_packing": "no ftlaunch option: evaluation uses the same data settings",
    "group_by_length": NO_EQUIVALENT,
    "curriculum_sampling": NO_EQUIVALENT + ": data is shuffled with optim.seed",
    "shuffle_merged_datasets": "ftlaunch always shuffles the training data (optim.seed)",
    "auto_find_batch_size": "ftlaunch sizes the batch at plan time: optim.micro_batch: auto with --gpu-mem",
    "save_safetensors": "ftlaunch always writes safetensors",
    "save_only_model": "ftlaunch checkpoints hold the whole training state, for exact resumes",
    "merge_lora": "an axolotl command: ftlaunch merges with output.merge: true or `launch export --merge`",
    "neftune_noise_alpha": NO_EQUIVALENT,
    "debug": NO_EQUIVALENT,
    "gc_steps": NO_EQUIVALENT,
    "gpu_memory_limit": "ftlaunch sizes memory at plan time (--gpu-mem)",
    "max_memory": "ftlaunch sizes memory at plan time (--gpu-mem)",
    "low_cpu_mem_usage": "ftlaunch loads models with low CPU memory use already",
    "embeddings_skip_upcast": NO_EQUIVALENT,
    "tf32": "no ftlaunch option: PyTorch's default float32 matmul precision is used",
    "bfloat16": "ftlaunch's precision comes from bf16 / fp16 (model.dtype); pure 16-bit weights are "
                "model.master_weights: false",
    "float16": "ftlaunch's precision comes from bf16 / fp16 (model.dtype)",
    "float32": "ftlaunch's precision comes from bf16 / fp16 (model.dtype)",
    "pretraining_dataset": "ftlaunch trains from local datasets, not streamed pretraining data",
    "peft_layers_to_transform": NO_EQUIVALENT + ": adapters go on every matching layer",
    "lora_on_cpu": NO_EQUIVALENT,
    "loraplus_lr_ratio": NO_EQUIVALENT + ": one learning rate for all trainable weights",
    "loraplus_lr_embedding": NO_EQUIVALENT,
    "embedding_lr": NO_EQUIVALENT + ": one learning rate for all trainable weights",
    "embedding_lr_scale": NO_EQUIVALENT + ": one learning rate for all trainable weights",
    "lr_groups": NO_EQUIVALENT + ": one learning rate for all trainable weights",
    "optim_args": NO_EQUIVALENT,
    "optim_target_modules": NO_EQUIVALENT,
    "relora": NO_EQUIVALENT,
    "gptq": NO_EQUIVALENT + ": ftlaunch quantizes with bitsandbytes (load_in_4bit / load_in_8bit)",
    "qat": NO_EQUIVALENT,
    "quantization": NO_EQUIVALENT,
    "loss_watchdog_threshold": "ftlaunch stops after optim.max_nonfinite_steps non-finite steps instead",
    "loss_watchdog_patience": "ftlaunch stops after optim.max_nonfinite_steps non-finite steps instead",
    "profiler_steps": NO_EQUIVALENT,
    "include_tokens_per_second": "ftlaunch logs tokens/s always",
    "chat_template_kwargs": NO_EQUIVALENT,
}
STILL_ON = {"strict", "save_safetensors", "shuffle_merged_datasets", "low_cpu_mem_usage", "include_tokens_per_second"}
"""Keys whose `false` ftlaunch does not follow: their reason says what it does instead."""
PREFIX_REASONS = (("wandb_", TRACKING), ("use_wandb", TRACKING), ("mlflow_", TRACKING), ("use_mlflow", TRACKING),
                  ("comet_", TRACKING), ("use_comet", TRACKING), ("swanlab_", TRACKING), ("use_swanlab", TRACKING),
                  ("liger_", KERNELS), ("unsloth_", KERNELS), ("relora_", NO_EQUIVALENT), ("lisa_", NO_EQUIVALENT),
                  ("hub_", HUB), ("gradio_", NO_EQUIVALENT), ("ray_", RUNTIME), ("use_ray", RUNTIME))


def _leftovers(b: _Builder) -> None:
    """Every key no handler answered gets a reason: the config's keys are all accounted for."""
    special = b.config.get("special_tokens")
    if isinstance(special, dict) and "special_tokens" not in b.handled:
        for name, value in special.items():
            b.skip(f"special_tokens.{name}", EMPTY if value is None else
                   "ftlaunch pads with the tokenizer's pad token, or EOS when it has none (padding carries no "
                   "labels)" if name == "pad_token" else TOKENS)
    for key, value in b.config.items():
        if key in b.handled:
            continue
        reason = REASONS.get(key) or next((why for prefix, why in PREFIX_REASONS if key.startswith(prefix)), None)
        if is_empty(value):
            b.skip(key, EMPTY)
        elif reason is None:
            b.skip(key, "not an axolotl key this importer knows (check its spelling)")
        elif value is False and key not in STILL_ON:
            b.skip(key, OFF)
        else:
            b.skip(key, reason)


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
