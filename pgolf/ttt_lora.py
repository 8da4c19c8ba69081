"""Per-document low-rank adapters for test-time training, batched: row b of every tensor belongs to the
document in row b, so one forward adapts a batch of documents independently, and a row is reset
(with its optimizer state) when a new document takes it.

GPT.hidden asks `slot(k)` for each executed block slot (a repeated layer gets one slot per pass) and
adds its q/k/v/o/mlp deltas; GPT.logits adds `head(h)`. Each delta is (x A_b^T) B_b^T * alpha / rank.
B starts at zero, so a fresh row changes nothing; A starts from one fixed draw shared by every row.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from pgolf.model import GPT, layer_order


class BatchedLoRA(nn.Module):
    def __init__(self, batch: int, a0: torch.Tensor, out_features: int, scale: float):
        super().__init__()
        self.register_buffer("A0", a0, persistent=False)
        self.A = nn.Parameter(a0.expand(batch, *a0.shape).clone())  # [B, r, in]
        self.B = nn.Parameter(torch.zeros(batch, out_features, a0.size(0), device=a0.device))  # [B, out, r]
        self.scale = scale
        self.rows: torch.Tensor | None = None  # the rows in this forward (None: all)

    def reset(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.A[rows] = self.A0
            self.B[rows] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, T, in] -> [n, T, out], rows self.rows of A, B
        a, b = (self.A, self.B) if self.rows is None else (self.A[self.rows], self.B[self.rows])
        return (x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype) * self.scale


def _zero(x: torch.Tensor) -> float:
    return 0.0


class SlotAdapters(nn.Module):
    """The deltas of one block slot; a projection without LoRA (TTT_K_LORA=0, ...) adds 0."""

    def __init__(self, make, dim: int, kv_dim: int, k: bool, o: bool, mlp: bool):
        super().__init__()
        self.q, self.v = make(dim, dim), make(dim, kv_dim)
        self.k = make(dim, kv_dim) if k else _zero
        self.o = make(dim, dim) if o else _zero
        self.mlp = make(dim, dim) if mlp else _zero


class DocumentAdapters(nn.Module):
    """One adapter set per document of a batch, for every executed slot of `model` and its head."""

    def __init__(self, model: GPT, batch: int, rank: int, alpha: float, *, k_lora: bool = True,
                 o_lora: bool = True, mlp_lora: bool = True, seed: int = 0):
        super().__init__()
        cfg = model.cfg
        device = model.tok_emb.weight.device
        dim, kv_dim = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)  # every adapter reads a [*, dim] activation
        scale = alpha / rank

        def make(in_features: int, out_features: int) -> BatchedLoRA:
            a0 = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
            return BatchedLoRA(batch, a0.to(device), out_features, scale)

        slots = len(layer_order(cfg, model.looping))
        self.slots = nn.ModuleList(SlotAdapters(make, dim, kv_dim, k_lora, o_lora, mlp_lora) for _ in range(slots))
        self.head = make(dim, cfg.vocab_size)

    def slot(self, k: int) -> SlotAdapters:
        return self.slots[k]

    def select(self, rows: torch.Tensor | None) -> None:
        """The rows the next forwards run (in this order); None: all B."""
        for m in self.modules():
            if isinstance(m, BatchedLoRA):
                m.rows = rows

    def reset(self, rows: torch.Tensor) -> None:
        for m in self.modules():
            if isinstance(m, BatchedLoRA):
                m.reset(rows)


class RowOptimizer:
    """AdamW (TTT_OPTIMIZER=adam: eps 1e-10, decoupled decay, torch's update) or SGD with momentum TTT_BETA1
    and decay, applied per row: each row has its own step count and moments, only the rows asked to step
    move, and reset(rows) starts rows afresh. Each document's adapters thus move only with its own gradient
    and its own schedule, whoever shares its batch."""

    def __init__(self, params, batch: int, optimizer: str, lr: float, beta1: float, beta2: float, weight_decay: float):
        self.params = [p for p in params]
        self.adam, self.lr, self.b1, self.b2, self.wd = optimizer == "adam", lr, beta1, beta2, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if self.adam else None
        self.steps = torch.zeros(batch, dtype=torch.float64, device=self.params[0].device)

    def reset(self, rows: torch.Tensor) -> None:
        self.steps[rows] = 0
        for t in self.m + (self.v or []):
            t[rows] = 0.0

    @torch.no_grad()
    def step(self, rows: torch.Tensor) -> None:
        """One step for the rows given (a bool [B] mask); the other rows keep their weights and state."""
        self.steps += rows.double()
        keep = (~rows).float()
        for i, p in enumerate(self.params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            shape = (-1,) + (1,) * (p.dim() - 1)
            on, off = rows.float().view(shape), keep.view(shape)
            m = self.m[i]
            if self.adam:
                n = self.steps.clamp(min=1).view(shape)
                m.mul_(off + on * self.b1).add_(on * (1 - self.b1) * g)
                self.v[i].mul_(off + on * self.b2).add_(on * (1 - self.b2) * g * g)
                c1 = (1 - self.b1 ** n).float()
                c2 = (1 - self.b2 ** n).float().sqrt()
                p.mul_(1 - on * self.lr * self.wd)
                p.sub_(on * self.lr / c1 * m / (self.v[i].sqrt() / c2 + 1e-10))
            else:
                m.mul_(off + on * self.b1).add_(on * (g + self.wd * p))
                p.sub_(on * self.lr * m)
