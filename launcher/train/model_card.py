"""What makes a run's outputs usable away from this machine: the adapter names its base model by a name others can
resolve, and every output directory carries a model card (README.md) saying what it is and how well it did.

PEFT's `save_pretrained` writes `base_model_name_or_path` = the directory the base was loaded from (for a GGUF, our
conversion cache) and an empty card template; both are replaced here, after the outputs are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.config.schema import Recipe

ADAPTER_CONFIG = "adapter_config.json"
BOTTLENECK_CONFIG = "bottleneck_adapter_config.json"
"""launcher/train/adapters.py's own format (bottleneck adapters are not a PEFT method)."""
CARD = "README.md"
AUTO_CLASSES = {"causal_lm": "CausalLM", "sequence_classification": "SequenceClassification",
                "token_classification": "TokenClassification", "seq2seq": "Seq2SeqLM"}
"""The suffix of the transformers / PEFT auto class that loads each task's outputs."""


def base_model_name(recipe: Recipe) -> str | None:
    """The name the outputs give their base: `model.name`, else the GGUF source (`package:file.gguf` or its path);
    None keeps the local directory PEFT wrote (a plain `model.path` run on this machine)."""
    return recipe.model.name or recipe.model.gguf


def finish_outputs(written: list[Path], recipe: Recipe, final: dict[str, Any], version: str) -> None:
    """Rename the base in each adapter config and write the model card of each output directory."""
    base = base_model_name(recipe)
    for directory in written:
        config = directory / ADAPTER_CONFIG
        if base is not None and config.is_file():
            data = json.loads(config.read_text())
            data["base_model_name_or_path"] = base
            config.write_text(json.dumps(data, indent=2) + "\n")
        (directory / CARD).write_text(card(directory, recipe, final, version, base))


def output_kind(directory: Path) -> str:
    """`adapter` (PEFT's or our bottleneck format) or `model` (a full or merged model)."""
    return "adapter" if (directory / ADAPTER_CONFIG).is_file() or (directory / BOTTLENECK_CONFIG).is_file() else "model"


def card(directory: Path, recipe: Recipe, final: dict[str, Any], version: str, base: str | None) -> str:
    metrics = {k: v for k, v in final.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    peft = (directory / ADAPTER_CONFIG).is_file()
    kind = output_kind(directory)
    head = "---\n" + (f"base_model: {base}\n" if base and recipe.model.name else "") + \
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}\ntags: [ftlaunch, {recipe.task.type}, " \
        f"{recipe.method.name}]\n---\n"
    data = ", ".join(f"`{Path(s.path).name if s.path else s.hub}`" for s in recipe.data.train)  # a file, a Hub name
    lines = [head, f"# {recipe.name}: {directory.name}", "",
             recipe.description or f"Fine-tuned with ftlaunch {version}.", "",
             "| | |", "|---|---|",
             f"| base model | `{base or recipe.model.path}` |",
             f"| task | {recipe.task.type} |",
             f"| method | {recipe.method.name} |",
             f"| training data | {data} |",
             f"| steps | {final.get('step', '?')} |",
             f"| ftlaunch | {version} |", ""]
    if metrics:
        lines += ["## Evaluation (last)", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())), ""]
    auto, here = AUTO_CLASSES[recipe.task.type], f"PATH/TO/{directory.name}"
    if peft:
        load = (f"from peft import AutoPeftModelFor{auto}\n"
                f"model = AutoPeftModelFor{auto}.from_pretrained(\"{here}\")  # base: adapter_config.json")
    elif kind == "adapter":
        load = (f"from transformers import AutoModelFor{auto}\nfrom launcher.train.adapters import load_adapter\n"
                f"model = load_adapter(AutoModelFor{auto}.from_pretrained(BASE), \"{here}\")  # ftlaunch's format")
    else:
        load = f"from transformers import AutoModelFor{auto}\nmodel = AutoModelFor{auto}.from_pretrained(\"{here}\")"
    lines += ["## Loading", "", "```python", load, "```", "",
              "The full recipe is the run directory's plan.json (`recipe`).", ""]
    return "\n".join(lines)
