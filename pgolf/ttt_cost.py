"""What a TTT evaluation costs: FLOPs from the model's settings and the documents, a measured rate on
random tokens (the EVAL_MAX_SECONDS check before a run), and the 8xH100 estimate `pgolf budget` prints.

Counted like pgolf/flops.py: a chunk step forwards a row per document in flight, as wide as its widest
window (up to TTT_EVAL_SEQ_LEN; padding included) through the blocks, the head only at the chunks' C
positions, and costs 3x that when a row trains; the documents' BOS scores are no-grad forwards; a phase forwards and
backwards every row of its prefix but the last chunk's. The adapters' own matmuls are left out (rank
r << width).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from pgolf.flops import block_forward_flops
from pgolf.model import GPTConfig, layer_order
from pgolf.ttt import Rows, TTTSettings, find_documents, segments

H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM
ASSUMED_UTILIZATION = 0.25  # of that peak, for TTT's small per-chunk matmuls (see docs/eval.md)
# The challenge's validation split (its export manifest): documents and tokens.
CHALLENGE_VAL_DOCS, CHALLENGE_VAL_TOKENS = 50_000, 62_021_846


def window_flops(cfg: GPTConfig, width: int, head_rows: int) -> float:
    """One forward of a `width`-token window with the head at `head_rows` positions."""
    blocks = len(layer_order(cfg, looping=True))
    return width * blocks * block_forward_flops(cfg, (width + 1) / 2) + head_rows * 2 * cfg.model_dim * cfg.vocab_size


def rank_flops(cfg: GPTConfig, s: TTTSettings, docs: np.ndarray) -> float:
    """adapt_documents over `docs`: its BOS forwards and its chunk steps (3x when any row trains), one row per
    document in flight, as wide as the widest window."""
    B, L, C = s.ttt_batch_size, s.ttt_eval_seq_len, s.ttt_chunk_size
    opened = docs[docs[:, 2] >= 0]
    reach = np.minimum(L, opened[:, 0] - opened[:, 2])
    total = sum(B * window_flops(cfg, int(reach[i:i + B].max()), 1) for i in range(0, len(opened), B))
    rows = Rows(docs, B, C)
    while True:
        rows.fill()
        busy = rows.doc >= 0
        if not busy.any():
            return total
        trains = (busy & (rows.chunk < rows.chunks[np.maximum(rows.doc, 0)] - 1)).any()
        width = int(np.minimum(L, (rows.chunk[busy] + 1) * C).max())
        total += (3 if trains else 1) * int(busy.sum()) * window_flops(cfg, width, C)
        rows.advance()


def ttt_flops(cfg: GPTConfig, s: TTTSettings, docs: np.ndarray, world_size: int = 1) -> tuple[float, float]:
    """(chunk FLOPs, phase FLOPs) of evaluate_ttt over documents `docs` (find_documents rows), all ranks."""
    chunk_total, phase_total = 0.0, 0.0
    L, per_chunk = s.ttt_eval_seq_len, s.global_ttt_chunk_tokens
    for a, b, update in segments(len(docs), s.boundaries()):
        chunk_total += sum(rank_flops(cfg, s, docs[a + r:b:world_size]) for r in range(world_size))
        if update:
            total = int(docs[b, 0]) - 1
            n_chunks = -(-total // per_chunk)
            rows = sum((min((ci + 1) * per_chunk, total) - ci * per_chunk) // L for ci in range(n_chunks - 1))
            phase_total += 3 * rows * s.global_ttt_epochs * window_flops(cfg, L, L)
    return chunk_total, phase_total


def challenge_docs(num_docs: int = CHALLENGE_VAL_DOCS, num_tokens: int = CHALLENGE_VAL_TOKENS) -> np.ndarray:
    """find_documents rows for a stream of equal-length documents (the budget's assumption)."""
    each = num_tokens // num_docs
    starts = np.arange(num_docs, dtype=np.int64) * each
    return np.stack([starts, np.full(num_docs, each - 1), starts - each], axis=1)


def ttt_budget_line(cfg, gpus: int = 8, utilization: float = ASSUMED_UTILIZATION) -> str:
    """`pgolf budget`'s line: TTT seconds on `gpus` H100s for the challenge's validation split, from the
    settings of a run (cfg: Hyperparameters)."""
    s = cfg.part(TTTSettings)
    chunk, phase = ttt_flops(cfg.part(GPTConfig), s, challenge_docs(), gpus)
    seconds = (chunk + phase) / (gpus * H100_BF16_FLOPS * utilization)
    return (f"ttt_estimate: {seconds:.0f}s on {gpus}xH100 at {utilization:.0%} of the bf16 peak "
            f"({(chunk + phase) / 1e15:.1f} PFLOP: chunks {chunk / 1e15:.1f}, phases {phase / 1e15:.1f}; "
            f"{CHALLENGE_VAL_DOCS:,} equal-length documents, {CHALLENGE_VAL_TOKENS:,} tokens; "
            f"cap EVAL_MAX_SECONDS={s.eval_max_seconds:g}s; TTT_ENABLED={int(s.ttt_enabled)})")


def measured_rate(model, s: TTTSettings, autocast_dtype, repeats: int = 2) -> float:
    """FLOP/s of one chunk step (forward, backward, adapter step) on random tokens: no validation token is
    read before the run it guards."""
    from pgolf.ttt_lora import DocumentAdapters, RowOptimizer

    device = next(model.parameters()).device
    B, L, C = s.ttt_batch_size, s.ttt_eval_seq_len, s.ttt_chunk_size
    x = torch.randint(0, model.cfg.vocab_size, (B, L + 1), generator=torch.Generator().manual_seed(0)).to(device)
    adapters = DocumentAdapters(model, B, s.ttt_lora_rank, s.ttt_lora_alpha, k_lora=s.ttt_k_lora,
                                o_lora=s.ttt_o_lora, mlp_lora=s.ttt_mlp_lora)
    opt = RowOptimizer(adapters.parameters(), B, s.ttt_optimizer, s.ttt_lora_lr, s.ttt_beta1, s.ttt_beta2,
                       s.ttt_weight_decay)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    seconds = []
    for _ in range(repeats):  # the first one warms up
        t0 = time.perf_counter()
        with torch.enable_grad(), amp:
            logits = model.logits(model.hidden(x[:, :-1], adapters)[:, -C:], adapters).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, -C:].reshape(-1))
        loss.backward()
        opt.step(torch.ones(B, dtype=torch.bool, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)
    return 3 * B * window_flops(model.cfg, L, C) / max(seconds[-1], 1e-9)


def check_cap(model, s: TTTSettings, tokens: np.ndarray, d, autocast_dtype, log) -> float:
    """Estimate this run's TTT seconds from its FLOPs at the measured rate; raise before it starts when the
    estimate is past EVAL_MAX_SECONDS (0 turns the check off). Returns the estimate."""
    chunk, phase = ttt_flops(model.cfg, s, find_documents(tokens, model.cfg.bos_id), d.world_size)
    rate = torch.tensor([measured_rate(model, s, autocast_dtype)], dtype=torch.float64, device=d.device)
    rate = -d.all_reduce(-rate, op="max")  # the slowest rank decides: all_reduce max of the negated rates
    estimate = (chunk + phase) / d.world_size / float(rate)
    log(f"ttt_estimate: {estimate:.0f}s ({(chunk + phase) / 1e12:.1f} TFLOP over {d.world_size} rank(s) at a "
        f"measured {float(rate) / 1e9:.1f} GFLOP/s per rank) cap:{s.eval_max_seconds:g}s")
    if s.eval_max_seconds > 0 and estimate > s.eval_max_seconds:
        raise ValueError(f"TTT is estimated at {estimate:.0f}s, past EVAL_MAX_SECONDS={s.eval_max_seconds:g}; lower "
                         "TTT_EVAL_SEQ_LEN or PHASED_TTT_PREFIX_DOCS, raise TTT_CHUNK_SIZE, or set EVAL_MAX_SECONDS=0 "
                         "to run anyway")
    return estimate


def run_with_cap(evaluator, model, s: TTTSettings, log):
    """The cap check, then the TTT evaluation, with the challenge-style lines (`final_ttt[_exact]`, seconds)."""
    from pgolf.eval import log_eval

    estimate = check_cap(model, s, evaluator.tokens, evaluator.d, evaluator.autocast_dtype, log)
    r = evaluator.ttt(model, log=log)
    log_eval(log, "final_ttt", r, s.describe())
    log(f"ttt_time:{r.seconds:.1f}s estimate:{estimate:.0f}s targets:{r.targets} bytes:{r.bytes}")
    return r
