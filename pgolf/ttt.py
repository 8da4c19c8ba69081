"""Score-first test-time training (TTT): per-document LoRA adapted chunk by chunk, and phased global SGD.

Protocol (the 1.0611 record's phased TTT, PRs #1610/#1626/#1736, legal by construction):
- Documents start at BOS; document i owns the targets after its BOS up to and including the next
  document's BOS (the last one: to the end of the stream), so the N-1 targets are each scored once.
- A document's targets are cut into chunks of C (TTT_CHUNK_SIZE) on a grid from its BOS. Chunk c is
  read through a window of up to L (TTT_EVAL_SEQ_LEN) tokens of its own document that ends at the
  chunk's grid end (c+1)*C: placing it back from the document's real end instead would let the next
  BOS decide how much context the last targets get (`pgolf audit` catches that).
- Each chunk is scored first: its losses and bytes go into the totals. Then, unless it is the
  document's last chunk, one optimizer step on that chunk's loss moves the document's adapters.
  The score comes from the forward the step then differentiates, so it is exactly what was added.
- Adapters are fresh for every batch of documents and independent per row (ttt_lora.py).
- Phases: the first P docs (PHASED_TTT_PREFIX_DOCS), in stream order, end at K boundaries
  P*(k+1)/K. When every rank has scored all documents before a boundary, the base model takes SGD
  steps on the stream up to that boundary (all of it already scored), then scoring goes on. The
  boundaries depend on P and K only, never on how many documents the stream has.
- Distributed: the batches of each phase segment are dealt to ranks; the totals are fp64 sums.

Between two boundaries the documents are batched by length (fewer idle rows): a document's score
does not depend on its batch (each row has its own adapters and optimizer state, elementwise).
The record differs in two ways: it orders all documents by length, so its phases train on the
shortest documents of the whole stream rather than its prefix, and it keeps LoRA A across documents
(TTT_WARM_START_A); pgolf resets both A and B per document.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.eval import EvalResult
from pgolf.ttt_lora import DocumentAdapters, RowOptimizer


@dataclass
class TTTSettings:
    """Test-time training at evaluation (env names and defaults: the 1.0611 record's train_gpt.py)."""
    ttt_enabled: bool = False  # run TTT after the round trip (the record's code defaults to 1; pgolf opts in)
    ttt_lora_rank: int = 96  # LoRA rank r on Q/K/V/O/MLP and the head (the record's run: 80)
    ttt_lora_alpha: float = 144.0  # LoRA output scale alpha / r (PR #1767)
    ttt_lora_lr: float = 1e-4  # adapter learning rate
    ttt_chunk_size: int = 48  # targets scored, then trained on, per step
    ttt_eval_seq_len: int = 2048  # context window of a chunk (and rows of the global SGD)
    ttt_batch_size: int = 64  # documents adapted together (per rank)
    ttt_optimizer: str = "adam"  # adam (AdamW) | sgd
    ttt_beta1: float = 0.0  # Adam beta1 / SGD momentum
    ttt_beta2: float = 0.999  # Adam beta2 (the record's run: 0.99)
    ttt_weight_decay: float = 1.0  # decoupled weight decay of the adapters (the record's run: 0.5)
    ttt_k_lora: bool = True  # LoRA on K
    ttt_mlp_lora: bool = True  # LoRA on the MLP output
    ttt_o_lora: bool = True  # LoRA on the attention output
    phased_ttt_prefix_docs: int = 2000  # documents before the last phase boundary (the record's run: 2500)
    phased_ttt_num_phases: int = 1  # global SGD phases over that prefix (the record's run: 3)
    global_ttt_lr: float = 1e-3  # peak LR of the phase SGD (cosine to 0 over its chunks)
    global_ttt_momentum: float = 0.9  # phase SGD momentum
    global_ttt_epochs: int = 1  # passes over each chunk
    global_ttt_chunk_tokens: int = 32768  # tokens per cosine step group; the last chunk has LR 0 and is skipped
    global_ttt_batch_seqs: int = 32  # rows per phase SGD step (all ranks together)
    global_ttt_grad_clip: float = 1.0  # phase SGD gradient norm clip; 0 disables
    eval_max_seconds: float = 600.0  # the evaluation cap; a TTT run estimated past it does not start (0: no check)

    def validate(self) -> None:
        errors = []
        for name in ("ttt_lora_rank", "ttt_chunk_size", "ttt_eval_seq_len", "ttt_batch_size",
                     "global_ttt_chunk_tokens", "global_ttt_batch_seqs"):
            if getattr(self, name) < 1:
                errors.append(f"{name.upper()}={getattr(self, name)} must be >= 1")
        if self.ttt_chunk_size > self.ttt_eval_seq_len:
            errors.append(f"TTT_CHUNK_SIZE={self.ttt_chunk_size} must be at most TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len}")
        if self.ttt_optimizer not in ("adam", "sgd"):
            errors.append(f"TTT_OPTIMIZER={self.ttt_optimizer!r}; allowed: adam, sgd")
        if min(self.phased_ttt_prefix_docs, self.phased_ttt_num_phases, self.global_ttt_epochs) < 0:
            errors.append("PHASED_TTT_PREFIX_DOCS, PHASED_TTT_NUM_PHASES and GLOBAL_TTT_EPOCHS must be >= 0")
        if errors:
            raise ValueError("; ".join(errors))

    def boundaries(self) -> list[int]:
        """Document counts after which the base model is updated (none without a prefix or phases)."""
        p, k = self.phased_ttt_prefix_docs, self.phased_ttt_num_phases
        return sorted({p * (i + 1) // k for i in range(k)} - {0}) if p and k else []

    def describe(self) -> str:
        return (f"lora_rank:{self.ttt_lora_rank} chunk:{self.ttt_chunk_size} ctx:{self.ttt_eval_seq_len} "
                f"batch:{self.ttt_batch_size} phases:{len(self.boundaries())} prefix_docs:{self.phased_ttt_prefix_docs} ")


def find_documents(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """[n, 3] (start, targets, previous start) per document. A document starts at a BOS (or at token 0) and
    owns that BOS as a target (predicted from the previous document, -1: none) and the `targets` after it,
    up to the next BOS."""
    starts = np.flatnonzero(tokens == bos_id)
    if not starts.size or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], len(tokens))
    prev = np.concatenate([[-1], starts[:-1]])
    return np.stack([starts, ends - starts - 1, prev], axis=1).astype(np.int64)


def segments(num_docs: int, boundaries: list[int]) -> list[tuple[int, int, bool]]:
    """(first, end, update after) document ranges between phase boundaries."""
    cuts = [b for b in boundaries if b < num_docs]
    edges = [0, *cuts, num_docs]
    return [(a, b, b in cuts) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class Totals:
    """The fp64 sums of a run: nats, targets, bytes, token forwards."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, nll: torch.Tensor, nbytes: torch.Tensor, forwards: int) -> None:
        self.sums[0] += nll.double().sum()
        self.sums[1] += nll.numel()
        self.sums[2] += nbytes.double().sum().to(self.sums.device)
        self.sums[3] += forwards

    def result(self, seconds: float) -> EvalResult:
        nats, n, nbytes, forwards = self.sums.tolist()
        return EvalResult(val_loss=nats / n, val_bpb=nats / (math.log(2) * nbytes), targets=int(n), bytes=int(nbytes),
                          token_forwards=int(forwards), seconds=seconds)


@dataclass
class Context:
    """What every batch of a run shares."""
    s: TTTSettings
    tokens: torch.Tensor  # int64 stream on the device
    tables: object  # ByteTables on the device, or None with a sidecar
    sidecar: np.ndarray | None
    autocast: object  # a context manager factory
    observer: object | None
    totals: Totals


class Rows:
    """Which document each of the B rows holds (-1: none) and its next chunk; documents enter rows in stream
    order as rows free up, so the row and the step a document gets depend only on the documents before it."""

    def __init__(self, docs: np.ndarray, batch: int, C: int):
        self.docs, self.queue = docs, 0
        self.doc = np.full(batch, -1, dtype=np.int64)
        self.chunk = np.zeros(batch, dtype=np.int64)
        self.chunks = -(-docs[:, 1] // C)  # a document with no targets past its BOS has none

    def fill(self) -> np.ndarray:
        """Give free rows the next documents that have chunks; returns the rows that were given one."""
        fresh = []
        for b in np.flatnonzero(self.doc < 0):
            while self.queue < len(self.docs) and self.chunks[self.queue] == 0:
                self.queue += 1
            if self.queue == len(self.docs):
                break
            self.doc[b], self.chunk[b] = self.queue, 0
            self.queue += 1
            fresh.append(b)
        return np.asarray(fresh, dtype=np.int64)

    def advance(self) -> None:
        busy = self.doc >= 0
        self.chunk[busy] += 1
        done = busy & (self.chunk >= self.chunks[np.maximum(self.doc, 0)])
        self.doc[done] = -1


def adapt_documents(model, docs: np.ndarray, ctx: Context) -> None:
    """Score and adapt `docs` (find_documents rows, in stream order), chunk by chunk, up to B documents at a
    time; a forward runs only the rows that hold a document, its windows padded at the end to the widest.
    A document's scores can differ in the last bits with the number of rows in flight (a GEMM's rounding
    depends on its shape), which Adam's first, sign-like steps can amplify: `pgolf audit --mode ttt` states
    its tolerance."""
    s, tokens, device = ctx.s, ctx.tokens, ctx.tokens.device
    B, C, L = s.ttt_batch_size, s.ttt_chunk_size, s.ttt_eval_seq_len
    score_openings(model, docs, ctx)
    adapters = DocumentAdapters(model, B, s.ttt_lora_rank, s.ttt_lora_alpha, k_lora=s.ttt_k_lora,
                                o_lora=s.ttt_o_lora, mlp_lora=s.ttt_mlp_lora)
    opt = RowOptimizer(adapters.parameters(), B, s.ttt_optimizer, s.ttt_lora_lr, s.ttt_beta1, s.ttt_beta2,
                       s.ttt_weight_decay)
    rows = Rows(docs, B, C)
    while True:
        fresh = torch.from_numpy(rows.fill()).to(device)
        adapters.reset(fresh)
        opt.reset(fresh)
        live = np.flatnonzero(rows.doc >= 0)  # only rows holding a document run
        if not live.size:
            return
        adapters.select(torch.from_numpy(live).to(device))
        doc, chunk = rows.doc[live], rows.chunk[live]
        start, targets = docs[doc, 0], docs[doc, 1]
        end = start + (chunk + 1) * C  # the chunk's grid end: its window ends there
        first = np.maximum(start, end - L)
        scored = np.minimum(C, targets - chunk * C)
        width = int((end - first).max())  # shorter windows are padded at the end
        pos = first[:, None] + np.arange(width + 1)  # inputs pos[:, :-1], targets pos[:, 1:]
        valid = pos[:, :-1] < (start + targets)[:, None]
        ids = tokens[torch.from_numpy(np.minimum(pos, len(tokens) - 1))]
        x = torch.where(torch.from_numpy(valid).to(device), ids[:, :-1], 0)
        cols = (end - first)[:, None] - C + np.arange(C)  # the chunk sits at its window's end
        at = torch.from_numpy(cols).to(device)
        with torch.enable_grad(), ctx.autocast():
            h = model.hidden(x, adapters).gather(1, at[..., None].expand(-1, -1, model.cfg.model_dim))
            logits = model.logits(h, adapters).float()  # [n, C, V]
        y = ids[:, 1:].gather(1, at)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(len(live), C)
        _score(ctx, logits, nll, np.take_along_axis(pos[:, 1:], cols, 1), np.arange(len(live)), scored, C)
        train = chunk < rows.chunks[doc] - 1  # a document's last chunk teaches nothing it will use
        if train.any():
            for p in adapters.parameters():
                p.grad = None
            (nll.mean(dim=1) * torch.from_numpy(train).to(device)).sum().backward()
            step = np.zeros(B, dtype=bool)
            step[live[train]] = True
            opt.step(torch.from_numpy(step).to(device))
            if ctx.observer is not None:
                ctx.observer.updated(np.concatenate([np.arange(first[i], end[i] + 1) for i in np.flatnonzero(train)]))
        ctx.totals.sums[3] += len(live) * width
        rows.advance()


@torch.no_grad()
def score_openings(model, docs: np.ndarray, ctx: Context) -> None:
    """Score each document's BOS with the base model (no adapters), from up to TTT_EVAL_SEQ_LEN tokens of the
    previous document, B documents per forward. Done before any of them adapts, so no update ever
    reads an unscored BOS."""
    B, L, tokens = ctx.s.ttt_batch_size, ctx.s.ttt_eval_seq_len, ctx.tokens
    docs = docs[docs[:, 2] >= 0]
    for i in range(0, len(docs), B):
        part = docs[i:i + B]
        n = len(part)
        first = np.zeros(B, dtype=np.int64)
        first[:n] = np.maximum(part[:, 2], part[:, 0] - L)
        stop = first + 1
        stop[:n] = part[:, 0]  # inputs first .. start-1, padded at the end; idle rows are all padding
        width = int((stop - first).max())
        pos = first[:, None] + np.arange(width)
        valid = torch.from_numpy((pos < stop[:, None]) & (np.arange(B) < n)[:, None]).to(tokens.device)
        x = torch.where(valid, tokens[torch.from_numpy(np.clip(pos, 0, len(tokens) - 1))], 0)
        with ctx.autocast():
            h = model.hidden(x)
        h = h[torch.arange(B), torch.from_numpy(np.maximum(stop - first - 1, 0))]
        logits = model.logits(h).float()[:n]  # [n, V]
        y = tokens[torch.from_numpy(part[:, 0])]
        nll = F.cross_entropy(logits, y, reduction="none")
        _score(ctx, logits[:, None], nll[:, None], part[:, :1], np.arange(n), np.ones(n, dtype=np.int64), 1)
        ctx.totals.sums[3] += B * width


def _score(ctx: Context, logits, nll, tpos, rows, scored, C) -> None:
    """Add the scored targets of one step to the totals (and report them): tpos [rows, C] are the stream
    positions of the C columns; row b's first scored[b] of them count."""
    keep = np.concatenate([b * C + np.arange(scored[b]) for b in rows]) if len(rows) else np.zeros(0, np.int64)
    tpos = tpos.reshape(-1)[keep]
    idx = torch.from_numpy(keep).to(nll.device)
    loss = nll.detach().reshape(-1).index_select(0, idx)
    if ctx.sidecar is not None:
        nbytes = torch.from_numpy(ctx.sidecar[tpos].astype(np.int64))
    else:
        t = torch.from_numpy(tpos).to(nll.device)
        nbytes = ctx.tables.count(ctx.tokens[t - 1], ctx.tokens[t])
    if ctx.observer is not None:
        flat = logits.detach().reshape(-1, logits.size(-1)).index_select(0, idx)
        ctx.observer.scored(tpos, loss, nbytes,
                            lambda r, z=flat: F.log_softmax(z[torch.as_tensor(r, device=z.device)], dim=-1))
    ctx.totals.add(loss, nbytes, 0)


def global_sgd(model, prefix: torch.Tensor, s: TTTSettings, d, autocast) -> int:
    """SGD on the base model over an already-scored stream prefix: chunks of GLOBAL_TTT_CHUNK_TOKENS, each cut
    into rows of TTT_EVAL_SEQ_LEN, cosine LR from GLOBAL_TTT_LR to 0 at the last chunk (which is therefore
    skipped), gradients averaged over ranks, norm clipped. Returns the optimizer steps taken."""
    L, chunk = s.ttt_eval_seq_len, s.global_ttt_chunk_tokens
    total = len(prefix) - 1
    n_chunks = -(-total // chunk)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=s.global_ttt_lr, momentum=s.global_ttt_momentum)
    steps = 0
    for ci in range(n_chunks - 1):
        lr = s.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / (n_chunks - 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        lo = ci * chunk
        rows = (min(lo + chunk, total) - lo) // L
        batch = s.global_ttt_batch_seqs
        for _ in range(s.global_ttt_epochs):
            for g0 in range(0, rows, batch):  # every rank takes every step, with its share of the rows
                n = min(batch, rows - g0)
                r0, r1 = g0 + n * d.rank // d.world_size, g0 + n * (d.rank + 1) // d.world_size
                opt.zero_grad(set_to_none=True)
                if r1 > r0:
                    seq = prefix[lo + r0 * L: lo + r1 * L + 1]
                    with torch.enable_grad(), autocast():
                        loss = model(seq[:-1].view(-1, L), seq[1:].view(-1, L))
                    (loss * ((r1 - r0) / n)).backward()  # summed over ranks: the mean over all n rows
                if d.enabled:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        d.all_reduce(p.grad)
                if s.global_ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.global_ttt_grad_clip)
                opt.step()
                steps += 1
    for p in params:
        p.requires_grad_(False)
    return steps


def evaluate_ttt(model, tokens: np.ndarray, tables, *, settings: TTTSettings, d, sidecar: np.ndarray | None = None,
                 autocast_dtype: torch.dtype | None = None, observer=None, log=None) -> EvalResult:
    """Phased score-first TTT over `tokens`, starting from (a copy of) `model`; the caller's model is not
    changed. observer (pgolf.eval.EvalObserver) hears every scored chunk before the update it feeds."""
    t0 = time.perf_counter()
    s = settings
    device = next(model.parameters()).device
    base = copy.deepcopy(model).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    stream = torch.from_numpy(tokens.astype(np.int64)).to(device)
    docs = find_documents(tokens, model.cfg.bos_id)
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    ctx = Context(s, stream, None if tables is None else tables.to(device), sidecar, amp, observer, Totals(device))
    parts = segments(len(docs), s.boundaries())
    phases, done = sum(update for *_, update in parts), 0
    for a, b, update in parts:
        adapt_documents(base, docs[a + d.rank:b:d.world_size], ctx)  # documents dealt to ranks in turn
        if update:
            d.barrier()  # every rank has scored its share of the documents before the boundary
            end = int(docs[b, 0])  # document b's BOS, the first token not yet scored
            steps = global_sgd(base, stream[:end], s, d, amp)
            if observer is not None:
                observer.updated(np.arange(end))
            done += 1
            if log is not None:
                log(f"ttt_phase:{done}/{phases} docs:{b} "
                    f"prefix_tokens:{end} sgd_steps:{steps} t:{time.perf_counter() - t0:.1f}s")
    d.all_reduce(ctx.totals.sums)
    return ctx.totals.result(time.perf_counter() - t0)
