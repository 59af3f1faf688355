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

from launcher.config.axolotl.builder import Mapped, Paths, Translation, locate
from launcher.config.axolotl.data import ROLES, SHAREGPT_ROLES, SHIPPED_TEMPLATES
from launcher.config.axolotl.translator import recipe_text, translate

__all__ = ["Mapped", "Paths", "ROLES", "SHAREGPT_ROLES", "SHIPPED_TEMPLATES", "Translation", "locate", "recipe_text",
           "translate"]
