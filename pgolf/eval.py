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
from typing import Callable, Protocol

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


class EvalObserver(Protocol):
    """What an evaluation reports, when given an observer, so that `pgolf audit` can test it.

    scored(positions, nll, nbytes, log_probs): called when targets are added to the totals, with their
    stream positions (target j is tokens[j], 1 <= j < N; int64 numpy), their losses in nats and their
    bytes ([n] tensors), and log_probs(rows) -> [len(rows), V]: the full-vocabulary log-probabilities
    those losses were taken from, for the rows asked for (computed on demand, so observers can sample).
    updated(positions): called when an adaptive evaluation changes its predictor, with the stream
    positions of every token (inputs and targets) the change was computed from.
    """

    def scored(self, positions: np.ndarray, nll: torch.Tensor, nbytes: torch.Tensor,
               log_probs: Callable[[np.ndarray], torch.Tensor]) -> None: ...

    def updated(self, positions: np.ndarray) -> None: ...


@dataclass
class EvalResult:
    val_loss: float  # nats per target token
    val_bpb: float
    targets: int
    bytes: int
    token_forwards: int  # tokens pushed through the model (relative cost vs N)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.targets / max(self.seconds, 1e-9)

    @property
    def forwards_per_token(self) -> float:
        """Token-forwards relative to the stream length N (= targets + 1): ~seq_len/stride."""
        return self.token_forwards / (self.targets + 1)


def window_plan(num_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, n_scored) of every window over a stream of num_tokens (num_tokens-1 targets).

    Window k reads inputs tokens[start:end] and scores its last n_scored targets, i.e. target
    positions (end - n_scored, end]. The scored ranges tile 1..num_tokens-1 exactly once, and every
    window has min(seq_len, num_tokens-1) inputs: the last one ends at the stream's end and scores
    only what is left (fewer than stride targets when num_tokens-1 is off the stride grid).
    """
    targets = num_tokens - 1
    if targets < 1 or not 0 < stride <= seq_len:
        raise ValueError(f"need >= 2 tokens and 0 < stride <= seq_len (got {num_tokens} tokens, "
                         f"stride {stride}, seq_len {seq_len})")
    first = min(seq_len, targets)
    ends = np.append(np.arange(first, targets, stride, dtype=np.int64), targets)
    starts = ends - first
    n_scored = np.diff(ends, prepend=0)
    return starts, ends, n_scored


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, tables: ByteTables | None, *, seq_len: int, stride: int,
             batch_seqs: int, rank: int = 0, world_size: int = 1, all_reduce=None,
             byte_counts: np.ndarray | None = None, autocast_dtype: torch.dtype | None = None,
             hidden_fn=None, progress: bool = False, pad_batches: bool | None = None,
             observer: EvalObserver | None = None) -> EvalResult:
    """Score every target of `tokens` once; windows are split contiguously across ranks.

    model must provide hidden(x) -> [B, T, D] and logits(h) -> fp32 logits; the head and the loss
    run only on the scored positions. byte_counts, when given, is the per-token byte sidecar
    (aligned with tokens) and replaces the tables. pad_batches (default: on CUDA) pads a short last
    batch with windows that score nothing, so a compiled forward sees one shape and never recompiles.
    observer, when given, is told every target as it is added to the totals (see EvalObserver).
    """
    t0 = time.perf_counter()
    if batch_seqs < 1:
        raise ValueError(f"batch_seqs={batch_seqs} must be >= 1")
    device = next(model.parameters()).device
    hidden_fn = hidden_fn or model.hidden
    starts, ends, n_scored = window_plan(len(tokens), seq_len, stride)
    lo, hi = len(ends) * rank // world_size, len(ends) * (rank + 1) // world_size
    width = int(ends[0] - starts[0])
    offsets = np.arange(width + 1)
    cols = np.arange(width)
    tables = tables.to(device) if tables is not None else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, bytes, token_forwards
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    pad = device.type == "cuda" if pad_batches is None else pad_batches
    batches = range(lo, hi, batch_seqs)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", unit="batch", leave=False)
    for b0 in batches:
        sel = np.arange(b0, min(b0 + batch_seqs, hi))
        n = n_scored[sel]
        if pad and len(sel) < batch_seqs:
            sel = np.pad(sel, (0, batch_seqs - len(sel)), mode="edge")
            n = np.pad(n, (0, batch_seqs - len(n)))
        pos = starts[sel, None] + offsets  # token positions: inputs pos[:, :-1], targets pos[:, 1:]
        keep = np.flatnonzero(cols[None, :] >= width - n[:, None])  # flat indices of scored positions
        win = torch.from_numpy(tokens[pos].astype(np.int64)).to(device, non_blocking=True)
        idx = torch.from_numpy(keep).to(device, non_blocking=True)
        x, y = win[:, :-1], win[:, 1:].reshape(-1)[idx]
        with amp:
            h = hidden_fn(x)
        h = h.reshape(-1, h.size(-1)).index_select(0, idx)
        logits = model.logits(h).float()
        nll = F.cross_entropy(logits, y, reduction="none")
        if byte_counts is not None:
            nbytes = torch.from_numpy(byte_counts[pos[:, 1:].reshape(-1)[keep]].astype(np.int64))
        else:
            nbytes = tables.count(x.reshape(-1)[idx], y)  # prev = the true previous token
        if observer is not None:
            observer.scored(pos[:, 1:].reshape(-1)[keep], nll, nbytes,
                            lambda rows, z=logits: F.log_softmax(z[torch.as_tensor(rows, device=z.device)], dim=-1))
        sums[0] += nll.double().sum()
        sums[1] += len(keep)
        sums[2] += nbytes.double().sum().to(device)
        sums[3] += x.numel()
    if all_reduce is not None:
        all_reduce(sums)
    model.train(was_training)
    nats, ntargets, nbytes, forwards = sums.tolist()
    return EvalResult(val_loss=nats / ntargets, val_bpb=nats / (math.log(2) * nbytes), targets=int(ntargets),
                      bytes=int(nbytes), token_forwards=int(forwards), seconds=time.perf_counter() - t0)


def load_validation(data_path: str, tokenizer_path: str, vocab_size: int, max_tokens: int, log):
    """The val split's tokens, the tokenizer's byte tables and the byte sidecar (None without one)."""
    from pgolf.data import load_byte_sidecar, load_tokens, val_pattern
    from pgolf.sidecar import check_sidecar

    sp = load_sentencepiece(tokenizer_path)
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"{tokenizer_path}: tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE="
                         f"{vocab_size}; set VOCAB_SIZE to at least the tokenizer's size")
    if vocab_size > sp.vocab_size():  # allowed on purpose (a padded table can be faster), but never silently
        log(f"vocab_padding:{vocab_size - sp.vocab_size()} VOCAB_SIZE={vocab_size} tokenizer_pieces:{sp.vocab_size()} "
            "(the rows above the tokenizer's ids are never an input or a target, yet they are trained, stored and "
            f"counted in the artifact; set VOCAB_SIZE={sp.vocab_size()} to drop them)")
    tables = byte_tables(sp, vocab_size)
    tokens = load_tokens(val_pattern(data_path), vocab_size)
    sidecar = load_byte_sidecar(data_path, len(tokens))
    check_sidecar(data_path, sp, tokenizer_path, tokens, sidecar)  # on the whole split, before any cut
    if max_tokens > 0:
        tokens, sidecar = tokens[:max_tokens], None if sidecar is None else sidecar[:max_tokens]
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={tokenizer_path}"
        + (" byte_sidecar:enabled" if sidecar is not None else ""))
    log(f"val_loader:shards pattern={val_pattern(data_path)} tokens:{len(tokens)}")
    return tokens, tables, sidecar


# Settings that extend a model's context past its training length (YaRN will be ROPE_YARN); while one is
# on, scoring windows longer than TRAIN_SEQ_LEN is expected, so beyond_context() does not warn.
CONTEXT_EXTENSIONS = ("rope_yarn",)


def beyond_context(train_seq_len: int, eval_seq_len: int, extended: bool) -> str | None:
    """A warning line when windows of eval_seq_len tokens go past the training context without an extension."""
    if eval_seq_len <= train_seq_len or extended:
        return None
    return (f"warning: scoring {eval_seq_len}-token windows, {eval_seq_len / train_seq_len:g}x the training context "
            f"of {train_seq_len} (TRAIN_SEQ_LEN); without a context extension such as ROPE_YARN the model has never "
            f"seen positions past {train_seq_len}, so expect a worse score than at {train_seq_len}")


class Evaluator:
    """The run's two evaluations over one val stream: standard (the challenge's non-overlapping
    seq_len blocks, partial last block dropped) and sliding window (eval_seq_len windows, stride)."""

    def __init__(self, d, tokens: np.ndarray, tables: ByteTables, sidecar: np.ndarray | None,
                 autocast_dtype: torch.dtype | None, *, seq_len: int, batch_tokens: int, eval_seq_len: int,
                 stride: int, batch_seqs: int, progress: bool = False, ttt_fn=None):
        self.d, self.tables, self.autocast_dtype = d, tables, autocast_dtype
        self.ttt_fn = ttt_fn  # pgolf.ttt.evaluate_ttt with its settings bound (the entry point binds them)
        self.seq_len = seq_len
        usable = (len(tokens) - 1) // seq_len * seq_len + 1  # the challenge drops the partial block
        if usable < seq_len + 1:
            raise ValueError(f"validation split has {len(tokens)} tokens, fewer than TRAIN_SEQ_LEN+1={seq_len + 1}")
        self.tokens, self.sidecar = tokens, sidecar
        self.std_tokens = tokens[:usable]
        self.std_sidecar = None if sidecar is None else sidecar[:usable]
        self.std_batch = max(1, batch_tokens // (8 * seq_len))  # the reference's per-rank batch of 8 micro-steps
        self.eval_seq_len = eval_seq_len or seq_len
        self.stride, self.sliding_batch, self.progress = stride, batch_seqs, progress

    @classmethod
    def for_run(cls, cfg, d, tokens, tables, sidecar, autocast_dtype, *, progress: bool, ttt_fn=None) -> "Evaluator":
        """The evaluator a run's settings ask for (TRAIN/EVAL_SEQ_LEN, VAL_BATCH_SIZE, EVAL_STRIDE, ...)."""
        return cls(d, tokens, tables, sidecar, autocast_dtype, seq_len=cfg.train_seq_len,
                   batch_tokens=cfg.val_batch_size, eval_seq_len=cfg.eval_seq_len, stride=cfg.eval_stride,
                   batch_seqs=cfg.eval_batch_seqs, progress=progress, ttt_fn=ttt_fn)

    def stream(self, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The tokens (and byte sidecar) an evaluation mode scores: only standard drops the partial block."""
        return (self.std_tokens, self.std_sidecar) if mode == "standard" else (self.tokens, self.sidecar)

    def _run(self, model, tokens, sidecar, seq_len, stride, batch, hidden_fn, observer):
        return evaluate(model, tokens, self.tables, seq_len=seq_len, stride=stride, batch_seqs=batch,
                        rank=self.d.rank, world_size=self.d.world_size, all_reduce=self.d.all_reduce,
                        byte_counts=sidecar, autocast_dtype=self.autocast_dtype, hidden_fn=hidden_fn,
                        progress=self.progress, observer=observer)

    # Every mode takes tokens= (a same-length replacement for its stream, e.g. the audit's perturbed
    # copies) and observer= (an EvalObserver); `pgolf audit --mode NAME` calls the method NAME.
    def standard(self, model, hidden_fn=None, *, tokens=None, observer=None) -> EvalResult:
        tokens = self.std_tokens if tokens is None else tokens
        return self._run(model, tokens, self.std_sidecar, self.seq_len, self.seq_len, self.std_batch, hidden_fn,
                         observer)

    def sliding(self, model, hidden_fn=None, *, tokens=None, observer=None) -> EvalResult:
        tokens = self.tokens if tokens is None else tokens
        return self._run(model, tokens, self.sidecar, self.eval_seq_len, self.stride, self.sliding_batch, hidden_fn,
                         observer)

    def ttt(self, model, hidden_fn=None, *, tokens=None, observer=None, log=None) -> EvalResult:
        """Score-first test-time training over the full stream (pgolf.ttt). hidden_fn is not used: TTT runs
        the model's adapter-aware forward."""
        if self.ttt_fn is None:
            raise ValueError("this evaluation was set up without TTT settings")
        tokens = self.tokens if tokens is None else tokens
        return self.ttt_fn(model, tokens, self.tables, d=self.d, sidecar=self.sidecar,
                           autocast_dtype=self.autocast_dtype, observer=observer, log=log)


def log_eval(log, name: str, r: EvalResult, extra: str = "") -> None:
    """The challenge's pair of eval lines (4 and 8 decimals) plus the metrics record."""
    log(f"{name} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} {extra}eval_time:{1000 * r.seconds:.0f}ms")
    log(f"{name}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    log.metric(name, val_loss=r.val_loss, val_bpb=r.val_bpb, eval_time_ms=1000 * r.seconds, targets=r.targets,
               bytes=r.bytes, token_forwards=r.token_forwards)
