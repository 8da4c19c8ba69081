"""Softcapped cross-entropy of the output head: the plain form, and a chunked form that never holds
the full [tokens, vocab] fp32 logits (at vocab 8192 and 98k tokens per GPU those are 3 GiB).

Both compute mean_t CE(c * tanh(h_t W^T / c), y_t). The chunked form is a custom autograd function:
forward keeps only the per-token log-sum-exp; backward recomputes each chunk's logits and returns
dL/dh and dL/dW directly (the record's fused Triton kernel, PR #1787, does the same on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CE_CHUNK_TOKENS = 4096  # rows of logits alive at once in the chunked form


def softcap_logits(raw: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(raw.float() / cap)


def plain_softcap_ce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    return F.cross_entropy(softcap_logits(F.linear(h, w.to(h.dtype)), cap), targets)


class _ChunkedSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, cap: float, chunk: int):
        lse = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        picked = torch.empty_like(lse)
        for s in range(0, h.size(0), chunk):
            z = softcap_logits(F.linear(h[s:s + chunk], w), cap)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            picked[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.cap, ctx.chunk = cap, chunk
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse = ctx.saved_tensors
        cap, chunk, n = ctx.cap, ctx.chunk, h.size(0)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for s in range(0, n, chunk):
            hc = h[s:s + chunk]
            t = torch.tanh(F.linear(hc, w).float() / cap)
            probs = torch.exp(cap * t - lse[s:s + chunk, None])  # softmax of the capped logits
            probs[torch.arange(hc.size(0), device=h.device), targets[s:s + chunk]] -= 1.0
            d_raw = probs * (grad / n) * (1.0 - t * t)  # through the mean and the tanh cap
            grad_h[s:s + chunk] = (d_raw.to(h.dtype) @ w).to(h.dtype)
            grad_w += d_raw.T @ hc.float()
        return grad_h, grad_w.to(w.dtype), None, None, None


def chunked_softcap_ce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, cap: float,
                       chunk: int = CE_CHUNK_TOKENS) -> torch.Tensor:
    """Same value and gradients as plain_softcap_ce; matmuls in h's dtype (the autocast dtype)."""
    return _ChunkedSoftcapCE.apply(h, w.to(h.dtype), targets, cap, chunk)
