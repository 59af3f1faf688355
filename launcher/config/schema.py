"""The recipe schema: typed, strict, one docstring per field.

Every model forbids unknown keys, so a typo fails with its key path instead of being silently ignored (the most common
way a fine-tuning job wastes a day). Field docstrings double as the reference documentation
(`use_attribute_docstrings`), torchtitan style.

This module imports pydantic (and, inside validators, the torch-free launcher.common.metrics) only: it is on the planning
side and must load without torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_serializer, model_validator

DType = Literal["float32", "bfloat16", "float16"]


def path_text_problem(text: str) -> str | None:
    """Why a string cannot name a file, or None: a NUL byte, or a name longer than file systems allow (255 bytes)."""
    if "\0" in text:
        return "holds a NUL byte, which no file name can"
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in text.split("/")):
        return "has a name longer than 255 bytes, which file systems refuse"
    return None


def _path_text(text: str) -> str:
    if (why := path_text_problem(text)) is not None:
        raise ValueError(why)
    return text


PathText = Annotated[str, AfterValidator(_path_text)]
"""A string naming a file or directory."""

MAX_INT = 2**53
"""Larger integers are refused: no setting needs them, and beyond 2**53 they stop being exact in JSON readers."""


def _takes_int(annotation: object) -> bool:
    """Whether a field's type admits an int but not a bool (`int`, `int | None`, `Annotated[int, ...] | "auto"`)."""
    if annotation is bool:
        return False
    if annotation is int:
        return True
    return any(_takes_int(arg) for arg in get_args(annotation)) and bool not in get_args(annotation)


class Section(BaseModel):
    """Base of every recipe section: strict keys, docstrings as field descriptions, frozen after validation.

    Numbers are what they say: no inf or NaN where a float is expected (`lr: .inf` would train a NaN adapter), no
    `true` where an integer is expected (YAML's booleans are not counts: `max_steps: true` is not 1), no integer
    beyond MAX_INT."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_integers(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if value is None or not _takes_int(field.annotation):
                continue
            if isinstance(value, bool):
                raise ValueError(f"{name}: expected an integer, got {str(value).lower()} (a YAML boolean)")
            if isinstance(value, (int, float)) and abs(value) > MAX_INT:
                raise ValueError(f"{name}: {value} is out of range (at most {MAX_INT})")
        return data


# --------------------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    path: PathText | None = None
    """A local Hugging Face model directory (config.json + safetensors). Relative paths are resolved against the
    recipe file. A directory holding only config.json is enough for `launch plan`."""

    gguf: PathText | None = None
    """A GGUF file: a path, or `package:relative/file.gguf` inside an installed Python package. It is converted once
    to a cached safetensors directory, then loaded from there."""

    tokenizer: PathText | None = None
    """Tokenizer directory when it differs from the model's."""

    name: str | None = Field(default=None, max_length=96, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$")
    """The base model's name on the Hugging Face Hub (`HuggingFaceTB/SmolLM2-135M-Instruct`). The weights still come
    from `path` / `gguf`; the name goes into the saved adapter's `base_model_name_or_path` and its model card, so the
    outputs load on another machine (`AutoPeftModel...from_pretrained(ADAPTER)`). Null: the local source is named."""

    dtype: DType = "bfloat16"
    """Dtype of the weights while training (float32 on CPU for exact resumes; bfloat16 on GPUs)."""

    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""

    master_weights: bool = True
    """With a 16-bit dtype and a method that trains the base weights (full, freeze): keep float32 master weights and
    optimizer states and compute in `dtype` (mixed precision: FSDP keeps float32 shards and gathers them in `dtype`,
    DDP's optimizer steps float32 copies, DeepSpeed always keeps fp32 masters). False trains the 16-bit weights
    themselves (less memory; an update smaller than half a rounding step of a weight is lost: on an H200, 20 full
    fine-tuning steps of a 1B Llama at lr 1e-5 ended at loss 7.72 in pure bf16 and 4.29 with fp32 masters,
    bench/results/gpu-h200-20261126). Adapters (LoRA, DoRA, QLoRA) are float32 either way."""

    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off by default: it executes whatever the checkpoint contains."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.path is None) == (self.gguf is None):
            raise ValueError("set exactly one of model.path or model.gguf")
        return self


# ---------------------------------------------------------------------------------------------------------- data
DataFormat = Literal["alpaca", "messages", "prompt_completion", "text"]


HUB_DATASET_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$"
"""A Hub repository id (`org/name`, or a legacy bare `name`): the characters the Hub allows, no `..` path tricks."""

def _hub_revision(text: str) -> str:
    # It names a file under the Hub cache's `refs/` (huggingface_hub reads refs/<revision>): no `..`, no leading `/`.
    if not re.fullmatch(r"[A-Za-z0-9._-][A-Za-z0-9._/-]{0,199}", text) or ".." in text.split("/"):
        raise ValueError(f"{text!r} is not a branch, tag or commit hash (letters, digits, . _ - /; no '..')")
    return text


HubRevision = Annotated[str, AfterValidator(_hub_revision)]
"""A branch, tag or commit hash of a Hub repository."""


class DataSource(Section):
    path: Annotated[str, Field(min_length=1), AfterValidator(_path_text)] | None = None
    """A local .jsonl/.json/.parquet/.csv file, or a directory written by `datasets.save_to_disk`. Relative paths
    are resolved against the recipe file. Set exactly one of `path` and `hub`."""

    hub: str | None = Field(default=None, max_length=96, pattern=HUB_DATASET_ID)
    """A dataset on the Hugging Face Hub by name (`tatsu-lab/alpaca`), read from the local Hub cache
    (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`). `launch` downloads it there first when it is missing and
    the Hub is reachable, so the ranks (often without internet) read it offline; the cache must be on storage the
    nodes share. Its data files (.jsonl/.json/.parquet/.csv) are found as `datasets` finds them."""

    subset: str | None = Field(default=None, min_length=1, max_length=200)
    """hub: the dataset's configuration (subset) name, for datasets that have several (`load_dataset(name, SUBSET)`)."""

    revision: HubRevision | None = None
    """hub: the branch, tag or commit hash to read (default `main`). A new commit re-tokenizes: the tokenization
    cache key holds the snapshot's commit hash."""

    format: DataFormat = "messages"
    """Row format. alpaca: instruction/input/output; messages: a list of {role, content} (OpenAI style; ShareGPT's
    from/value is accepted too); prompt_completion: prompt/completion strings; text: a single text field."""

    split: str | None = Field(default=None, min_length=1, max_length=200)
    """Split to take from a `save_to_disk` DatasetDict or a `hub` dataset (default: `train`)."""

    max_rows: int | None = Field(default=None, ge=1)
    """Take only the first N rows (smoke tests)."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("set exactly one of path (a local file or directory) or hub (a Hugging Face Hub "
                             "dataset name such as tatsu-lab/alpaca)")
        if self.hub is None:
            for name in ("subset", "revision"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to hub sources only; remove it, or name the dataset with hub")
        return self

    @property
    def name(self) -> str:
        """What the source is called in messages and model cards: its path, or `hub:` and the dataset's name."""
        return self.path if self.path is not None else f"hub:{self.hub}"


class DataConfig(Section):
    train: list[DataSource] = Field(min_length=1)
    """Training sources, concatenated in order."""

    eval: list[DataSource] = Field(default_factory=list)
    """Held-out sources. When empty and `eval_fraction` > 0, a fraction of the training rows is held out."""

    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of training rows held out for evaluation when no eval source is given."""

    eval_seed: int = Field(default=0, ge=0, lt=2**32)
    """Seed of the train/eval split."""

    chat_template: str | None = None
    """Chat template override: a Jinja string, a path to a .jinja file, or the name of a shipped template
    (`chatml`). Needed for assistant-only loss when the tokenizer's template lacks generation markers."""

    system_prompt: str | None = None
    """System message prepended to every conversation that has none."""

    max_length: int = Field(default=1024, ge=8)
    """Maximum tokens per example (or per packed sequence)."""

    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than max_length: cut them at the end, or drop them. Counts are logged."""

    packing: bool = False
    """Concatenate examples into sequences of max_length. Attention stays within each example (position ids restart
    per example; the model's attention masks by sequence boundaries where the attention implementation supports
    it)."""

    loss_on: Literal["assistant", "all"] = "assistant"
    """Which tokens carry labels: only assistant/completion tokens, or every token."""

    prompt_style: Literal["chat", "alpaca"] = "chat"
    """How `format: alpaca` rows become text. chat: a user/assistant conversation rendered with the chat template
    (what an instruction-tuned model was trained on). alpaca: the classic Stanford Alpaca prompt, as axolotl's
    `type: alpaca` and LLaMA-Factory write it ("Below is an instruction that describes a task... ### Instruction:
    ... ### Input: ... ### Response:" then the output and EOS), without the chat template; `loss_on: assistant`
    labels the output only. Other formats are unaffected; set alpaca only where a source has format alpaca."""

    num_proc: int | None = Field(default=None, ge=1, le=1024)
    """Processes that tokenize (the prepare job, or rank 0 when nothing prepared the data); null: the CPUs this
    process may use. Any value gives the same cache, byte for byte."""


# ---------------------------------------------------------------------------------------------------------- task
TaskType = Literal["causal_lm", "sequence_classification", "token_classification", "seq2seq"]

TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "causal_lm": (),
    "sequence_classification": ("text_column", "text_pair_column", "label_column", "labels"),
    "token_classification": ("tokens_column", "tags_column", "labels"),
    "seq2seq": ("source_column", "target_column", "source_prefix"),
}
"""The TaskConfig fields each task type reads (a field set for another type is refused at plan time)."""


class TaskConfig(Section):
    """What the model learns from the rows. `causal_lm` reads the rows in `data.*.format` (chat, prompt/completion,
    text); the other types read the columns named here and ignore `format`, `loss_on`, `chat_template` and
    `system_prompt`. A bare string (`task: sequence_classification`) sets `type` alone."""

    type: TaskType = "causal_lm"
    """causal_lm: next-token prediction (the default). sequence_classification: one label per text (or text pair),
    a classification head (AutoModelForSequenceClassification; decoder models read the last non-pad token).
    token_classification: one BIO tag per word (AutoModelForTokenClassification; the tag goes on each word's first
    sub-token). seq2seq: source text -> target text with an encoder-decoder (AutoModelForSeq2SeqLM, e.g. T5)."""

    text_column: str = Field(default="text", min_length=1)
    """sequence_classification: the column holding the input text."""

    text_pair_column: str | None = Field(default=None, min_length=1)
    """sequence_classification: an optional second text (pairs: NLI, paraphrase), encoded as the tokenizer joins
    pairs (e.g. `[CLS] a [SEP] b [SEP]`)."""

    label_column: str = Field(default="label", min_length=1)
    """sequence_classification: the column holding the label (a string or an integer)."""

    labels: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=2)
    """Classification label names in id order (id2label), e.g. `[negative, neutral, positive]`; for
    token_classification the tag names (`[O, B-PER, I-PER, ...]`). Null: the sorted distinct labels of the
    training data (integers by value, `0..k-1` stay `0..k-1`). An eval label missing from it is an error."""

    tokens_column: str = Field(default="tokens", min_length=1)
    """token_classification: the column holding the list of words."""

    tags_column: str = Field(default="tags", min_length=1)
    """token_classification: the column holding one BIO tag (a string) per word."""

    source_column: str = Field(default="source", min_length=1)
    """seq2seq: the column holding the input text."""

    target_column: str = Field(default="target", min_length=1)
    """seq2seq: the column holding the output text."""

    source_prefix: str = ""
    """seq2seq: text put before every source (T5's task prefixes: `summarize: `, `translate English to German: `)."""

    @model_validator(mode="before")
    @classmethod
    def _bare_type(cls, data: object) -> object:
        if isinstance(data, str):
            return {"type": data}
        if isinstance(data, dict) and isinstance(data.get("labels"), list):
            # Integer labels (`labels: [0, 1, 2]`) name the data's integer labels; YAML's booleans are a trap
            # (`no` reads as false), so they are refused rather than turned into "False".
            for value in data["labels"]:
                if isinstance(value, bool):
                    raise ValueError(f"labels: {str(value).lower()} is a YAML boolean; quote label names such as "
                                     "'yes'/'no'/'on'/'off'")
            data = {**data, "labels": [str(v) if isinstance(v, int) else v for v in data["labels"]]}
        return data

    @model_validator(mode="after")
    def _distinct_labels(self) -> "TaskConfig":
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
            raise ValueError(f"labels: {repeated} appear more than once; list each label name once")
        return self


# -------------------------------------------------------------------------------------------------------- method
LORA_TARGET_ALL = "all-linear"


class UnfreezeConfig(Section):
    """Gradual unfreezing (ULMFiT, Howard & Ruder 2018): training starts with only the top group of the method's
    trainable parameters and unfreezes the next group down at a fixed interval. Groups are depths, as in
    `optim.layer_lr_decay`: the head and final norm (depth 0), decoder/encoder layer i of L (depth L - i), the
    embeddings (depth L + 1); only depths holding parameters the method trains count (LoRA: the adapters of each
    layer, and a `modules_to_save` head at depth 0). Every group is in the optimizer from the start; a frozen one
    gets no gradient, which AdamW skips entirely (no moment update, no weight decay), so it starts fresh when
    unfrozen. Runs with ddp (which then looks for unused parameters each step); fsdp and zero are refused."""

    every_steps: int | None = Field(default=None, ge=1)
    """Unfreeze one more group every N optimizer steps (after step N, 2N, ...)."""

    every_epochs: int | None = Field(default=None, ge=1)
    """Unfreeze one more group every N epochs (N x the optimizer steps of an epoch)."""

    max_layers: int | None = Field(default=None, ge=0)
    """Stop once this many decoder/encoder layers are unfrozen (depths up to max_layers: the embeddings stay frozen
    unless null); null: unfreeze everything the method trains, the embeddings last."""

    @model_validator(mode="after")
    def _one_interval(self) -> "UnfreezeConfig":
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("set exactly one of every_steps or every_epochs")
        return self


class UnfreezeField(Section):
    unfreeze: UnfreezeConfig | None = None
    """Gradual unfreezing: start with the top group (the head) trainable and add one group down at each interval;
    null: everything the method trains is trainable from the first step."""


class FullMethod(UnfreezeField):
    name: Literal["full"]
    """Train every parameter."""


class FreezeMethod(UnfreezeField):
    name: Literal["freeze"]
    """Train only some parameters: the top `trainable_layers` decoder layers, and/or names matching patterns."""

    trainable_layers: int | None = Field(default=None, ge=0)
    """Number of top decoder layers left trainable."""

    trainable_patterns: list[str] = Field(default_factory=list)
    """Regular expressions; parameters whose names match stay trainable (e.g. `lm_head`, `norm`)."""

    @model_validator(mode="after")
    def _something_trainable(self) -> "FreezeMethod":
        if not self.trainable_layers and not self.trainable_patterns:
            raise ValueError("freeze needs trainable_layers > 0 or at least one trainable_patterns entry")
        return self


class LoraFields(UnfreezeField):
    r: int = Field(default=16, ge=1)
    """LoRA rank."""

    alpha: float = Field(default=32, gt=0)
    """LoRA scaling numerator: updates are scaled by alpha / r."""

    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: list[str] | Literal["all-linear"] = LORA_TARGET_ALL
    """Module names to adapt (q_proj, v_proj, ...) or `all-linear`."""

    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full next to the adapter (e.g. `lm_head` when new tokens were added)."""


class LoraMethod(LoraFields):
    name: Literal["lora"]
    """Low-rank adapters (Hu et al. 2021) through PEFT."""


class DoraMethod(LoraFields):
    name: Literal["dora"]
    """Weight-decomposed LoRA (Liu et al. 2024) through PEFT's `use_dora`."""


class QuantFields(Section):
    """How the frozen base is quantized (bitsandbytes through transformers' BitsAndBytesConfig)."""

    bits: Literal[4, 8] = 4
    """Weight bits: 4 (QLoRA, nf4/fp4) or 8 (LLM.int8)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""

    double_quant: bool = True
    """Quantize the quantization constants too (~0.37 bit/param saved)."""

    compute_dtype: DType = "bfloat16"
    """Dtype of the dequantized matmuls (4-bit). float16 needs a GPU."""

    quant_storage: DType | Literal["uint8", "auto"] = "auto"
    """Storage dtype of packed 4-bit weights. `auto` is resolved at plan time (plan.json holds the result): the
    model dtype under fsdp/zero3, whose sharding needs every parameter in one floating dtype, uint8 otherwise.
    Not used by 8-bit weights."""


class QLoraMethod(LoraFields, QuantFields):
    name: Literal["qlora"]
    """LoRA on a 4-bit (or 8-bit) quantized base model (Dettmers et al. 2023). The adapter is saved in PEFT
    format; `output.merge` folds it into the unquantized base checkpoint, streamed tensor by tensor."""


class PromptTuningMethod(Section):
    name: Literal["prompt_tuning"]
    """Soft prompt tuning (Lester et al. 2021) through PEFT: `num_virtual_tokens` trainable embeddings are put
    before every input; the model stays frozen. Cannot be merged into the model (`output.merge`)."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Virtual tokens prepended to every sequence (they lengthen it: a sequence costs max_length + this many
    positions)."""

    init: Literal["sample_vocab", "random", "text"] = "sample_vocab"
    """How the virtual tokens start: `sample_vocab`, the embeddings of random vocabulary tokens (Lester et al.:
    better than random vectors); `random`, PEFT's N(0, 1) vectors; `text`, the embeddings of `init_text`'s tokens,
    repeated or cut to `num_virtual_tokens` (PEFT's PromptTuningInit.TEXT, tokenized with the model's tokenizer).
    Setting `init_text` alone implies `text`."""

    init_text: str | None = Field(default=None, min_length=1)
    """Text whose tokens initialise the virtual tokens, e.g. a task instruction ("Classify the sentiment of the
    review"); needs `init: text` (the default when this is set)."""

    @model_validator(mode="before")
    @classmethod
    def _text_implies_init(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("init_text") is not None and "init" not in data:
            return {**data, "init": "text"}
        return data

    @model_validator(mode="after")
    def _text_and_init_agree(self) -> "PromptTuningMethod":
        if self.init == "text" and self.init_text is None:
            raise ValueError("init: text needs init_text (the text whose tokens start the prompt)")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is set but init is {self.init}; set init: text or remove init_text")
        return self


class PrefixTuningMethod(Section):
    name: Literal["prefix_tuning"]
    """Prefix tuning (Li & Liang 2021) through PEFT: trainable key/value vectors for `num_virtual_tokens` positions
    in every attention layer (a prefilled KV cache); the model stays frozen. Cannot be merged into the model, and
    does not combine with `model.gradient_checkpointing` or `data.packing` (refused at plan time)."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Prefix positions per layer."""

    projection: bool = False
    """Reparametrize the prefix through a two-layer MLP (embedding -> tanh -> layers x 2 x kv), as Li & Liang do to
    stabilise training; only the projected prefix is saved in the adapter, so the MLP costs training memory only."""

    encoder_hidden_size: int | None = Field(default=None, ge=1)
    """Hidden width of that MLP (with `projection`); null: the model's key/value width (kv heads x head dim)."""

    @model_validator(mode="after")
    def _hidden_needs_projection(self) -> "PrefixTuningMethod":
        if self.encoder_hidden_size is not None and not self.projection:
            raise ValueError("encoder_hidden_size sizes the prefix projection: set projection: true or remove it")
        return self


class IA3Method(Section):
    name: Literal["ia3"]
    """(IA)^3 (Liu et al. 2022) through PEFT: learned vectors rescale the outputs of the attention `target_modules`
    and the inputs of the `feedforward_modules`; the fewest trainable parameters of any method here. Can be merged
    (`output.merge`)."""

    target_modules: list[str] | None = Field(default=None, min_length=1)
    """Linear modules to rescale (names like k_proj, v_proj, down_proj); null: per architecture (Llama, Mistral:
    k_proj, v_proj, down_proj; Qwen2/3, Gemma: q_proj, v_proj, down_proj; Phi-3: qkv_proj, down_proj; GPT-NeoX:
    query_key_value, dense_4h_to_h; Mixtral: k_proj, v_proj, its experts being no Linear modules), PEFT's
    defaults where PEFT has them."""

    feedforward_modules: list[str] | None = None
    """Those of `target_modules` whose input is rescaled instead of their output (the MLP's down projection);
    null: the architecture's default (down_proj, ...) among the targets."""

    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full next to the vectors (e.g. `lm_head`)."""

    @model_validator(mode="after")
    def _feedforward_in_targets(self) -> "IA3Method":
        if self.feedforward_modules and self.target_modules is None:
            raise ValueError("feedforward_modules needs target_modules (the per-architecture default targets have "
                             "their own feedforward modules)")
        if self.feedforward_modules and self.target_modules is not None:
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                                 "every feedforward module must be a target too")
        return self


AdapterPlacement = Literal["attention", "mlp"]


class AdapterMethod(Section):
    name: Literal["adapter"]
    """Bottleneck adapter layers (Houlsby et al. 2019): x + up(act(down(x))) on the output of each decoder layer's
    attention and/or MLP block, before the residual addition; the model stays frozen. The up-projection starts at
    zero, so training starts from the base model exactly. Our own module (launcher/train/adapters.py: AdapterHub's
    `adapters` pins transformers 4.x); saved as RUN_DIR/adapter/bottleneck_adapter_config.json +
    bottleneck_adapter.safetensors and reloaded with `launcher.train.adapters.load_adapter`. Cannot be merged (the
    nonlinearity does not fold into a weight)."""

    placement: list[AdapterPlacement] = Field(default_factory=lambda: ["attention", "mlp"], min_length=1)
    """Where adapters go in every decoder layer: after the attention block, after the MLP block, or both (Houlsby:
    both; Pfeiffer et al. 2021: after the MLP only, about as good with half the adapters)."""

    bottleneck: int | None = Field(default=None, ge=1)
    """Width of the down-projection; null: hidden_size // reduction_factor."""

    reduction_factor: int = Field(default=16, ge=1)
    """hidden_size / bottleneck when `bottleneck` is not set (16: each placement adds about 0.8% of Llama-3.1-8B's
    parameters, 2 x h x h/16 per layer)."""

    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Nonlinearity between the projections."""

    @model_validator(mode="after")
    def _distinct_placements(self) -> "AdapterMethod":
        if len(set(self.placement)) != len(self.placement):
            raise ValueError(f"placement lists a block twice: {self.placement}")
        return self


PEFT_PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")
"""Methods that add virtual tokens (they change sequence lengths and positions)."""

OTHER_ADAPTER_METHODS = (*PEFT_PROMPT_METHODS, "ia3", "adapter")
"""The frozen-base methods beside LoRA (launcher/train/peft_methods.py)."""

MethodConfig = Annotated[
    Union[FullMethod, FreezeMethod, LoraMethod, DoraMethod, QLoraMethod, PromptTuningMethod, PrefixTuningMethod,
          IA3Method, AdapterMethod], Field(discriminator="name")
]


# --------------------------------------------------------------------------------------------------------- optim
class OptimConfig(Section):
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """adamw: torch AdamW. adamw_8bit: bitsandbytes AdamW8bit (block-wise 8-bit moments, ~75% less optimizer
    memory; tensors under 4096 elements keep fp32 moments). paged_adamw_8bit / paged_adamw_32bit: the same with
    states in CUDA unified memory that can spill to host RAM under memory spikes (on CPU they run unpaged)."""

    lr: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""

    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay (not applied to biases and norms)."""

    layer_lr_decay: float | None = Field(default=None, gt=0.0, le=1.0)
    """Discriminative learning rates (ULMFiT; ELECTRA's layer-wise decay): each parameter's lr is
    lr x layer_lr_decay^depth, depth counted down from the top: the head (lm_head / score / classifier) and the final
    norm have depth 0 (full lr); decoder/encoder layer i of L has depth L - i (the top layer L - 1: lr x decay); the
    embeddings (and whatever else comes before the first layer) depth L + 1. Tied output embeddings share the input
    embedding's parameter and so its lr. The schedule scales every group's own lr. Null: one lr for all."""

    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    """Adam betas."""

    eps: float = Field(default=1e-8, gt=0)
    """Adam epsilon."""

    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""

    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps (optimizer steps)."""

    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Warmup as a fraction of total steps; used when warmup_steps is 0."""

    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Floor of the decay as a fraction of lr."""

    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""

    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Examples per rank per forward pass; `auto`: the largest power of two the memory planner fits in the GPU
    (needs `launch ... --gpu-mem`)."""

    grad_accum: int = Field(default=1, ge=1)
    """Micro batches accumulated per optimizer step."""

    global_batch: int | None = Field(default=None, ge=1)
    """Optional check: must equal micro_batch x grad_accum x world size."""

    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data; ignored when max_steps is set."""

    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps."""

    seed: int = Field(default=0, ge=0, lt=2**32)
    """Seed for weights init (adapters), dropout and data order."""

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Label smoothing of the cross-entropy."""

    max_nonfinite_steps: int = Field(default=3, ge=1)
    """A step whose loss or gradient norm is NaN/inf is not applied (logged, counted as a step so the schedule and the
    data stay in step); this many such steps in a row stop the run with an error, the last good checkpoint intact.
    Under DeepSpeed, whose engine applies a step as soon as it is asked to, a non-finite loss stops the run at once."""


# ------------------------------------------------------------------------------------------ eval, stop, save, log
class EvalConfig(Section):
    every_steps: int | None = Field(default=None, ge=1)
    """Evaluate every N optimizer steps (and always at the end). Null: only at the end."""

    at_start: bool = True
    """Evaluate once before training, so the improvement is visible."""

    max_batches: int | None = Field(default=None, ge=1)
    """Cap on eval batches for loss/perplexity."""

    exact_match: bool = False
    """Greedy-generate the answer of each eval example and compare it (stripped) with the reference; ROUGE-1/2/L
    and BLEU of the answers are recorded too. seq2seq tasks always generate (classification tasks cannot)."""

    max_new_tokens: int = Field(default=32, ge=1)
    """Generation budget for exact match and the generation metrics (seq2seq: per target)."""

    generate_batch: int = Field(default=16, ge=1)
    """Prompts per generation batch."""

    max_examples: int | None = Field(default=None, ge=1)
    """Cap on eval examples whose answers are generated (exact match, ROUGE, BLEU)."""


def _known_metric(name: str) -> str:
    """An eval metric name that metrics.jsonl can hold (launcher.common.metrics.METRIC_MODES)."""
    from launcher.common.metrics import metric_mode

    metric_mode(name)  # raises ValueError naming the known metrics
    return name


EvalMetric = Annotated[str, AfterValidator(_known_metric)]
"""The name of an eval metric (`eval_loss`, `eval_accuracy`, ...: the keys of launcher.common.metrics.METRIC_MODES)."""


class EarlyStoppingConfig(Section):
    metric: EvalMetric = "eval_loss"
    """Eval metric watched after each evaluation: eval_loss, eval_perplexity, eval_exact_match, and the task
    metrics (eval_accuracy, eval_f1_macro, eval_entity_f1, eval_rougeL, eval_bleu, ...). `launch plan` checks that
    the recipe's task and eval settings produce it."""

    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better; null: the metric's own direction (min for loss and perplexity, max for
    the rest). A mode against the metric's direction is refused."""

    patience: int = Field(default=3, ge=1)
    """Evaluations without improvement before training stops."""

    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest change that counts as an improvement."""

    @model_validator(mode="after")
    def _mode_of_metric(self) -> "EarlyStoppingConfig":
        from launcher.common.metrics import metric_mode

        own = metric_mode(self.metric)
        if self.mode is None:
            object.__setattr__(self, "mode", own)  # frozen model: filled once, here (plan.json holds the result)
        elif self.mode != own:
            raise ValueError(f"mode {self.mode!r}: {self.metric} is better when {'lower' if own == 'min' else 'higher'}"
                             f" (mode {own}); leave mode out")
        return self


class CheckpointConfig(Section):
    every_steps: int | None = Field(default=None, ge=1)
    """Save the full training state every N optimizer steps (and at the end). Null: only at the end."""

    keep_last: int = Field(default=2, ge=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""

    on_interrupt: bool = True
    """Write a checkpoint when interrupted (Ctrl-C, SIGTERM, SIGUSR1 before a Slurm time limit)."""

    keep_best: EvalMetric | None = None
    """Keep the checkpoint of the best evaluation by this eval metric (e.g. eval_accuracy; its direction from the
    metric: lower loss, higher everything else) beside the last `keep_last`: an evaluation that improves on every
    earlier one (the one before training excepted) saves a checkpoint at its step if none was due, and
    checkpoints/best.json names it; pruning never removes it. Needs eval.every_steps. Null: off."""

    final_from_best: bool = False
    """Write the final outputs (adapter/model, merged) from the best checkpoint's weights instead of the last step's.
    Needs keep_best."""


TRACKER_NAME_PATTERN = r"^[^/\\#?%:\x00-\x1f]+$"
"""W&B project and entity names, MLflow experiment names: no `/ \\ # ? % :` (W&B refuses them in project names and
they split a run's path `entity/project/id`) and no control characters."""


class WandbConfig(Section):
    """Weights & Biases tracking (`pip install 'ftlaunch[wandb]'`), from rank 0. The API key comes from the
    environment (`WANDB_API_KEY`, or `wandb login`), never from the recipe; on Slurm list it as
    `cluster.env: {WANDB_API_KEY: null}`. A resumed or requeued run continues the same W&B run (its id is kept in
    RUN_DIR/tracking.json). A tracker that cannot start (no network, no key, package missing) logs one warning and
    training goes on without it."""

    project: str | None = Field(default=None, min_length=1, max_length=128, pattern=TRACKER_NAME_PATTERN)
    """W&B project; null: the recipe's `name`."""

    entity: str | None = Field(default=None, min_length=1, max_length=128, pattern=TRACKER_NAME_PATTERN)
    """W&B team or user owning the project; null: the API key's default entity."""

    name: str | None = Field(default=None, min_length=1, max_length=128)
    """Display name of the run; null: the run directory's name (`demo`, `demo-2`, ...)."""

    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list)
    """Tags of the run (at most 64 characters each, W&B's limit)."""

    mode: Literal["online", "offline", "disabled"] = "online"
    """online: stream to the W&B server. offline: write RUN_DIR/wandb/offline-run-*/ only (upload later with
    `wandb sync`; a resumed run adds one such directory per start, synced as one run). disabled: W&B is not
    started at all (nor imported)."""

    dir: PathText | None = Field(default=None, min_length=1)
    """Directory W&B writes its `wandb/` folder into (a relative path is relative to the run directory, whatever
    the job's working directory); null: the run directory."""

    log_artifacts: bool = False
    """Also log the final adapter/model directory (and the merged model) as W&B model artifacts (uploaded whole in
    online mode: large for full fine-tuning)."""


class MlflowConfig(Section):
    """MLflow tracking (`pip install 'ftlaunch[mlflow]'`), from rank 0. Credentials for a server come from the
    environment (`MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`), never from the
    recipe. A resumed or requeued run continues the same MLflow run (RUN_DIR/tracking.json). A tracker that cannot
    start (server down, bad URI, package missing) logs one warning and training goes on without it."""

    tracking_uri: str | None = Field(default=None, min_length=1, max_length=4096)
    """Where runs are recorded: `http(s)://server:5000`, `sqlite:////abs/path/mlflow.db`, `databricks`, ...; null:
    `sqlite:///RUN_DIR/mlflow.db`, a store inside the run directory (MLflow 3's local default is SQLite; its file
    store is deprecated), with artifacts under RUN_DIR/mlartifacts. Browse it with
    `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`. A user name and password inside the URI are refused
    (they would be written to plan.json): use the environment variables above."""

    experiment: str | None = Field(default=None, min_length=1, max_length=256, pattern=TRACKER_NAME_PATTERN)
    """Experiment the run belongs to (created when missing); null: the recipe's `name`."""

    run_name: str | None = Field(default=None, min_length=1, max_length=250)
    """Display name of the run; null: the run directory's name."""

    log_artifacts: bool = False
    """Also log the final adapter/model directory (and the merged model) as run artifacts (copied into the
    artifact store: large for full fine-tuning)."""

    @model_validator(mode="after")
    def _check_uri(self) -> "MlflowConfig":
        uri = self.tracking_uri
        if uri is None:
            return self
        if any(ord(ch) < 32 or ch.isspace() for ch in uri):
            raise ValueError("mlflow.tracking_uri: holds whitespace or a control character")
        from urllib.parse import urlsplit

        try:
            password = urlsplit(uri).password
        except ValueError as err:
            raise ValueError(f"mlflow.tracking_uri: not a valid URI ({err})") from None
        if password is not None:
            raise ValueError("mlflow.tracking_uri: holds a password (user:password@host), which would be written to "
                             "plan.json; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment")
        return self


class LoggingConfig(Section):
    every_steps: int = Field(default=1, ge=1)
    """Log train loss, lr and tokens/s every N optimizer steps."""

    tensorboard: bool = True
    """Write TensorBoard scalars under RUN_DIR/tensorboard."""

    progress: bool = True
    """Show a rich progress bar on rank 0."""

    wandb: WandbConfig | None = None
    """Weights & Biases tracking; null: off. The resolved recipe is logged as the run's config (flattened, secrets
    left out), train and eval rows as metrics at their step (`train/loss`, `eval/loss`, ...)."""

    mlflow: MlflowConfig | None = None
    """MLflow tracking; null: off. The resolved recipe is logged as params (flattened, secrets left out), train
    and eval rows as metrics at their step (`train/loss`, `eval/loss`, ...)."""


class OutputConfig(Section):
    root: PathText = Field(default="runs", min_length=1)
    """Directory holding run directories; relative to the current working directory."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    """Run name; default: the recipe's `name` (letters, digits, `.`, `_`, `-`: a directory under `root`, never a
    path). An existing run is never overwritten: a suffix is added."""

    merge: bool = False
    """Also write a merged model (adapter folded into the base) under RUN_DIR/merged. With a quantized base (qlora)
    the adapter is folded into the base's unquantized safetensors one tensor at a time, in the checkpoint's dtype
    (host RAM for one shard); DoRA and modules_to_save adapters reload the base whole in model.dtype on the CPU."""


# ------------------------------------------------------------------------------------------------------ strategy
OffloadTarget = Literal["none", "cpu", "nvme"]


class FsdpOptions(Section):
    """FSDP2 (`fully_shard`) settings; used only when the strategy resolves to `fsdp`."""

    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after its forward and gather them again in backward (ZeRO-3 like,
    least memory). False keeps them gathered until backward (ZeRO-2 like: one all-gather less per layer)."""

    param_dtype: DType | None = None
    """Dtype parameters are gathered and computed in (mixed precision); null: the weights' dtype (model.dtype).
    The sharded master copy stays in model.dtype."""

    reduce_dtype: DType = "float32"
    """Dtype gradients are reduce-scattered in. float32 keeps the sum over ranks exact enough for bf16 compute."""

    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in CPU memory; the optimizer step runs on the CPU
    (CPUOffloadPolicy). GPUs only."""

    hybrid_shard_size: int | None = Field(default=None, ge=1)
    """HSDP: shard within groups of this many ranks (usually GPUs per node) and replicate across groups; null shards
    over the whole world. Must divide the world size."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (checkpoint applied per FSDP unit)."""


class DeepSpeedOptions(Section):
    """DeepSpeed ZeRO settings; used only when the strategy resolves to zero1, zero2 or zero3. Bucket sizes left
    null are derived from the model's hidden size h the way DeepSpeed's Hugging Face integration does."""

    offload_optimizer: OffloadTarget = "none"
    """Where optimizer states (and the step) live: on the GPU, in CPU memory (ZeRO-Offload, stages 1-3) or on NVMe
    (ZeRO-Infinity, stage 3 only)."""

    offload_params: OffloadTarget = "none"
    """Where partitioned parameters live between uses: GPU, CPU or NVMe. Stage 3 only (stages 1-2 keep a full copy of
    the weights on every rank)."""

    nvme_path: PathText | None = None
    """Directory on a fast local NVMe disk for `nvme` offload (required then)."""

    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (more memory for buckets, faster)."""

    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation)."""

    reduce_bucket_size: int | None = Field(default=None, ge=1)
    """Elements reduced at a time; null: h*h."""

    allgather_bucket_size: int | None = Field(default=None, ge=1)
    """Elements all-gathered at a time after the step (stages 1-2); null: h*h."""

    stage3_prefetch_bucket_size: int | None = Field(default=None, ge=1)
    """Elements of parameters prefetched ahead of use (stage 3); null: 0.9*h*h."""

    stage3_param_persistence_threshold: int | None = Field(default=None, ge=0)
    """Parameters smaller than this many elements are not partitioned (stage 3); null: 10*h."""

    stage3_gather_16bit_weights_on_model_save: bool = True
    """Gather the full 16-bit weights on rank 0 when the model is saved (stage 3), so a plain model file can be
    written; turn off for very large models and export from the checkpoint instead."""


class StrategyConfig(Section):
    name: Literal["auto", "ddp", "fsdp", "zero1", "zero2", "zero3"] = "auto"
    """How ranks share the work. `auto` chooses by a documented rule and says why in the plan."""

    fsdp: FsdpOptions = Field(default_factory=FsdpOptions)
    """FSDP2 options (strategy fsdp)."""

    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)
    """DeepSpeed ZeRO options (strategies zero1, zero2, zero3); the resolved JSON is in plan.json and
    RUN_DIR/ds_config.json."""


# ------------------------------------------------------------------------------------------------------- cluster
# Slurm --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_TIME_PATTERN = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SLURM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
"""Partition, account and QOS names: what Slurm's own names hold, and nothing an `#SBATCH` line could misread."""
SLURM_CONSTRAINT_PATTERN = r"^[A-Za-z0-9_.,&|*!()\[\]:-]+$"
"""Node features joined by Slurm's operators (`h100&ib`, `[rack1|rack2]`, `a100*2`)."""


def sbatch_unsafe(value: str) -> str | None:
    """Why a value cannot go into an `#SBATCH` line, or None. sbatch reads those lines with its own parser: a
    backslash escapes the next character even inside quotes, so no quoting (shlex's, submitit's) survives one; a
    line break or any other control character ends or corrupts the line."""
    if "\\" in value:
        return "holds a backslash, which sbatch's #SBATCH parser reads as an escape whatever the quoting"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "holds a control character (newline, tab, NUL, ...), which no #SBATCH line can carry"
    return None
SECRET_NAME_PARTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD")


def is_secret_name(name: str) -> bool:
    """True for environment variable names whose values must never be written to a file (HF_TOKEN, ...)."""
    return any(part in name.upper() for part in SECRET_NAME_PARTS)


class ClusterConfig(Section):
    """Slurm settings. Every field left unset (null) comes from the cluster profile (`--cluster NAME`,
    cluster/profiles/NAME.yaml); set fields override the profile; `--nodes/--gpus-per-node/--partition/--time`
    override both. Values are shell-quoted wherever they are written; none may hold a newline."""

    partition: str | None = Field(default=None, pattern=SLURM_NAME_PATTERN)
    """Slurm partition (`--partition`). Checked against `sinfo` before submitting."""

    account: str | None = Field(default=None, pattern=SLURM_NAME_PATTERN)
    """Slurm account to charge (`--account`)."""

    qos: str | None = Field(default=None, pattern=SLURM_NAME_PATTERN)
    """Quality of service (`--qos`)."""

    time: str | None = Field(default=None, pattern=SLURM_TIME_PATTERN)
    """Time limit in a Slurm format: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM` or `D-HH:MM:SS`."""

    gpus_per_node: int | None = Field(default=None, ge=0)
    """GPUs per node (one rank each); 0 trains on CPU with `ranks_per_node` ranks."""

    ranks_per_node: int | None = Field(default=None, ge=1)
    """Ranks per node on CPU clusters (gpus_per_node 0); ignored when GPUs are used."""

    cpus_per_task: int | None = Field(default=None, ge=1)
    """CPUs per rank (`--cpus-per-task`): data loading and host-side work."""

    mem: str | None = Field(default=None, pattern=r"^\d+[KMGT]?$")
    """Memory per node (`--mem`), e.g. `400G`; `0` asks for all of a node's memory."""

    constraint: str | None = Field(default=None, pattern=SLURM_CONSTRAINT_PATTERN)
    """Node features (`--constraint`), e.g. `h100&ib`."""

    exclusive: bool | None = None
    """Whole nodes only (`--exclusive`)."""

    sbatch_options: list[str] = Field(default_factory=list)
    """More sbatch options, one per item, e.g. `--reservation=big` (written as `#SBATCH` lines, quoted)."""

    setup: list[str] = Field(default_factory=list)
    """Shell lines run before the ranks start (`module load cuda/12.4`, `source /shared/venv/bin/activate`).
    These are shell code by design and written verbatim: treat recipes that set them as code."""

    container_image: str | None = None
    """Run each rank in this container (pyxis/enroot: `srun --container-image=...`)."""

    env: dict[str, str | None] = Field(default_factory=dict)
    """Environment variables for the ranks (NCCL_*, ...). Names that look like secrets (containing TOKEN, KEY,
    SECRET or PASSWORD) are never written to files: they are passed from the submitting environment, and a value
    given here is redacted from plan.json. Null: take the submitting environment's value."""

    max_requeues: int | None = Field(default=None, ge=0)
    """How many times a job that reached its time limit is requeued from its last checkpoint (preemptions
    are requeued without limit)."""

    shared_roots: list[str] = Field(default_factory=list)
    """Directories known to be on storage that every node sees (the run directory must be). Network file
    systems (nfs, lustre, gpfs, ...) are recognised without this."""

    tokenize_first: bool | None = None
    """When the tokenized data is not cached yet, submit a CPU job that tokenizes it (`prepare_tasks` tasks) and start
    the training job after it (`--dependency=afterok`), so no GPU waits on tokenization. Default (null): true."""

    prepare_partition: str | None = Field(default=None, pattern=SLURM_NAME_PATTERN)
    """Partition of that CPU-only job (a CPU partition is cheaper); null: the training partition."""

    prepare_tasks: int | None = Field(default=None, ge=1, le=1024)
    """Tasks of that CPU-only job, one per node: task i of N tokenizes the shards i, i+N, i+2N, ... (4,096 rows each)
    with the CPUs of its node's training tasks (`cpus_per_task` x ranks per node), and the first task publishes the
    entry when all are done. For datasets one node tokenizes too slowly. Default (null): 1."""

    @model_validator(mode="after")
    def _check_values(self) -> "ClusterConfig":
        import re

        strings = [self.partition, self.prepare_partition, self.account, self.qos, self.constraint, self.container_image,
                   *self.sbatch_options, *self.setup, *self.shared_roots,
                   *self.env.keys(), *(v for v in self.env.values() if v is not None)]
        for value in strings:
            if value is not None and any(ch in value for ch in "\n\r\0"):
                raise ValueError(f"cluster: {value!r} holds a newline or NUL, which no sbatch line can quote")
        for name in self.env:
            if not re.match(ENV_NAME_PATTERN, name):
                raise ValueError(f"cluster.env: {name!r} is not a valid environment variable name")
        for option in self.sbatch_options:
            if not option.startswith("-"):
                raise ValueError(f"cluster.sbatch_options: {option!r} is not an option (expected --name=value)")
            if (why := sbatch_unsafe(option)) is not None:
                raise ValueError(f"cluster.sbatch_options: {option!r} {why}")
        return self

    @field_serializer("env")
    def _redact_secrets(self, env: dict[str, str | None]) -> dict[str, str | None]:
        # Every dump (plan.json, `launch plan`) goes through here: a secret's value never leaves memory.
        return {name: None if is_secret_name(name) else value for name, value in env.items()}


# ---------------------------------------------------------------------------------------------------------- root
KernelName = Literal["rmsnorm", "rope", "swiglu", "fused_ce"]


# --------------------------------------------------------------------------------------------------------- sweep
SPACE_KINDS = ("choice", "uniform", "loguniform", "int")


def _check_space(spec: dict[str, Any]) -> dict[str, Any]:
    """One search dimension: exactly one of {choice: [v, ...]}, {uniform: [a, b]}, {loguniform: [a, b]} (a > 0),
    {int: [a, b]} (integers, both ends included)."""
    if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise ValueError(f"expected one of {{{', '.join(f'{k}: [...]' for k in SPACE_KINDS)}}}, got "
                         f"{{{', '.join(map(str, spec))}}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"{kind}: expected a non-empty list")
    if kind == "choice":
        return spec
    values = [_yaml_number(v) for v in values]
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{kind}: expected [low, high] (two numbers), got {values}")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ValueError(f"int: expected two integers, got {values}")
    if not (low < high if kind != "int" else low <= high):
        raise ValueError(f"{kind}: expected low < high, got {values}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform: expected 0 < low, got {values}")
    return {kind: values}


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as text; a search range means a number (as `optim.lr: 1e-4` does)."""
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


SearchSpace = Annotated[dict[str, Any], AfterValidator(_check_space)]


class RandomSearch(Section):
    """Configurations drawn at random from a search space (the same draws for the same `seed`)."""

    trials: int = Field(ge=1, le=1000)
    """How many configurations to draw."""

    space: dict[str, SearchSpace] = Field(min_length=1)
    """Key path -> {choice: [...]}, {uniform: [a, b]}, {loguniform: [a, b]} or {int: [a, b]}."""

    seed: int = Field(default=0, ge=0, lt=2**32)
    """Seed of the draws (not of training: that is `sweep.seeds`)."""


class SweepConfig(Section):
    """A hyperparameter sweep with repeated seeds: every configuration (grid point x random draw) trains once per
    seed, each trial an ordinary run directory under one sweep directory (`launch RECIPE` runs them all)."""

    seeds: int | list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(default=1)
    """Training seeds per configuration: N (optim.seed, optim.seed + 1, ...) or a list. The data split
    (data.eval_seed) stays the same, so every trial is scored on the same examples."""

    grid: dict[str, Annotated[list[Any], AfterValidator(lambda values: [_yaml_number(v) for v in values])]] = Field(
        default_factory=dict)
    """Key path -> values; every combination is a configuration (e.g. `optim.lr: [1e-4, 3e-4]`)."""

    random: RandomSearch | None = None
    """Random search; combined with `grid` when both are given (each grid point x each draw)."""

    metric: str = Field(default="eval_loss", min_length=1)
    """The metrics.jsonl key that ranks configurations: its last value in each trial (eval_loss, eval_exact_match,
    eval_perplexity, loss, ...)."""

    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher `metric` is better."""

    max_parallel: int | None = Field(default=None, ge=1)
    """Slurm: at most this many trials run at once (the job array's `%N`); null: as the cluster allows."""

    seconds_per_step: float | None = Field(default=None, gt=0)
    """For `launch plan`'s GPU-hours estimate: seconds per optimizer step of one trial (measure one run)."""

    @model_validator(mode="after")
    def _check_sweep(self) -> "SweepConfig":
        if isinstance(self.seeds, int) and not 1 <= self.seeds <= 100:
            raise ValueError(f"seeds: expected 1..100 (or a list of seeds), got {self.seeds}")
        if isinstance(self.seeds, list) and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds}")
        keys = [*self.grid, *(self.random.space if self.random else {})]
        for key in keys:
            if key.split(".")[0] in ("sweep", "output", "name") or key == "optim.seed":
                raise ValueError(f"{key}: a sweep sets this itself (trial names, directories, seeds); sweep "
                                 "other keys, and training seeds with sweep.seeds")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: expected a non-empty list of values")
        if len(keys) != len(set(keys)):
            raise ValueError(f"a key is in both grid and random.space: {sorted(k for k in keys if keys.count(k) > 1)}")
        return self


class Recipe(Section):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    """Recipe name: the default run name (letters, digits, `.`, `_`, `-`)."""

    description: str = ""
    """Free text shown by `launch plan`."""

    model: ModelConfig
    """The base model."""

    data: DataConfig
    """Training and evaluation data."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    """What is learnt: causal_lm (the default), sequence_classification, token_classification or seq2seq, and the
    data columns each reads; a bare string sets the type alone."""

    method: MethodConfig = Field(default_factory=lambda: LoraMethod(name="lora"))
    """What gets trained: full, freeze, lora, dora, qlora (LoRA on a 4/8-bit quantized base), prompt_tuning,
    prefix_tuning, ia3, adapter (bottleneck adapter layers)."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer, schedule and batch."""

    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation."""

    early_stopping: EarlyStoppingConfig | None = None
    """Stop when the metric stops improving; null disables."""

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing of the whole training state."""

    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Logging."""

    output: OutputConfig = Field(default_factory=OutputConfig)
    """Where runs are written."""

    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    """Distribution strategy."""

    kernels: list[KernelName] | Literal["all"] = Field(default_factory=list)
    """Fused kernels to patch into the model: any of rmsnorm, rope, swiglu, fused_ce, or `all`."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Slurm settings overriding the cluster profile (used by `launch --nodes N` / `--cluster NAME`)."""

    sweep: SweepConfig | None = None
    """Run this recipe as a sweep (grid/random search x seeds, one run directory per trial); null: one run."""
