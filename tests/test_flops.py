"""FLOPs per token: the closed count against hand arithmetic and against matmuls actually run."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pgolf.flops import block_forward_flops, forward_flops_per_token, train_flops_per_token
from pgolf.model import GPT, GPTConfig


def test_baseline_block_by_hand():
    cfg = GPTConfig()  # 512 wide, 8/4 heads (kv width 256), MLP 1024
    assert block_forward_flops(cfg, context=100.0) == 2 * (512 * 512 * 2 + 2 * 512 * 256) + 4 * 512 * 100 + 4 * 512 * 1024
    per_token = forward_flops_per_token(cfg, seq_len=1024)
    assert per_token == 9 * block_forward_flops(cfg, 512.5) + 2 * 512 * 1024


def test_recurrence_counts_repeated_blocks_and_averages_over_the_run():
    cfg = GPTConfig(num_layers=11, num_loops=2, loop_start=3, loop_end=5)
    flat, looped = forward_flops_per_token(cfg, 2048, False), forward_flops_per_token(cfg, 2048, True)
    head = 2 * 512 * 1024
    assert (looped - head) / (flat - head) == pytest.approx(17 / 11)
    assert train_flops_per_token(cfg, 2048, loop_from=0.35) == pytest.approx(3 * (0.35 * flat + 0.65 * looped))


def test_matches_the_matmuls_torch_runs():
    """PyTorch's FLOP counter on a real forward agrees with the closed count of the projection, MLP and
    head matmuls (on CPU it does not see inside SDPA, so the attention term is compared by hand above)."""
    cfg = GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
                    num_loops=1, loop_start=1, loop_end=1)
    model = GPT(cfg)
    model.set_looping(True)
    T = 16
    x = torch.randint(0, 64, (2, T))
    with FlopCounterMode(display=False) as counter:
        model.logits(model.hidden(x))
    blocks = 4  # layer order 0, 1, 1, 2
    attention = blocks * 2 * 2 * 32 * (T + 1) / 2
    assert counter.get_total_flops() / (2 * T) == forward_flops_per_token(cfg, T) - attention
