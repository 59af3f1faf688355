"""The methods beside full/freeze/LoRA: prompt tuning, prefix tuning and (IA)^3 through PEFT, bottleneck adapters
through launcher/train/adapters.py. Each takes the loaded (frozen) base and returns the model to train.

The PEFT task type is the caller's (`launcher.train.model.peft_task_type`), passed in rather than imported, so this
module stays a leaf of model.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.config.schema import AdapterMethod, IA3Method, PrefixTuningMethod, PromptTuningMethod
from launcher.plan.method_params import adapter_bottleneck, ia3_modules

OtherMethod = PromptTuningMethod | PrefixTuningMethod | IA3Method | AdapterMethod
OTHER_METHODS = (PromptTuningMethod, PrefixTuningMethod, IA3Method, AdapterMethod)


def apply_other_method(model: torch.nn.Module, method: OtherMethod, task_type: str,
                       tokenizer_path: Path) -> torch.nn.Module:
    """`model` with the method's trainable modules, everything else frozen. `tokenizer_path` tokenizes a prompt
    tuning `init_text`."""
    if isinstance(method, AdapterMethod):
        from launcher.train.adapters import AdapterSpec, add_adapters

        bottleneck = adapter_bottleneck(int(model.config.hidden_size), method.bottleneck, method.reduction_factor)
        return add_adapters(model, AdapterSpec(bottleneck, tuple(method.placement), method.activation))
    from peft import get_peft_model

    return get_peft_model(model, peft_config(method, model, task_type, tokenizer_path))


def peft_config(method: PromptTuningMethod | PrefixTuningMethod | IA3Method, model: torch.nn.Module,
                task_type: str, tokenizer_path: Path) -> object:
    """The PEFT config of a prompt_tuning, prefix_tuning or ia3 recipe method."""
    if isinstance(method, PromptTuningMethod):
        from peft import PromptTuningConfig, PromptTuningInit

        init = {"sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM,
                "text": PromptTuningInit.TEXT}[method.init]
        text = {"prompt_tuning_init_text": method.init_text, "tokenizer_name_or_path": str(tokenizer_path)} \
            if method.init == "text" else {}
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens,
                                  prompt_tuning_init=init, **text)
    if isinstance(method, PrefixTuningMethod):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens,
                                  prefix_projection=method.projection,
                                  encoder_hidden_size=method.encoder_hidden_size)
    from peft import IA3Config

    modules = ia3_modules(getattr(model.config, "model_type", ""), method.target_modules, method.feedforward_modules)
    targets, feedforward = modules if modules is not None else (None, None)  # None: PEFT's own defaults
    return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward,
                     modules_to_save=list(method.modules_to_save) or None)
