"""val_loss and val_bpb: the one byte accounting and the one windowed evaluator.

bpb = total nats / (ln 2 * total bytes). A target token t after previous token p is worth
base_bytes[t] + (has_leading_space[t] and not is_boundary[p]) bytes (control/unknown/unused
tokens are 0-byte boundaries, byte-fallback tokens 1 byte), unless a per-token byte sidecar
gives the counts. Windows of eval_seq_len tokens score each of the N-1 targets exactly once:
the first window all of its targets, every later one only the targets after the previous
window's end (at most `stride`), so each target sees at least seq_len - stride tokens of
context. stride == seq_len is the challenge's standard non-overlapping evaluation.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ByteTables:
    base_bytes: torch.Tensor  # int32 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor  # bool [V]

    def to(self, device) -> "ByteTables":
        return ByteTables(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))

    def count(self, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bytes of each target given the token before it."""
        lead = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target] + lead.to(torch.int32)


def load_sentencepiece(path: str):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot load SentencePiece model ({e}); check TOKENIZER_PATH") from None


def byte_tables(sp, vocab_size: int) -> ByteTables:
    """Byte tables of a SentencePiece model, sized max(model vocab, vocab_size)."""
    n = max(sp.vocab_size(), vocab_size)
    base = np.zeros(n, dtype=np.int32)
    lead = np.zeros(n, dtype=bool)
    boundary = np.ones(n, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(lead), torch.from_numpy(boundary))


@dataclass
class EvalResult:
    val_loss: float  # nats per target token
    val_bpb: float
    targets: int
    bytes: int
    token_forwards: int  # tokens pushed through the model (relative cost vs N)
    seconds: float


def window_plan(num_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, n_scored) of every window over a stream of num_tokens (num_tokens-1 targets).

    Window k reads inputs tokens[start:end] and scores its last n_scored targets, i.e. target
    positions (end - n_scored, end]. The scored ranges tile 1..num_tokens-1 exactly once.
    """
    targets = num_tokens - 1
    if targets < 1 or not 0 < stride <= seq_len:
        raise ValueError(f"need >= 2 tokens and 0 < stride <= seq_len (got {num_tokens}, {stride}, {seq_len})")
    first = min(seq_len, targets)
    rest = np.arange(first + stride, targets + stride, stride, dtype=np.int64)
    ends = np.concatenate([[first], np.minimum(rest, targets)]).astype(np.int64)
    ends = np.unique(ends)
    starts = np.maximum(ends - seq_len, 0)  # every window is seq_len long unless the stream is shorter
    n_scored = np.diff(ends, prepend=0)
    return starts, ends, n_scored


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, tables: ByteTables | None, *, seq_len: int, stride: int,
             batch_seqs: int, rank: int = 0, world_size: int = 1, all_reduce=None,
             byte_counts: np.ndarray | None = None, autocast_dtype: torch.dtype | None = None,
             hidden_fn=None, progress: bool = False) -> EvalResult:
    """Score every target of `tokens` once; windows are split contiguously across ranks.

    model must provide hidden(x) -> [B, T, D] and logits(h) -> fp32 logits. byte_counts, when
    given, is the per-token byte sidecar (aligned with tokens) and replaces the tables.
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    hidden_fn = hidden_fn or model.hidden
    starts, ends, n_scored = window_plan(len(tokens), seq_len, stride)
    lo, hi = len(ends) * rank // world_size, len(ends) * (rank + 1) // world_size
    stream = torch.from_numpy(tokens.astype(np.int64))
    counts = None if byte_counts is None else torch.from_numpy(byte_counts.astype(np.int64))
    if tables is not None:
        tables = tables.to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, bytes, token_forwards
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    batches = list(range(lo, hi, batch_seqs))
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", unit="batch", leave=False)
    for b0 in batches:
        idx = range(b0, min(b0 + batch_seqs, hi))
        x = torch.stack([stream[starts[i]:ends[i]] for i in idx]).to(device)
        y = torch.stack([stream[starts[i] + 1:ends[i] + 1] for i in idx]).to(device)
        n = torch.tensor([int(n_scored[i]) for i in idx], device=device)
        m = int(n.max())
        keep = torch.arange(m, device=device)[None, :] >= (m - n)[:, None]  # last n_i of the m tail positions
        with amp:
            h = hidden_fn(x)[:, -m:]
        logits = model.logits(h).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, -m:].reshape(-1), reduction="none")
        nll = nll.view_as(keep)
        if counts is not None:
            tgt_pos = torch.stack([torch.arange(int(ends[i]) - m + 1, int(ends[i]) + 1) for i in idx]).to(device)
            nbytes = counts.to(device)[tgt_pos.clamp(min=0)]
        else:
            nbytes = tables.count(x[:, -m:], y[:, -m:])
        sums[0] += nll.double()[keep].sum()
        sums[1] += keep.sum()
        sums[2] += nbytes.double()[keep].sum()
        sums[3] += x.numel()
    if all_reduce is not None:
        all_reduce(sums)
    model.train(was_training)
    nats, ntargets, nbytes, forwards = sums.tolist()
    loss = nats / ntargets
    return EvalResult(val_loss=loss, val_bpb=nats / (math.log(2) * nbytes), targets=int(ntargets),
                      bytes=int(nbytes), token_forwards=int(forwards), seconds=time.perf_counter() - t0)
