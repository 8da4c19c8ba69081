"""LQER: a low-rank correction of the quantization error of the worst-quantized matrices.

For a quantized matrix W ~ Q(W), the error E = W - Q(W) is approximated by a rank-r product A @ B
from a truncated SVD (A = U_r [rows, r], B = S_r V_r^T [r, cols]; the singular values go with B
so that A's columns are all of unit norm and quantize alike). Both factors are stored in a few
bits and the dequantizer adds A @ B back: W_hat = Q(W) + A_hat @ B_hat. Only the top-K matrices
by ||E||_F get one (the record: rank 4 on the top 3).

Factor codes:
- sym: every row of A and of B on a symmetric int`bits` grid (levels +-(2^(bits-1)-1)), fp16 scale
  per row; this is quant.quantize_rows, the RTN quantizer, at fewer bits.
- asym (the record's asymmetric split): A on a 2-bit grid {-2, -1, 0, 1} with one scale for the
  whole factor (scale = max|A| / 1.5), B on the full signed int`bits` range [-2^(bits-1),
  2^(bits-1)-1] in groups of `group` consecutive entries of the flattened B, scale = max|g| /
  (2^(bits-1) - 0.5) per group. Needs B.numel() % group == 0, else the tensor uses sym (recorded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.quant import dequantize_rows, max_level, quantize_rows

ASYM_A_LEVELS = (-2, 1)  # a 2-bit signed grid


@dataclass
class LQERSettings:
    lqer_enabled: bool = False  # add a low-rank correction of W - Q(W) to the worst-quantized matrices
    lqer_rank: int = 4  # r of the correction A @ B (record: 4)
    lqer_top_k: int = 3  # how many matrices get one, largest ||W - Q(W)||_F first (record: 3)
    lqer_factor_bits: int = 4  # bits of the factors (asym: of B; A is then 2-bit) (record: 4)
    lqer_asym_enabled: bool = False  # asym codes: 2-bit A, B grouped on the full signed range (record: 1)
    lqer_asym_group: int = 64  # asym: entries of B per scale (record: 64)

    def validate(self) -> None:
        if self.lqer_enabled and (self.lqer_rank < 1 or self.lqer_top_k < 1 or self.lqer_asym_group < 1):
            raise ValueError("LQER_RANK, LQER_TOP_K and LQER_ASYM_GROUP must be >= 1")
        if self.lqer_enabled:
            max_level(self.lqer_factor_bits)  # 2..8 bits


def low_rank_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rows, r], B [r, cols]) with A @ B the best rank-r approximation of error."""
    U, S, Vh = torch.linalg.svd(error.float(), full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r].contiguous(), (S[:r, None] * Vh[:r]).contiguous()


def _asym_levels(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _quantize_grouped(x: torch.Tensor, lo: int, hi: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of `group` consecutive entries, each with a fp16 scale max|g| / (hi + 0.5)."""
    g = x.reshape(-1, group).float()
    scale = (g.abs().amax(dim=1) / (hi + 0.5)).clamp_min(2.0**-24).to(torch.float16)
    q = torch.clamp(torch.round(g / scale.float()[:, None]), lo, hi).to(torch.int8)
    return q.reshape(x.shape), scale


def pack_factors(A: torch.Tensor, B: torch.Tensor, bits: int, asym: bool, group: int) -> dict:
    """Stored fields of a correction: lqer_mode, lqer_a, lqer_a_scale, lqer_b, lqer_b_scale."""
    if asym and B.numel() % group == 0:
        lo, hi = ASYM_A_LEVELS
        a_scale = (A.abs().amax() / (hi + 0.5)).clamp_min(2.0**-24).to(torch.float16).reshape(1)
        qa = torch.clamp(torch.round(A / a_scale.float()), lo, hi).to(torch.int8)
        qb, b_scale = _quantize_grouped(B, *_asym_levels(bits), group)
        return {"lqer_mode": "asym", "lqer_a": qa, "lqer_a_scale": a_scale, "lqer_b": qb, "lqer_b_scale": b_scale}
    qa, a_scale = quantize_rows(A, max_level(bits))
    qb, b_scale = quantize_rows(B, max_level(bits))
    return {"lqer_mode": "sym", "lqer_a": qa, "lqer_a_scale": a_scale, "lqer_b": qb, "lqer_b_scale": b_scale}


def correction(e: dict) -> torch.Tensor:
    """A_hat @ B_hat of a stored correction (the fields pack_factors wrote)."""
    if e["lqer_mode"] == "sym":
        A = dequantize_rows(e["lqer_a"], e["lqer_a_scale"])
        B = dequantize_rows(e["lqer_b"], e["lqer_b_scale"])
    elif e["lqer_mode"] == "asym":
        A = e["lqer_a"].float() * e["lqer_a_scale"].float()
        qb = e["lqer_b"]
        group = qb.numel() // e["lqer_b_scale"].numel()
        B = (qb.reshape(-1, group).float() * e["lqer_b_scale"].float()[:, None]).reshape(qb.shape)
    else:
        raise ValueError(f"unknown LQER mode {e['lqer_mode']!r}; the artifact is from a newer pgolf")
    return A @ B


def top_k_by_error(errors: dict[str, float], k: int) -> list[str]:
    """The k names with the largest quantization error (ties broken by name, so runs agree)."""
    return [n for n, _ in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def correct(weight: torch.Tensor, dequantized: torch.Tensor, s: LQERSettings) -> dict:
    """The stored correction of one matrix, given its float weight and its dequantized Q(W)."""
    A, B = low_rank_factors(weight.float() - dequantized, s.lqer_rank)
    return pack_factors(A, B, s.lqer_factor_bits, s.lqer_asym_enabled, s.lqer_asym_group)
