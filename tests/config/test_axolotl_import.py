"""`launch import`: axolotl configs become recipes that the loader and `launch plan` accept, every key of the config
is either translated or listed with a reason, and bad input exits 2 naming the key. Torch-free."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from light import run_light
from tiny import sample_rows, write_dataset

from launcher.cli.main import main
from launcher.config.axolotl import ROLES, SHAREGPT_ROLES, SHIPPED_TEMPLATES, Paths, translate
from launcher.config.recipe import load_recipe
from launcher.config.schema import FullMethod, LoraMethod, QLoraMethod, Recipe

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = REPO / "recipes" / "models" / "llama-3.1-8b" / "config.json"

# Modeled on axolotl's examples/llama-3/qlora.yml, with a local model and dataset. `learning_rate: 2e-4` is a string
# to PyYAML (YAML 1.1), as axolotl users write it.
QLORA = """\
base_model: models/llama-8b
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: data/alpaca.jsonl
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project: llama3-qlora
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 2e-4

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""

CHAT_LORA = """\
base_model: models/llama-8b
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
chat_template: chatml
datasets:
  - path: data/sharegpt.jsonl
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles_to_train: [gpt]
    train_on_eos: turn
val_set_size: 0.25
seed: 7
eval_steps: 20
save_steps: 50
max_steps: 100
sequence_len: 256
micro_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
bf16: false
"""

ZERO3_OFFLOAD = {
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 0,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": True},
    "gradient_accumulation_steps": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}

FULL_BASE = """\
base_model: models/llama-8b
datasets: [{path: data/alpaca.jsonl, type: alpaca}]
sequence_len: 2048
micro_batch_size: 1
gradient_accumulation_steps: 1
learning_rate: 1.0e-5
bf16: true
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project as axolotl users have one, and the working directory (axolotl resolves paths against it): a model
    directory holding Llama-3.1-8B's config.json (enough to plan and size), an alpaca and a ShareGPT dataset."""
    (tmp_path / "models" / "llama-8b").mkdir(parents=True)
    shutil.copy(LLAMA_8B, tmp_path / "models" / "llama-8b" / "config.json")
    write_dataset(tmp_path / "data" / "alpaca.jsonl", "alpaca")
    write_dataset(tmp_path / "data" / "sharegpt.jsonl", "sharegpt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def imported(config: Path, *flags: str) -> Path:
    """Run `launch import CONFIG` and return the recipe it wrote."""
    assert main(["import", str(config), *flags]) == 0
    return config.with_name(config.stem + ".ftlaunch.yaml")


def test_wandb_and_mlflow_keys_become_the_recipe_trackers(workdir: Path) -> None:
    extra = """\
wandb_project: sft
wandb_entity: my-team
wandb_name: first-try
wandb_mode: offline
wandb_log_model: end
wandb_watch: gradients
wandb_run_id: abc123
mlflow_tracking_uri: http://mlflow.internal:5000
mlflow_experiment_name: sft
hf_mlflow_log_artifacts: true
"""
    result = translated(workdir, FULL_BASE + extra)
    logging = Recipe.model_validate({**result.recipe, "name": "t"}).logging
    assert logging.wandb is not None and logging.mlflow is not None
    assert (logging.wandb.project, logging.wandb.entity, logging.wandb.name, logging.wandb.mode,
            logging.wandb.log_artifacts) == ("sft", "my-team", "first-try", "offline", True)
    assert (logging.mlflow.tracking_uri, logging.mlflow.experiment, logging.mlflow.log_artifacts) == \
        ("http://mlflow.internal:5000", "sft", True)
    left = dict(result.untranslated)
    assert "tracking.json" in left["wandb_run_id"] and "gradients" in left["wandb_watch"]

    on = translated(workdir, FULL_BASE + "use_wandb: true\nuse_mlflow: true\n").recipe["logging"]
    assert on["wandb"] == {"mode": "online"} and on["mlflow"] == {}  # defaults: the recipe's name, a local store
    off = translated(workdir, FULL_BASE + "wandb_project: sft\nwandb_mode: disabled\n")
    assert "wandb" not in off.recipe.get("logging", {})
    assert all("turned off" in why for key, why in off.untranslated if key.startswith("wandb_"))


def plan_json(recipe: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["plan", str(recipe), "--json", *flags]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def translated(workdir: Path, text: str) -> Any:
    return translate(yaml.safe_load(text), Paths(search=(workdir,), recipe_dir=workdir))


# ------------------------------------------------------------------------------------------------- translation
def test_qlora_config_imports_to_a_recipe_launch_plan_accepts(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(workdir / "qlora.yml", QLORA)
    out = imported(config)
    assert capsys.readouterr().out.strip() == str(out)  # the path alone on stdout: `launch plan $(launch import ...)`
    assert out.read_text().startswith(f"# Imported from {config}")

    recipe = load_recipe(out).recipe
    method = recipe.method
    assert isinstance(method, QLoraMethod)
    assert (method.bits, method.r, method.alpha, method.dropout, method.target_modules) == (4, 32, 16, 0.05, "all-linear")
    assert method.compute_dtype == "bfloat16"
    optim = recipe.optim
    assert (optim.name, optim.lr, optim.micro_batch, optim.grad_accum, optim.epochs) == ("paged_adamw_32bit", 2e-4, 2, 4, 4)
    assert (optim.schedule, optim.warmup_steps, optim.weight_decay) == ("cosine", 10, 0.0)
    data = recipe.data
    assert (data.max_length, data.packing, data.loss_on, data.eval_fraction) == (4096, True, "assistant", 0.05)
    assert [(s.path, s.format) for s in data.train] == [(str(workdir / "data" / "alpaca.jsonl"), "alpaca")]
    assert data.prompt_style == "alpaca"  # axolotl's type: alpaca is the classic Alpaca prompt, not the chat template
    model = recipe.model
    assert model.path == str(workdir / "models" / "llama-8b")
    assert (model.dtype, model.attn_implementation, model.gradient_checkpointing) == ("bfloat16", "flash_attention_2", True)
    assert (recipe.output.root, recipe.output.name) == ("outputs", "qlora-out")

    plan = plan_json(out, capsys, "--gpus-per-node", "2", "--gpu-mem", "80GiB")
    assert plan["runnable"] and plan["world_size"] == 2 and plan["memory"] is not None
    assert plan["strategy"] in ("ddp", "zero1", "zero2")  # an 8B QLoRA fits 80 GiB without sharding the weights
    assert plan["run_dir"] == str(workdir / "outputs" / "qlora-out")


DORA_FSDP = FULL_BASE + """\
adapter: lora
peft_use_dora: true
lora_r: 16
lora_alpha: 32
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
lora_modules_to_save: [lm_head]
fsdp: [full_shard, auto_wrap]
fsdp_config: {fsdp_version: 2, offload_params: false, state_dict_type: SHARDED_STATE_DICT}
test_datasets: [{path: data/sharegpt.jsonl, type: chat_template, field_messages: conversations}]
eval_steps: 100
early_stopping_patience: 3
save_total_limit: 2
lr_scheduler: linear
adam_beta2: 0.95
max_grad_norm: 0
"""
DEEPSPEED_INLINE = FULL_BASE + "deepspeed: {zero_optimization: {stage: 2, overlap_comm: false}, bf16: {enabled: auto}}\n"


@pytest.mark.parametrize("text", [QLORA, CHAT_LORA, DORA_FSDP, DEEPSPEED_INLINE],
                         ids=["qlora", "chat-lora", "dora-fsdp", "deepspeed-inline"])
def test_every_key_of_the_config_is_translated_or_listed_with_a_reason(text: str, workdir: Path) -> None:
    config = yaml.safe_load(text)
    result = translated(workdir, text)
    sources = {row.source.split(".")[0].split(" ")[0] for row in result.translated}
    listed = {key.split(".")[0] for key, _ in result.untranslated}
    assert set(config) <= sources | listed
    assert all(reason for _, reason in result.untranslated)
    assert not [key for key, why in result.untranslated if "not an axolotl key" in why]  # these are all real keys
    # Empty keys (most of axolotl's examples) are said to be empty, never guessed at.
    empty = {key for key, value in config.items() if value is None}
    assert {key for key, reason in result.untranslated if "empty" in reason} == empty
    Recipe.model_validate({**result.recipe, "name": "t"})  # and the schema takes the result as it is


def test_recipe_keys_follow_the_schema_order(workdir: Path) -> None:
    text = imported(write(workdir / "qlora.yml", QLORA)).read_text()
    recipe = yaml.safe_load(text)
    order = list(Recipe.model_fields)
    assert list(recipe) == sorted(recipe, key=order.index)
    assert list(recipe["method"])[0] == "name"  # as in the shipped recipes, though pydantic lists it last
    assert "#   wandb_entity: empty" in text  # what was left out travels with the recipe


def test_chat_template_dataset_with_sharegpt_field_mappings(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = imported(write(workdir / "chat.yml", CHAT_LORA))
    recipe = load_recipe(out).recipe
    assert isinstance(recipe.method, LoraMethod)
    assert (recipe.method.r, recipe.method.alpha, recipe.method.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert recipe.method.dropout == 0.0  # axolotl's default, not ftlaunch's 0.05
    data = recipe.data
    assert [s.format for s in data.train] == ["messages"] and data.chat_template == "chatml"
    assert data.prompt_style == "chat"
    assert (data.eval_fraction, data.eval_seed, data.max_length, data.loss_on) == (0.25, 7, 256, "assistant")
    assert (recipe.eval.every_steps, recipe.checkpoint.every_steps, recipe.optim.max_steps) == (20, 50, 100)
    assert recipe.model.dtype == "float32"  # bf16: false trains in fp32

    # The mapped layout is one ftlaunch's data loader really reads: the same turns, roles mapped.
    from launcher.train.data import load_samples

    samples = load_samples(data.train, data)
    expected = [(("user", turns[0]["value"]), ("assistant", turns[1]["value"]))
                for turns in (row["conversations"] for row in sample_rows("sharegpt", 8))]
    assert [s.messages for s in samples] == expected
    plan = plan_json(out, capsys, "--gpus-per-node", "0")
    assert plan["runnable"] and plan["recipe"]["data"]["chat_template"] == "chatml"


def test_deepspeed_zero3_offload_json_maps_to_zero3_with_offload(workdir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write(workdir / "ds" / "zero3_offload.json", json.dumps(ZERO3_OFFLOAD))
    config = write(workdir / "full.yml", FULL_BASE + "deepspeed: ds/zero3_offload.json\n")
    out = imported(config)
    recipe = load_recipe(out).recipe
    assert isinstance(recipe.method, FullMethod)  # no adapter: full fine-tuning (ftlaunch's default is lora)
    ds = recipe.strategy.deepspeed
    assert recipe.strategy.name == "zero3"
    assert (ds.offload_optimizer, ds.offload_params, ds.overlap_comm) == ("cpu", "cpu", True)
    assert ds.reduce_bucket_size is None  # "auto": derived from the hidden size, as DeepSpeed's HF integration does
    left = dict(translated(workdir, config.read_text()).untranslated)
    assert "deepspeed.zero_optimization.sub_group_size" in left

    plan = plan_json(out, capsys, "--gpus-per-node", "2", "--gpu-mem", "80GiB")
    zero = plan["strategy_config"]["zero_optimization"]
    assert plan["strategy"] == "zero3" and zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_zero2_json_with_parameter_offload_leaves_the_offload_out(workdir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    zero2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                   "offload_param": {"device": "cpu"}}}
    write(workdir / "zero2.json", json.dumps(zero2))
    config = write(workdir / "z2.yml", FULL_BASE + "deepspeed: zero2.json\n")
    left = dict(translated(workdir, config.read_text()).untranslated)
    assert "stage 3" in left["deepspeed.zero_optimization.offload_param"]
    plan = plan_json(imported(config), capsys, "--gpus-per-node", "2", "--gpu-mem", "80GiB")
    assert plan["strategy"] == "zero2"  # the plan's checks refuse offload_params below stage 3: it was left out
    assert plan["strategy_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_fsdp_config_maps_to_fsdp2_options(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fsdp = """\
fsdp_version: 1
fsdp_config:
  fsdp_offload_params: true
  fsdp_sharding_strategy: SHARD_GRAD_OP
  fsdp_activation_checkpointing: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_use_orig_params: false
"""
    out = imported(write(workdir / "fsdp.yml", FULL_BASE + fsdp))
    strategy = load_recipe(out).recipe.strategy
    assert strategy.name == "fsdp"
    assert (strategy.fsdp.cpu_offload, strategy.fsdp.reshard_after_forward, strategy.fsdp.activation_checkpointing) \
        == (True, False, True)
    plan = plan_json(out, capsys, "--gpus-per-node", "2", "--gpu-mem", "80GiB")
    assert plan["strategy"] == "fsdp" and plan["runnable"]


def test_unsupported_keys_are_listed_with_their_reason(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = """\
comet_workspace: my-team
hub_model_id: me/my-model
unsloth_lora_mlp: true
my_custom_option: 3
optimizer: lion_8bit
lr_scheduler: cosine_with_restarts
evals_per_epoch: 4
"""
    config = write(workdir / "odd.yml", FULL_BASE + extra)
    left = dict(translated(workdir, config.read_text()).untranslated)
    assert "tracking" in left["comet_workspace"]
    assert "Hub" in left["hub_model_id"]
    assert "not an axolotl key" in left["my_custom_option"]
    assert "AdamW" in left["optimizer"] and "cosine" in left["lr_scheduler"]
    assert "steps per epoch" in left["evals_per_epoch"]

    out = imported(config)
    recipe = load_recipe(out).recipe
    assert (recipe.optim.name, recipe.optim.schedule) == ("adamw", "cosine")  # ftlaunch's own, not lion
    err = capsys.readouterr().err
    assert "not translated" in err and "my_custom_option" in err and "experiment tracking" in err
    assert "#   my_custom_option: not an axolotl key" in out.read_text()


def test_hub_ids_become_hub_datasets_and_a_local_model_placeholder(workdir: Path) -> None:
    text = QLORA.replace("base_model: models/llama-8b", "base_model: NousResearch/Meta-Llama-3-8B") \
                .replace("path: data/alpaca.jsonl", "path: tatsu-lab/alpaca\n    name: default\n    split: test"
                         "\n    revision: v2")
    result = translated(workdir, text)
    notes = " ".join(result.notes)
    assert "huggingface-cli download NousResearch/Meta-Llama-3-8B" in notes and "offline" in notes
    assert "tatsu-lab/alpaca is read from the Hugging Face Hub cache" in notes
    assert result.recipe["model"]["path"] == "models/Meta-Llama-3-8B"
    assert result.recipe["data"]["train"] == [{"hub": "tatsu-lab/alpaca", "split": "test", "subset": "default",
                                               "revision": "v2", "format": "alpaca"}]
    recipe = load_recipe(imported(write(workdir / "hub.yml", text))).recipe  # still a valid recipe
    assert recipe.model.path == str(workdir / "models" / "Meta-Llama-3-8B")
    assert (recipe.data.train[0].hub, recipe.data.prompt_style) == ("tatsu-lab/alpaca", "alpaca")


def test_paths_are_written_relative_to_the_recipe(workdir: Path) -> None:
    """axolotl resolves paths against its working directory; the recipe loader against the recipe's directory."""
    config = write(workdir / "configs" / "my.axolotl.yml", QLORA)
    out = imported(config)
    assert out == workdir / "configs" / "my.axolotl.ftlaunch.yaml"
    assert yaml.safe_load(out.read_text())["model"]["path"] == "../models/llama-8b"
    recipe = load_recipe(out).recipe
    assert recipe.model.path == str(workdir / "models" / "llama-8b")
    assert recipe.data.train[0].path == str(workdir / "data" / "alpaca.jsonl")


def test_import_loads_no_torch(workdir: Path) -> None:
    config = write(workdir / "qlora.yml", QLORA)
    code = f"from launcher.cli.main import main\nrc = main(['import', {str(config)!r}])"
    result = run_light(code, cwd=workdir, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_the_data_loader_copies_match_the_rank_side() -> None:
    from launcher.train import data

    assert SHAREGPT_ROLES == data._SHAREGPT_ROLES and ROLES == data._ROLES
    assert set(SHIPPED_TEMPLATES) == set(data.SHIPPED_TEMPLATES)


# -------------------------------------------------------------------------------------------------- bad input
ALPACA = "datasets: [{path: data/alpaca.jsonl, type: alpaca}]\n"
BAD = {
    "not YAML": ("base_model: [unclosed\n", ["not valid YAML"]),
    "not a mapping": ("- base_model\n- datasets\n", ["(root)", "mapping"]),
    "no base_model": (ALPACA, ["base_model", "required"]),
    "unknown dataset type": ("base_model: models/llama-8b\ndatasets: [{path: data/alpaca.jsonl, type: oasst}]\n",
                             ["datasets.0.type", "oasst", "alpaca"]),
    "unreadable message field": ("base_model: models/llama-8b\ndatasets: [{path: data/sharegpt.jsonl, "
                                 "type: chat_template, field_messages: dialog}]\n",
                                 ["datasets.0.field_messages", "dialog", "rename"]),
    "unreadable message layout": ("base_model: models/llama-8b\ndatasets: [{path: data/sharegpt.jsonl, "
                                  "type: chat_template, message_property_mappings: {role: speaker, content: text}}]\n",
                                  ["datasets.0.message_property_mappings", "speaker"]),
    "4-bit and 8-bit": (f"base_model: models/llama-8b\n{ALPACA}adapter: lora\nload_in_4bit: true\nload_in_8bit: true\n",
                        ["load_in_8bit", "load_in_4bit"]),
    "bf16 and fp16": (f"base_model: models/llama-8b\n{ALPACA}bf16: true\nfp16: true\n", ["fp16", "bf16"]),
    "deepspeed and fsdp": (f"base_model: models/llama-8b\n{ALPACA}deepspeed: ds.json\nfsdp_config: "
                           "{offload_params: true}\n", ["fsdp_config", "deepspeed"]),
    "missing deepspeed JSON": (f"base_model: models/llama-8b\n{ALPACA}deepspeed: nowhere/zero3.json\n",
                               ["deepspeed", "nowhere/zero3.json", "not found"]),
    "warmup twice": (f"base_model: models/llama-8b\n{ALPACA}warmup_steps: 10\nwarmup_ratio: 0.1\n",
                     ["warmup_ratio", "warmup_steps"]),
    "RL trainer": (f"base_model: models/llama-8b\n{ALPACA}rl: dpo\n", ["rl", "supervised"]),
    "value the schema refuses": (f"base_model: models/llama-8b\n{ALPACA}adapter: lora\nlora_r: 0\n",
                                 ["method.r", "lora_r"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_naming_the_key(case: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, expected = BAD[case]
    config = write(workdir / "bad.yml", text)
    assert main(["import", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert all(part in err for part in expected), err
    assert not (workdir / "bad.ftlaunch.yaml").exists()
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]  # the validation file is gone


def test_out_never_overwrites_without_force(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(workdir / "qlora.yml", QLORA)
    target = write(workdir / "recipes" / "mine.yaml", "# my own recipe\n")
    assert main(["import", str(config), "--out", str(target)]) == 2
    assert target.read_text() == "# my own recipe\n" and "--force" in capsys.readouterr().err
    assert main(["import", str(config), "--out", str(config), "--force"]) == 2  # never the config itself
    assert config.read_text() == QLORA
    assert main(["import", str(config), "--out", str(target), "--force"]) == 0
    assert load_recipe(target).recipe.method.name == "qlora"
    assert load_recipe(target).recipe.model.path == str(workdir / "models" / "llama-8b")


HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "\0", "x" * 300, "../../x", "a\nb", "auto", "2e-4", "org/model", "~nobody/x", "jinja",
                     "tokenizer_default_fallback_chatml", "chat_template", "completion", "s3://b/k"]),
    st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=3),
)
KEYS = st.sampled_from([
    *yaml.safe_load(QLORA), "datasets.0.type", "datasets.0.path", "datasets.0.split", "datasets.0.roles",
    "datasets.0.field_messages", "datasets.0.message_property_mappings", "datasets.0.roles_to_train",
    "datasets.0.data_files", "deepspeed", "fsdp", "fsdp_config", "chat_template_jinja", "test_datasets",
    "unfrozen_parameters", "bnb_config_kwargs", "eval_steps", "max_steps", "batch_size", "peft_use_dora", "seed",
])


@settings(max_examples=100, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(KEYS, HOSTILE_VALUES), min_size=1, max_size=4))
def test_any_mutation_is_imported_or_refused_with_the_config_named(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                                   mutations: list[tuple[str, Any]]) -> None:
    config = yaml.safe_load(QLORA)
    for key, value in mutations:
        node: Any = config
        *parents, last = key.split(".")
        for part in parents:
            if isinstance(node, dict):
                node = node.get(part)
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
        if isinstance(node, dict):
            node[last] = value
    path = workdir / "mutated.yml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    out = workdir / "mutated.ftlaunch.yaml"
    code = main(["import", str(path), "--force"])  # an exception escaping here fails the test (a traceback)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert str(path) in err, err
    else:
        load_recipe(out)  # what was written loads
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]
