"""Tests for launcher/plan/memory_model.py: exact parameter counts vs transformers, LoRA counts vs PEFT, model-state bytes vs
DeepSpeed's own estimators, and the planner's choices. torch/transformers/peft/deepspeed are imported inside the
tests that need them (the module under test must not import them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.plan import memory_model as mem

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen2.5-7b", "qwen2.5-72b", "mistral-7b", "mixtral-8x7b"]
PUBLISHED_TOTAL_B = {  # model cards / papers, in billions (rounded as published)
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.6,
    "llama-3.1-405b": 405.9,
    "qwen2.5-7b": 7.62,
    "qwen2.5-72b": 72.7,
    "mistral-7b": 7.25,
    "mixtral-8x7b": 46.7,
}
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
GB80 = 80 * 10**9  # an "80 GB" H100/A100 as sold (79.6 GiB usable before the context)


def shipped(name: str) -> mem.ParamCounts:
    return mem.count_parameters(mem.read_model_config(ROOT / "recipes" / "models" / name))


# --------------------------------------------------------------------------------------------------------------
# Parameter counts: exact against transformers (tiny random models), published sizes (shipped configs)

# Tiny configs: head_dim != hidden/heads where the family allows an override, GQA everywhere it exists.
TINY: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=128, attention_bias=True, mlp_bias=True),
    "llama_tied": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, vocab_size=128),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=128),
    "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, vocab_size=128),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=128),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, vocab_size=128),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, pad_token_id=0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128),
    "mixtral": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=128, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[]),
}


@pytest.fixture(scope="module")
def tiny_models():
    """{case: (config dict as config.json would hold it, model)} for every family, built once."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    out = {}
    for case, kwargs in TINY.items():
        kwargs = dict(kwargs)
        model_type = kwargs.pop("model_type", case)
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config)
        out[case] = (config.to_diff_dict(), model)
    return out


def _unique_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.mark.parametrize("case", list(TINY))
def test_counts_exact_vs_transformers(tiny_models, case: str) -> None:
    import torch

    config, model = tiny_models[case]
    counts = mem.count_parameters(config)
    assert counts.total == _unique_numel(model)

    layers = model.model.layers if hasattr(model, "model") else model.gpt_neox.layers
    assert counts.decoder_layers == sum(_unique_numel(layer) for layer in layers)
    assert counts.largest_layer == max(_unique_numel(layer) for layer in layers)
    assert counts.layer_params == tuple(_unique_numel(layer) for layer in layers)
    assert mem.last_layers_params(counts, 1) == _unique_numel(layers[-1])
    # DeepSpeed's largest_layer_params: parameters held directly by one module
    assert counts.largest_module == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    linears = [m for layer in layers for m in layer.modules() if type(m) is torch.nn.Linear]
    assert counts.linear_weights == sum(m.weight.numel() for m in linears)
    assert counts.linear_rows == sum(m.out_features for m in linears)

    # active = total minus the routed experts a token skips
    expert_modules = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    skipped = 0
    for experts in expert_modules:
        per_expert = sum(p[0].numel() for p in experts.parameters(recurse=False))
        skipped += (counts.dims.num_experts - counts.dims.experts_per_token) * per_expert
    assert counts.active == counts.total - skipped
    assert (skipped > 0) == (counts.dims.num_experts > 0)


def test_counts_use_family_defaults_for_missing_keys() -> None:
    """config.json files omit keys equal to the class defaults: tied Gemma embeddings, Qwen3's head_dim 128."""
    transformers = pytest.importorskip("transformers")
    import torch

    minimal = {
        "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=128),
        "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128),
    }
    for model_type, kwargs in minimal.items():
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        assert mem.count_parameters({"model_type": model_type, **kwargs}).total == _unique_numel(model)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_published_sizes(name: str) -> None:
    counts = shipped(name)
    assert counts.total / 1e9 == pytest.approx(PUBLISHED_TOTAL_B[name], abs=0.051)
    if name == "mixtral-8x7b":
        assert counts.active / 1e9 == pytest.approx(12.9, abs=0.05)
    else:
        assert counts.active == counts.total


def test_shipped_configs_exact_on_meta_device() -> None:
    """The shipped config.json files build in transformers, and our count equals the built model's (no memory used:
    the meta device holds shapes only)."""
    transformers = pytest.importorskip("transformers")
    import torch

    for name in SHIPPED:
        raw = mem.read_model_config(ROOT / "recipes" / "models" / name)
        config = transformers.AutoConfig.for_model(**raw)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        assert mem.count_parameters(raw).total == _unique_numel(model), name


def test_unsupported_model_type_is_named() -> None:
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        mem.count_parameters({"model_type": "bert", "hidden_size": 8})


# --------------------------------------------------------------------------------------------------------------
# LoRA trainable parameters vs PEFT


@pytest.mark.parametrize(
    "case,targets,dora",
    [
        ("llama", "all-linear", False),
        ("llama", ["q_proj", "v_proj"], False),
        ("mistral", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
        ("phi3", "all-linear", False),
        ("gpt_neox", ["query_key_value", "dense"], False),
        ("qwen2_moe", "all-linear", False),
    ],
)
def test_lora_trainable_params_match_peft(tiny_models, case: str, targets, dora: bool) -> None:
    peft = pytest.importorskip("peft")
    import copy

    config, model = tiny_models[case]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    peft_model = peft.get_peft_model(copy.deepcopy(model), lora)
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    counts = mem.count_parameters(config)
    assert mem.lora_trainable_params(counts, rank=4, targets=targets, dora=dora) == expected


# --------------------------------------------------------------------------------------------------------------
# Model states vs DeepSpeed's estimators (one test: importing deepspeed costs seconds)


def test_model_states_agree_with_deepspeed_estimators(capsys) -> None:
    """Full fine-tuning, bf16, AdamW, shipped configs, several world sizes.

    DeepSpeed's GPU figures (``estimate_zero{2,3}_model_states_mem_needs``) have no buffer factor (its
    ``additional_buffer_factor=1.5`` multiplies only the CPU figures), so the GPU model states agree exactly
    except for one documented term: ZeRO-3 keeps the reduced bf16 gradient partition
    (``grad_partitions_flat_buffer``, 2 bytes/param / N) that DeepSpeed's estimator omits (its 18 = 2 + 4 + 4 + 8
    has no 16-bit gradient). CPU figures: ours x 1.5 (DeepSpeed's buffer factor) with the same bf16 gradient
    partition difference on ZeRO-3.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rel = 1e-9  # integer rounding only
    rows = []
    for name in ["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-72b", "mixtral-8x7b"]:
        counts = shipped(name)
        p = counts.total
        for nodes, gpus_per_node in [(1, 4), (1, 8), (8, 8)]:
            n = nodes * gpus_per_node

            def ours(strategy, off_opt=False, off_par=False):
                return mem.estimate_memory(counts, method="full", strategy=strategy, world_size=n,
                                           offload_optimizer=off_opt, offload_params=off_par, micro_batch=1)

            # ZeRO-2
            for off in (False, True):
                ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(p, gpus_per_node, nodes, cpu_offload=off)
                est = ours("zero2", off)
                assert est.model_states == pytest.approx(ds_gpu, rel=rel)
                if off and nodes == 1 and 4 * n <= 16:  # DS takes max(4*GPUs (fp32 load), 16) bytes/param
                    assert est.host * gpus_per_node * 1.5 == pytest.approx(ds_cpu, rel=rel)
                rows.append((name, n, f"zero2 offload={off}", est.model_states, ds_gpu))
            # ZeRO-3: no offload / optimizer offload / optimizer + params offload
            for off_opt, off_par in [(False, False), (True, False), (True, True)]:
                ds_cpu, ds_gpu, largest = estimate_zero3_model_states_mem_needs(
                    p, counts.largest_module, gpus_per_node, nodes, cpu_offload=off_opt, cpu_offload_params=off_par
                )
                est = ours("zero3", off_opt, off_par)
                bf16_grad_partition = 2 * p / n
                if off_opt:
                    assert est.model_states == pytest.approx(ds_gpu, rel=rel)
                    ds_node = ds_cpu / 1.5  # zero_init=True: 16 (18 with params) bytes/param / nodes
                    assert est.host * gpus_per_node == pytest.approx(ds_node + 2 * p / nodes, rel=rel)
                else:
                    assert est.model_states == pytest.approx(ds_gpu + bf16_grad_partition, rel=rel)
                rows.append((name, n, f"zero3 offload_opt={off_opt} params={off_par}", est.model_states, ds_gpu))
    with capsys.disabled():
        print("\nmodel states per GPU, GiB (ours vs DeepSpeed estimator)")
        for name, n, what, a, b in rows:
            if n == 8:
                print(f"  {name:14} N={n:<3} {what:36} {a / mem.GiB:8.2f} {b / mem.GiB:8.2f}")


# --------------------------------------------------------------------------------------------------------------
# Formulas and their relations


def test_zero_paper_bytes_per_param() -> None:
    """Rajbhandari et al. 2020, Figure 1: 16 bytes/param for DDP; ZeRO stages shrink the sharded parts by N."""
    counts = shipped("llama-3.1-8b")
    p, n = counts.total, 8
    kw = dict(method="full", world_size=n, micro_batch=0)
    ddp = mem.estimate_memory(counts, strategy="ddp", **kw)
    z1 = mem.estimate_memory(counts, strategy="zero1", **kw)
    z2 = mem.estimate_memory(counts, strategy="zero2", **kw)
    fsdp = mem.estimate_memory(counts, strategy="fsdp", **kw)
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (2 * p, 2 * p, 12 * p)
    assert z1.optimizer == pytest.approx(12 * p / n, abs=1) and z1.grads == pytest.approx(2 * p + 4 * p / n, abs=1)
    assert z2.model_states == pytest.approx(2 * p + 18 * p / n, abs=2)
    unit = max(counts.largest_layer, counts.root_unit)
    assert fsdp.model_states == pytest.approx(16 * p / n + 2 * 2 * unit + 6 * unit, abs=3)
    assert ddp.model_states > z1.model_states > z2.model_states > fsdp.model_states
    # hybrid sharding over 8 of 64 ranks holds what full sharding over 8 ranks holds
    hybrid = mem.estimate_memory(counts, strategy="fsdp_hybrid", method="full", world_size=64, shard_group_size=8,
                                 micro_batch=0)
    assert hybrid.model_states == fsdp.model_states
    # model.master_weights: false trains the bf16 weights themselves; torch's AdamW keeps bf16 moments
    pure = mem.estimate_memory(counts, strategy="ddp", master_weights=False, **kw)
    assert (pure.weights, pure.grads, pure.optimizer) == (2 * p, 2 * p, 4 * p)
    pure_fsdp = mem.estimate_memory(counts, strategy="fsdp", master_weights=False, **kw)
    assert pure_fsdp.model_states == pytest.approx(8 * p / n + 2 * 2 * unit + 6 * unit, abs=3)
    lora = mem.estimate_memory(counts, strategy="ddp", master_weights=False, **{**kw, "method": "lora"})
    assert lora.model_states == mem.estimate_memory(counts, strategy="ddp", **{**kw, "method": "lora"}).model_states


def test_qlora_on_ddp_counts_the_fp32_upcast_of_unquantized_weights() -> None:
    """prepare_model_for_kbit_training makes embedding, LM head and norms fp32: 4 bytes instead of 2 for them, an
    fp32 residual stream and fp32 logits. Not under ZeRO (DeepSpeed casts the module back) or sharded QLoRA."""
    counts = shipped("llama-3.1-8b")
    kw = dict(method="qlora", lora_rank=16, world_size=1, micro_batch=1, seq_len=512, activation_checkpointing=True)
    ddp = mem.estimate_memory(counts, strategy="ddp", **kw)
    zero2 = mem.estimate_memory(counts, strategy="zero2", **kw)
    rest = counts.total - counts.linear_weights
    lora = mem.lora_trainable_params(counts, rank=16)  # fp32 adapters under DDP, bf16 under DeepSpeed
    assert ddp.weights - zero2.weights == 2 * rest + 2 * lora
    assert ddp.logits - zero2.logits == 512 * counts.dims.vocab_size * 2


def test_lora_activations_count_peft_fp32_input_casts() -> None:
    """PEFT upcasts adapters to fp32 on a bf16 base and casts each targeted linear's input for lora_A, which saves
    that copy: 4*in bytes per token per linear (the term the H200 run found missing), plus 4*r for A's output.
    DeepSpeed casts the adapters back to bf16: no copy."""
    counts = shipped("llama-3.1-8b")
    kw = dict(method="lora", lora_rank=16, world_size=1, micro_batch=1, seq_len=1024, activation_checkpointing=False)
    base = mem.estimate_memory(counts, method="full", strategy="ddp", **{k: v for k, v in kw.items() if k != "method"})
    ddp = mem.estimate_memory(counts, strategy="ddp", **kw)
    zero2 = mem.estimate_memory(counts, strategy="zero2", **kw)
    ins = sum(s.in_features * s.count for s in mem.linear_shapes(counts.dims))
    linears = sum(s.count for s in mem.linear_shapes(counts.dims))
    assert ddp.activations - base.activations == 1024 * (4 * ins + 4 * 16 * linears)
    assert zero2.activations - base.activations == 1024 * 2 * 16 * linears


def test_qlora_storage_bytes() -> None:
    """Dettmers et al. 2023: NF4 + double-quantized constants ≈ 0.516 bytes/weight (0.5625 without DQ)."""
    assert mem.quantized_bytes_per_weight("qlora", double_quant=True) == pytest.approx(0.5 + 0.127 / 8, abs=1e-4)
    assert mem.quantized_bytes_per_weight("qlora", double_quant=False) == pytest.approx(0.5625)
    counts = shipped("llama-3.1-70b")
    est = mem.estimate_memory(counts, method="qlora", lora_rank=16, micro_batch=0, strategy="ddp")
    lora = mem.lora_trainable_params(counts, rank=16)
    rest = counts.total - counts.linear_weights  # embedding, LM head, norms: left unquantized
    nf4 = counts.linear_weights * mem.quantized_bytes_per_weight("qlora", double_quant=True)
    # under DDP peft's prepare_model_for_kbit_training upcasts the unquantized rest to fp32
    assert est.weights == pytest.approx(nf4 + rest * 4 + 4 * lora, abs=2)  # fp32 adapters
    assert est.grads == 4 * lora and est.optimizer == 8 * lora
    # the well-known "70B QLoRA on one 48 GB GPU" ballpark is the quantized base with a bf16 rest
    assert 36 * mem.GiB < nf4 + rest * 2 < 40 * mem.GiB


def test_activations_checkpointing_logits_and_optimizers() -> None:
    counts = shipped("llama-3.1-8b")
    d = counts.dims
    kw = dict(method="full", strategy="zero3", world_size=8, micro_batch=2, seq_len=4096)
    full = mem.estimate_memory(counts, activation_checkpointing=False, **kw)
    ckpt = mem.estimate_memory(counts, activation_checkpointing=True, **kw)
    tokens = 2 * 4096
    per_layer = mem.activation_bytes_per_token_per_layer(d, moe_layer=False, seq_len=4096, act_bytes=2)
    # SwiGLU + GQA + flash attention: 2*(2h + 2ad + 2kv*d) + 4a + 2*(2h + 4I)
    h, ad, kvd, a, inter = 4096, 4096, 1024, 32, 14336
    assert per_layer == 2 * (2 * h + 2 * ad + 2 * kvd) + 4 * a + 2 * (2 * h + 4 * inter)
    assert full.activations == tokens * (32 * per_layer + 2 * 2 * h)
    # Korthikanti: 2sbh per layer stored; the layer being recomputed and the logits are never alive together
    assert ckpt.activations == tokens * (32 * 2 * h + 2 * 2 * h) + max(0, tokens * per_layer - ckpt.logits)
    short = mem.estimate_memory(counts, activation_checkpointing=True, **{**kw, "seq_len": 64, "micro_batch": 1})
    assert short.activations == 64 * (32 * 2 * h + 2 * 2 * h)  # 64 x 128k logits outweigh one layer's activations
    assert full.logits == tokens * d.vocab_size * mem.LOGITS_BYTES_PER_ELEMENT
    fused = mem.estimate_memory(counts, fused_ce=True, **kw)
    assert fused.logits < full.logits / 10
    eager = mem.estimate_memory(counts, flash_attention=False, activation_checkpointing=False, **kw)
    assert eager.activations - full.activations == tokens * 32 * (4 + 2) * a * 4096
    # 8-bit Adam: 2 bytes of states (+ block constants) instead of 8, still with the fp32 master
    adam8 = mem.estimate_memory(counts, optimizer="adamw_8bit", strategy="ddp", micro_batch=0)
    assert adam8.optimizer == pytest.approx(counts.total * (4 + 2 + 8 / 256), abs=1)
    paged = mem.estimate_memory(counts, optimizer="paged_adamw_8bit", strategy="ddp", micro_batch=0)
    assert paged.pageable == paged.optimizer and paged.total == adam8.total
    # offloading ZeRO-3 everything leaves only the gathered module on the GPU
    off = mem.estimate_memory(counts, offload_optimizer=True, offload_params=True, **kw)
    assert off.model_states == 4 * counts.largest_module
    assert off.host == pytest.approx(20 * counts.total / 8, abs=2)


def test_invalid_combinations_raise() -> None:
    counts = shipped("llama-3.1-8b")
    with pytest.raises(ValueError, match="offload_params"):
        mem.estimate_memory(counts, strategy="zero2", offload_params=True)
    with pytest.raises(ValueError, match="adamw"):
        mem.estimate_memory(counts, strategy="zero3", offload_optimizer=True, optimizer="adamw_8bit")
    with pytest.raises(ValueError, match="trainable_params"):
        mem.estimate_memory(counts, method="freeze")
    # the recipe's dtype spelling is accepted
    assert mem.estimate_memory(counts, param_dtype="bfloat16") == mem.estimate_memory(counts, param_dtype="bf16")
    frozen = mem.estimate_memory(counts, method="freeze", trainable_params=mem.last_layers_params(counts, 4),
                                 strategy="ddp", micro_batch=0)
    assert frozen.optimizer == 12 * 4 * counts.layer_params[-1]


# --------------------------------------------------------------------------------------------------------------
# Planning


def test_plan_and_choose_strategy() -> None:
    training = dict(method="full", micro_batch=1, seq_len=4096, activation_checkpointing=True)
    # 8B full fine-tune on 8 x 80 GB: DDP needs 16 bytes/param (> 128 GB); some ZeRO stage fits.
    rows = mem.plan_strategies(shipped("llama-3.1-8b"), nodes=1, gpus_per_node=8, gpu_mem_bytes=GB80, **training)
    assert [r.name for r in rows] == ["ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload_optimizer",
                                      "zero3_offload"]
    by_name = {r.name: r for r in rows}
    assert not by_name["ddp"].fits and by_name["zero2"].fits
    name, reason = mem.choose_strategy(rows)
    assert name in ("zero1", "zero2") and "ddp" in reason and "GiB" in reason

    # 70B full fine-tune: one node only with optimizer offload; four nodes shard it without offload.
    counts70 = shipped("llama-3.1-70b")
    rows = mem.plan_strategies(counts70, nodes=1, gpus_per_node=8, gpu_mem_bytes=GB80, **training)
    assert mem.choose_strategy(rows)[0] == "zero3_offload_optimizer"
    rows = mem.plan_strategies(counts70, nodes=4, gpus_per_node=8, gpu_mem_bytes=GB80, **training)
    assert "fsdp_hybrid" in [r.name for r in rows]
    assert mem.choose_strategy(rows)[0] == "fsdp"

    # 405B on one GPU: only full offload fits the GPU (ZeRO-Infinity), and it needs ~7.4 TiB of host RAM
    counts405 = shipped("llama-3.1-405b")
    rows = mem.plan_strategies(counts405, nodes=1, gpus_per_node=1, gpu_mem_bytes=GB80, **training)
    assert mem.choose_strategy(rows)[0] == "zero3_offload"
    rows = mem.plan_strategies(counts405, nodes=1, gpus_per_node=1, gpu_mem_bytes=GB80,
                               host_mem_bytes=2 * 1024 * mem.GiB, **training)
    name, reason = mem.choose_strategy(rows)
    assert name is None and "nothing fits" in reason and "host RAM" in reason

    # 8-bit optimizers cannot be offloaded: no offload rows
    rows = mem.plan_strategies(shipped("llama-3.1-8b"), nodes=1, gpus_per_node=1, gpu_mem_bytes=GB80,
                               method="qlora", optimizer="paged_adamw_8bit")
    assert all(not r.offload_optimizer for r in rows)
    assert mem.choose_strategy(rows)[0] == "ddp"



def test_choose_strategy_passes_over_what_the_recipe_rules_out() -> None:
    """`auto` takes the first row that fits AND that the rest of the recipe can run with; when only ruled-out rows
    fit, nothing is chosen and the reason names the change (the check's hint) that would make one usable."""
    training = dict(method="qlora", micro_batch=1, seq_len=4096, activation_checkpointing=True)
    rows = mem.plan_strategies(shipped("llama-3.1-70b"), nodes=1, gpus_per_node=2, gpu_mem_bytes=48 * mem.GiB,
                               **training)
    fitting = [r.name for r in rows if r.fits]
    assert fitting[:2] == ["fsdp", "zero3"], fitting
    assert mem.choose_strategy(rows)[0] == "fsdp"
    rule = "optim.name: paged_adamw_8bit cannot update FSDP's DTensors (use optim.name: adamw)"
    name, reason = mem.choose_strategy(rows, incompatible={"fsdp": rule})
    assert name == "zero3" and "ruled out by the recipe: fsdp (optim.name)" in reason
    everything = {r.name: rule for r in rows}
    name, reason = mem.choose_strategy(rows, incompatible=everything)
    assert name is None and reason.startswith("nothing compatible with the recipe fits; fsdp") and "use optim.name" in reason

def test_largest_micro_batch() -> None:
    counts = shipped("llama-3.1-8b")
    kw = dict(method="lora", strategy="ddp", seq_len=4096, activation_checkpointing=True)
    pow2 = mem.largest_micro_batch(counts, gpu_mem_bytes=GB80, **kw)
    anyint = mem.largest_micro_batch(counts, gpu_mem_bytes=GB80, power_of_two=False, **kw)
    assert pow2 >= 1 and pow2 & (pow2 - 1) == 0 and pow2 <= anyint < 2 * pow2

    def total(b: int) -> int:
        return mem.estimate_memory(counts, micro_batch=b, **kw).total

    assert total(anyint) <= GB80 < total(anyint + 1)
    assert mem.largest_micro_batch(shipped("llama-3.1-405b"), gpu_mem_bytes=GB80, **kw) == 0
    assert mem.largest_micro_batch(counts, gpu_mem_bytes=10**15, max_micro_batch=48, power_of_two=False, **kw) == 48


def test_estimate_is_fast_and_serializable() -> None:
    import json
    import time

    counts = shipped("llama-3.1-405b")
    start = time.perf_counter()
    rows = mem.plan_strategies(counts, nodes=16, gpus_per_node=8, gpu_mem_bytes=GB80, method="full")
    assert time.perf_counter() - start < 0.2
    json.dumps([r.estimate.to_dict() for r in rows])
    assert set(rows[0].estimate.gib()) >= {"weights", "grads", "optimizer", "activations", "logits", "total"}
