"""Tokens/s over a window and over the run, and the ETA, from recorded steps (launcher/train/throughput.py)."""

from __future__ import annotations

import pytest

from launcher.train.throughput import Throughput, clock


def test_window_run_average_and_eta() -> None:
    speed = Throughput(total_steps=10, window=3)
    assert speed.eta_seconds(0) is None and speed.summary(0).endswith("eta -")
    # Step i: 100 tokens in 1 s, ending at t = 2i (a second of evaluation or checkpoint after each step).
    for i in range(1, 5):
        speed.record(100.0, 1.0 if i < 4 else 4.0, now=2.0 * i)
    # The window holds steps 2, 3, 4: 300 tokens in 6 s; the run: 400 tokens in 7 s.
    assert speed.window_tokens_per_s == pytest.approx(50.0)
    assert speed.run_tokens_per_s == pytest.approx(400 / 7)
    # 2 s of wall time between step ends in the window, 6 steps left.
    assert speed.eta_seconds(4) == pytest.approx(12.0)
    assert speed.summary(4) == "50 tok/s (run 57)  eta 0:12"


def test_clock() -> None:
    assert [clock(None), clock(5), clock(65.4), clock(3725)] == ["-", "0:05", "1:05", "1:02:05"]


def test_mfu_is_the_window_rate_times_flops_over_the_peak() -> None:
    speed = Throughput(total_steps=10, window=2, flops_per_token=6e9, peak_flops=2 * 1e15)  # 2 GPUs of 1 PFLOP/s
    assert speed.mfu is None  # no step yet: no rate
    speed.record(1000.0, 2.0, now=1.0)
    speed.record(3000.0, 2.0, now=3.0)
    assert speed.mfu == pytest.approx(1000.0 * 6e9 / 2e15)  # 4000 tokens in 4 s
    assert "mfu 0.3%  eta" in speed.summary(2)
    assert "mfu" not in Throughput(total_steps=10).summary(0)  # CPU, or a GPU whose peak is unknown


def test_the_trainer_feeds_mfu_on_a_gpu_with_a_known_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Trainer._mfu_terms` on a CUDA device (the device name is the one thing faked: no GPU here; the GPU check runs
    it for real, bench/gpu/resume_check.py's `trainer_mfu_last`): the LoRA model's FLOPs against the H100 peak."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.config.schema import LoraMethod
    from launcher.plan.flops import training_flops_per_token
    from launcher.train.trainer import Trainer

    tiny = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=400)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**tiny)), LoraConfig(r=8, target_modules="all-linear"))
    trainer = SimpleNamespace(
        device=torch.device("cuda", 0), model=model, strategy=SimpleNamespace(is_main=True, world_size=2),
        recipe=SimpleNamespace(data=SimpleNamespace(max_length=32), method=LoraMethod(name="lora", r=8),
                               task=SimpleNamespace(type="causal_lm")))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    terms = Trainer._mfu_terms(trainer)  # type: ignore[arg-type]
    assert terms["peak_flops"] == pytest.approx(2 * 989.4e12)
    assert terms["flops_per_token"] == pytest.approx(
        training_flops_per_token({"model_type": "llama", **tiny}, seq_len=32, method="lora", lora_rank=8).total)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")  # no known peak: no MFU
    assert Trainer._mfu_terms(trainer) == {}  # type: ignore[arg-type]
