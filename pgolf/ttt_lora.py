"""Per-document low-rank adapters for test-time training, batched: row b of every tensor belongs to
document b of the batch, so one forward adapts a batch of documents independently.

GPT.hidden asks `slot(k)` for each executed block slot (a repeated layer gets one slot per pass) and
adds its q/k/v/o/mlp deltas; GPT.logits adds `head(h)`. Each delta is (x A_b^T) B_b^T * alpha / rank.
B starts at zero, so a fresh set changes nothing; A starts from one fixed draw shared by every row,
so a document's result does not depend on which row of which batch it was given.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from pgolf.model import GPT, layer_order


class BatchedLoRA(nn.Module):
    def __init__(self, batch: int, a0: torch.Tensor, out_features: int, scale: float):
        super().__init__()
        self.A = nn.Parameter(a0.expand(batch, *a0.shape).clone())  # [B, r, in]
        self.B = nn.Parameter(torch.zeros(batch, out_features, a0.size(0), device=a0.device))  # [B, out, r]
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, in] -> [B, T, out]
        return (x @ self.A.transpose(1, 2).to(x.dtype)) @ self.B.transpose(1, 2).to(x.dtype) * self.scale


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


def make_optimizer(params, optimizer: str, lr: float, beta1: float, beta2: float, weight_decay: float):
    """TTT_OPTIMIZER adam (AdamW, eps 1e-10, as the record) or sgd (momentum TTT_BETA1). Both act per
    element, so each document's adapters move only with that document's gradient."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=beta1, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=1e-10, weight_decay=weight_decay)
