"""The memory budget planner: fastest plan that fits, or a refusal naming the smallest budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edge_runtime.budget import MB, BudgetError, candidate_options, plan_memory
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import inject_comigs


def small_model() -> torch.nn.Module:
    """Big enough (8k vocab, 4 layers) that a step's memory is well above page-level noise."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return inject_comigs(LlamaForCausalLM(cfg), CoMiGSConfig(1, 1))


def test_options_go_from_fastest_to_most_frugal():
    options = candidate_options(8)
    assert options[0].micro_batch_size == 8 and not options[0].activation_checkpointing
    assert options[-1].micro_batch_size == 1 and options[-1].activation_checkpointing
    assert all(8 % o.micro_batch_size == 0 for o in options)


def test_a_generous_budget_gets_the_fastest_plan():
    model = small_model()
    plan = plan_memory(model, budget_mb=10_000, batch_size=8, seq_len=32, resident_bytes=100 * MB)
    assert plan.option == candidate_options(8)[0] and plan.accumulation == 1
    assert plan.peak_bytes <= 10_000 * MB


def test_tighter_budgets_trade_speed_for_memory_and_impossible_ones_name_the_minimum():
    model = small_model()
    fast = plan_memory(model, budget_mb=10_000, batch_size=16, seq_len=128, resident_bytes=0)
    with pytest.raises(BudgetError, match=r"needs about (\d+) MB") as err:
        plan_memory(model, budget_mb=0.01, batch_size=16, seq_len=128, resident_bytes=0)
    minimum = int(err.value.args[0].split("needs about ")[1].split(" MB")[0])
    frugal = plan_memory(model, budget_mb=minimum * 1.3,  # probes are re-measured: allow their noise
                          batch_size=16, seq_len=128, resident_bytes=0)
    assert frugal.peak_bytes < fast.peak_bytes
    assert frugal.option.micro_batch_size < fast.option.micro_batch_size or frugal.option.activation_checkpointing
    assert f"--budget-mb {minimum}" in err.value.args[0]


# Runs in a fresh process so peak RSS (VmHWM) covers only this model's training.
_MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from edge_runtime.budget import plan_memory, MB
    from edge_runtime.memory import current_rss_bytes
    from edge_runtime.data.tokens import TokenSplit
    from edge_runtime.model.config import CoMiGSConfig
    from edge_runtime.model.inject import inject_comigs
    from edge_runtime.training.trainer import LocalTrainer, TrainerConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = inject_comigs(LlamaForCausalLM(cfg), CoMiGSConfig(1, 1))
    budget_over_resident = float(sys.argv[1])
    resident = current_rss_bytes()
    plan = plan_memory(model, resident / MB + budget_over_resident, batch_size=16, seq_len=128)
    Path("/proc/self/clear_refs").write_text("5")
    config = TrainerConfig(batch_size=16, micro_batch_size=plan.option.micro_batch_size, seq_len=128,
                           loss_chunk_tokens=plan.option.loss_chunk_tokens,
                           activation_checkpointing=plan.option.activation_checkpointing, release_memory=True)
    rng = np.random.default_rng(0)
    train, valid = TokenSplit(rng.integers(0, 8192, 50000)), TokenSplit(rng.integers(0, 8192, 5000))
    trainer = LocalTrainer(model, config, train, valid)
    trainer.train(3)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM")][0]
    print(json.dumps({"budget": plan.budget_bytes, "peak": peak, "plan": plan.option.describe()}))
""")


@pytest.mark.parametrize("headroom_mb", [300, 130])
def test_the_chosen_plan_keeps_measured_peak_rss_under_the_budget(headroom_mb):
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(headroom_mb)], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["peak"] <= result["budget"], result
