"""Put the fused kernels into a loaded transformers model, instance by instance.

Only the module instances inside the given model change (their ``forward`` becomes an instance attribute); the
transformers classes and modules stay untouched, so other models in the process are unaffected. Supported:
Llama, Mistral, Qwen2 and Qwen3 (transformers 5.x module layout). PEFT wrappers are looked through, so this can be
called before or after ``get_peft_model``.

- ``rmsnorm``: every ``<Family>RMSNorm`` (Qwen3's per-head q/k norms included) uses ``ftkernels.rmsnorm``.
- ``swiglu``: every ``<Family>MLP`` computes ``down(swiglu(gate(x), up(x)))``.
- ``rope``: every ``<Family>Attention`` runs a copy of its own ``forward`` whose global ``apply_rotary_pos_emb``
  is ``ftkernels.rope.apply_rotary_pos_emb``: the attention code itself is not rewritten.
- ``fused_ce``: the ``<Family>ForCausalLM`` forward computes the loss with ``ftkernels.fused_ce`` when ``labels``
  are given and returns ``logits=None``; without labels (generation, eval of logits) it is the original forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ftkernels.fused_ce import fused_linear_cross_entropy
from ftkernels.rmsnorm import rms_norm
from ftkernels.rope import apply_rotary_pos_emb
from ftkernels.swiglu import swiglu

__all__ = ["KERNEL_NAMES", "SUPPORTED_MODEL_TYPES", "apply_kernels", "causal_lm_loss", "set_loss_options"]

KERNEL_NAMES: tuple[str, ...] = ("rmsnorm", "rope", "swiglu", "fused_ce")
# model_type -> class-name prefix of its modules in transformers
SUPPORTED_MODEL_TYPES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_MARK = "_ftlaunch_kernels"  # set of kernel names already applied to a module instance
_LOSS_OPTIONS = "_ftlaunch_loss_options"  # label_smoothing / z_loss for the fused_ce forward


def _rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


_rope_forwards: dict[type, Callable[..., Any]] = {}


def _rope_forward(cls: type) -> Callable[..., Any]:
    """The class' forward, re-created over a copy of its module globals with our ``apply_rotary_pos_emb``."""
    if cls not in _rope_forwards:
        fn = cls.forward
        if "apply_rotary_pos_emb" not in getattr(fn, "__code__", types.SimpleNamespace(co_names=())).co_names:
            raise ValueError(f"rope: {cls.__name__}.forward does not call apply_rotary_pos_emb; cannot patch it")
        env = dict(fn.__globals__)
        env["apply_rotary_pos_emb"] = apply_rotary_pos_emb
        new = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
        new.__kwdefaults__ = fn.__kwdefaults__
        new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
        _rope_forwards[cls] = new
    return _rope_forwards[cls]


def causal_lm_loss(
    hidden_states: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0, **_: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``lm_head(hidden_states)``, computed without the logits.

    Same semantics: labels are shifted left by one (or ``shift_labels`` is used as given), ``ignore_index`` rows
    are skipped, mean over the remaining tokens, or sum / ``num_items_in_batch`` when that is given.
    ``label_smoothing`` and ``z_loss`` default to off, which is what transformers computes.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = fused_linear_cross_entropy(hidden_states, lm_head.weight, shift_labels.to(hidden_states.device),
                                      lm_head.bias, ignore_index=ignore_index, reduction=reduction,
                                      label_smoothing=label_smoothing, z_loss=z_loss)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _make_causal_lm_forward() -> Callable[..., Any]:
    # transformers is imported here, not at module level: ftkernels.patch is importable without it for the kernels'
    # own tests, and transformers probes a package named `kernels` while it imports.
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import can_return_tuple

    @can_return_tuple
    def forward(self: nn.Module, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        # anything but the stock causal-LM loss (a custom loss_function, no labels) takes the original path
        if labels is None or self.loss_function is not ForCausalLMLoss:
            return self._ftlaunch_original_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs)
        if type(self.lm_head) is not nn.Linear:
            raise RuntimeError(
                f"fused_ce needs a plain nn.Linear lm_head, found {type(self.lm_head).__name__} (LoRA on lm_head, "
                "modules_to_save or a quantized head?): leave 'fused_ce' out of the kernels for this model")
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        loss = causal_lm_loss(hidden, self.lm_head, labels, **self.__dict__.get(_LOSS_OPTIONS, {}), **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    return forward


def set_loss_options(model: nn.Module, label_smoothing: float = 0.0, z_loss: float = 0.0) -> None:
    """Make the fused_ce forward of ``model`` use label smoothing and/or a z-loss (transformers has neither).

    Kept out of the forward's keyword arguments on purpose: transformers passes those on to the attention code.
    Raises ``ValueError`` if ``fused_ce`` has not been applied to ``model``.
    """
    heads = [m for m in model.modules() if "fused_ce" in m.__dict__.get(_MARK, ())]
    if not heads:
        raise ValueError("set_loss_options: apply_kernels(model, ['fused_ce', ...]) first")
    for module in heads:
        module.__dict__[_LOSS_OPTIONS] = {"label_smoothing": float(label_smoothing), "z_loss": float(z_loss)}


def _normalise(names: Iterable[str] | str) -> list[str]:
    wanted = list(KERNEL_NAMES) if names == "all" else [names] if isinstance(names, str) else list(names)
    unknown = sorted(set(wanted) - set(KERNEL_NAMES))
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {list(KERNEL_NAMES)} or 'all'")
    return [k for k in KERNEL_NAMES if k in wanted]  # canonical order, duplicates dropped


def _model_type(model: nn.Module) -> str | None:
    for module in model.modules():  # the first config found is the outermost transformers model's
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "model_type"):
            return config.model_type
    return None


def _patch(module: nn.Module, name: str, forward: Callable[..., Any]) -> None:
    done: set[str] = module.__dict__.setdefault(_MARK, set())
    if name in done:  # applying twice must not wrap the patched forward again
        return
    if name == "fused_ce":
        module._ftlaunch_original_forward = module.forward
    module.forward = types.MethodType(forward, module)
    done.add(name)


def apply_kernels(model: nn.Module, names: list[str] | str) -> list[str]:
    """Patch the modules of ``model`` with the kernels in ``names`` (a subset of ``KERNEL_NAMES`` or ``"all"``).

    Returns the applied kernel names in canonical order. Raises ``ValueError`` for an unknown kernel name, a model
    type outside ``SUPPORTED_MODEL_TYPES``, or a model where a kernel finds nothing to patch (or an activation
    other than SiLU for ``swiglu``). Call it before ``fully_shard`` / ``deepspeed.initialize`` / ``torch.compile``.
    """
    wanted = _normalise(names)
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"apply_kernels: model type {model_type!r} is not supported (kernels {wanted}); "
                         f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    prefix = SUPPORTED_MODEL_TYPES[model_type]
    targets = {"rmsnorm": f"{prefix}RMSNorm", "rope": f"{prefix}Attention", "swiglu": f"{prefix}MLP",
               "fused_ce": f"{prefix}ForCausalLM"}
    for name in wanted:
        found = [m for m in model.modules() if type(m).__name__ == targets[name]]
        if not found:
            raise ValueError(f"apply_kernels: kernel {name!r} found no {targets[name]} module in this "
                             f"{model_type} model ({type(model).__name__})")
        for module in found:
            if name == "rmsnorm":
                _patch(module, name, _rmsnorm_forward)
            elif name == "swiglu":
                act = getattr(getattr(module, "config", None), "hidden_act", None)
                if act not in ("silu", "swish"):
                    raise ValueError(f"apply_kernels: kernel 'swiglu' needs hidden_act 'silu', "
                                     f"{model_type} model has {act!r}")
                _patch(module, name, _mlp_forward)
            elif name == "rope":
                _patch(module, name, _rope_forward(type(module)))
            else:
                _patch(module, name, _make_causal_lm_forward())
    return wanted
