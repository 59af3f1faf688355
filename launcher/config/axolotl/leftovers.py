"""Every key no section translated, with the reason it was not."""

from __future__ import annotations

from launcher.config.axolotl.builder import Builder, EMPTY, OFF, is_empty


TRACKING = ("experiment tracking in ftlaunch is W&B (wandb_project, ...) and MLflow (mlflow_tracking_uri, ...): "
            "this tracker or key has no equivalent")
HUB = ("ftlaunch neither pushes to the Hugging Face Hub nor fetches models from it while training (a Hub token comes "
       "from the environment): the outputs load with from_pretrained; upload them with `hf upload`")
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


def leftovers(b: Builder) -> None:
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
