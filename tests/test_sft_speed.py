"""The SFT stage's speed figures (tasks/sft/speed.py): the steady state leaves out warm-up and pauses,
the model FLOPs per token follow the architecture, MFU uses the card's datasheet peak."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.sft.speed import lora_flops_per_token, speed_line, speed_metrics, steady_rate


def test_the_steady_rate_leaves_out_compilation_and_evaluation():
    # 1,000 tokens a step at 1 s a step, but the first step compiles for 26 s and step 5 evaluates for 10 s.
    ends, t = [], 0.0
    for step in range(1, 11):
        t += 27.0 if step == 1 else 1.0
        if step == 6:
            t += 10.0  # the pause after step 5 shows in the next step's end time
        ends.append((step, t, 1000 * step))
    steady, after = steady_rate(ends, paused={5: 10.0})
    assert after == 2 and steady == pytest.approx(1000.0)
    whole = ends[-1][2] / ends[-1][1]
    assert whole < 0.5 * steady  # what the stage used to report: under half the card's speed


def test_short_runs_warm_up_one_step_and_a_single_step_has_no_steady_figure():
    assert steady_rate([(1, 5.0, 100), (2, 6.0, 200), (3, 7.0, 300)], {}) == (100.0, 1)
    assert steady_rate([(1, 5.0, 100)], {}) == (None, None)


def test_model_flops_per_token_count_the_frozen_linear_layers_and_attention_not_the_adapters():
    h, inter, layers, vocab, heads, kv = 64, 128, 2, 500, 4, 2
    config = LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
    kv_dim = h // heads * kv
    per_layer = h * h + 2 * h * kv_dim + h * h + 3 * h * inter  # q, k, v, o; gate, up, down
    linear = layers * per_layer + h * vocab  # lm_head counts, the embedding does not
    lengths = [100, 300]
    attention = 6 * layers * h * (100**2 + 300**2) / 400
    assert lora_flops_per_token(model, lengths) == pytest.approx(4 * linear + attention)


def test_mfu_uses_the_datasheet_peak_of_the_card_and_every_process():
    flops = 4 * 7.0e9
    one = speed_metrics(14_925.0, 2, flops, "NVIDIA H100 80GB HBM3", 1)
    assert one["mfu"] == pytest.approx(14_925 * flops / 989.4e12)
    two = speed_metrics(14_925.0, 2, flops, "NVIDIA A100-SXM4-40GB", 2)
    assert two["mfu"] == pytest.approx(14_925 * flops / (2 * 312.0e12))
    assert speed_metrics(100.0, 2, flops, None, 1)["mfu"] is None  # a CPU has no datasheet peak here
    assert speed_metrics(100.0, 2, flops, "Some Future GPU", 1)["mfu"] is None
    line = speed_line({**one, "tokens_per_second": 7_278.0})
    assert "steady 14,925 tokens/s after step 2" in line and "MFU 4" in line and "whole run 7,278" in line


def test_the_clock_times_real_steps_on_this_machine(tmp_path):
    """The callback under a real Trainer: steps, pauses after evaluation and saving, a steady figure."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from tasks.sft.speed import step_clock

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))  # fmt: skip
    ids = torch.randint(0, 64, (16, 12)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    clock = step_clock()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, eval_strategy="steps",
        eval_steps=2, save_steps=3, report_to="none", use_cpu=True, include_num_input_tokens_seen="all",
        disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[clock]).train()
    assert [s for s, *_ in clock.steps] == [1, 2, 3, 4, 5]
    assert {2, 3, 4} <= set(clock.paused) and 1 not in clock.paused  # evaluated after 2 and 4, saved after 3
    steady, after = clock.summary()
    assert after == 2 and steady > 0
