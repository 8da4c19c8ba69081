"""FLOPs of the GPT per token, counted from its settings (the one definition; budgets and MFU use it).

Counted: every matmul (2 FLOPs per multiply-add) of the executed blocks (q, k, v, output projection,
MLP up and down, the attention scores q.k and the weighted sum of v over the causal context) and the
output head. Not counted: norms, activations, softmax, RoPE, gates and other elementwise work. A
backward pass costs twice the forward, so training costs 3x the forward per token.

Causal attention over a window of T tokens gives position t a context of t + 1 tokens; the mean is
(T + 1) / 2. Document masking shortens contexts further; that saving is ignored (an upper bound).
"""
from __future__ import annotations

from pgolf.model import GPTConfig, layer_order


def block_forward_flops(cfg: GPTConfig, context: float) -> float:
    """One block, one token, attending over `context` tokens."""
    d = cfg.model_dim
    kv = cfg.num_kv_heads * (d // cfg.num_heads)
    hidden = int(round(cfg.mlp_mult * d))
    projections = 2 * (d * d + 2 * d * kv + d * d)
    attention = 2 * 2 * d * context  # q.k over the context for every head, then the sum of v
    mlp = 2 * 2 * d * hidden
    return projections + attention + mlp


def forward_flops_per_token(cfg: GPTConfig, seq_len: int, looping: bool = True) -> float:
    """Forward FLOPs per token with windows of seq_len tokens (the loop on when `looping`)."""
    blocks = len(layer_order(cfg, looping))
    return blocks * block_forward_flops(cfg, (seq_len + 1) / 2) + 2 * cfg.model_dim * cfg.vocab_size


def train_flops_per_token(cfg: GPTConfig, seq_len: int, loop_from: float = 0.0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), averaged over a run whose depth
    recurrence is on for the fraction 1 - loop_from of its steps (loop_from = ENABLE_LOOPING_AT)."""
    if not cfg.num_loops:
        return 3 * forward_flops_per_token(cfg, seq_len, looping=False)
    flat, looped = (forward_flops_per_token(cfg, seq_len, looping) for looping in (False, True))
    return 3 * (loop_from * flat + (1 - loop_from) * looped)
