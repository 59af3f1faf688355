"""The schema of prompt_tuning, prefix_tuning, ia3 and adapter: defaults, and what a recipe cannot say."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from launcher.config.schema import Recipe


def method(**fields: Any) -> Any:
    return Recipe.model_validate({"model": {"path": "m"}, "data": {"train": [{"path": "t.jsonl"}]},
                                  "method": fields}).method


def test_init_text_implies_text_init() -> None:
    assert method(name="prompt_tuning", init_text="Classify the review").init == "text"
    assert method(name="prompt_tuning").init == "sample_vocab"


@pytest.mark.parametrize("fields, says", [
    ({"name": "prompt_tuning", "init": "text"}, "init: text needs init_text"),
    ({"name": "prompt_tuning", "init": "random", "init_text": "x"}, "init_text is set but init is random"),
    ({"name": "prompt_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"name": "prefix_tuning", "encoder_hidden_size": 64}, "set projection: true"),
    ({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
     "feedforward_modules ['down_proj'] are not in target_modules"),
    ({"name": "ia3", "feedforward_modules": ["down_proj"]}, "feedforward_modules needs target_modules"),
    ({"name": "adapter", "placement": ["mlp", "mlp"]}, "placement lists a block twice"),
    ({"name": "adapter", "placement": ["ffn"]}, "placement"),
    ({"name": "adapter", "activation": "swish"}, "activation"),
])
def test_bad_method_fields_are_refused(fields: dict, says: str) -> None:
    with pytest.raises(ValidationError, match=says.replace("[", r"\[").replace("]", r"\]")):
        method(**fields)
