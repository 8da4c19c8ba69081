"""The model's small parts: linears, norm, rotary embedding, attention cores, output transforms,
MLP activation and the embedding-level token mixers. model.py assembles them from plain values.

Each optional technique is a part chosen once at construction, so forward code never branches on a
setting: e.g. an attention's value-exclusion step is `exclude_own_value` (XSA) or `keep`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.quant import fake_quantize


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on, else unchanged: the residual stream then runs in bf16
    like the reference's (it casts the model to bf16 and keeps only control tensors fp32), instead of
    being promoted to fp32 by the fp32 master embedding it starts from."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # no autocast on "meta"
    return x.to(torch.get_autocast_dtype(device)) if on else x


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear with fp32 weights cast to the input dtype; optional STE fake-int6 (QAT).

    `qat` is fixed before compiling; the runtime switch is the `qat_gate` buffer (0 or 1), which
    torch.compile reads as data, so flipping it mid-run takes effect in compiled graphs too.
    """

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat = False
        self.qat_grid = (31, 0.0)  # (max level, SD-clip sigmas) of the export this weight will get
        self.register_buffer("qat_gate", torch.zeros(()), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat and self.training:
            w = w + self.qat_gate * (fake_quantize(w, *self.qat_grid) - w).detach()
        return F.linear(x, w.to(x.dtype))


# ---- rotary position embedding ---------------------------------------------------------------------

class Rotary(nn.Module):
    """RoPE on the first `dims` of each head's dimensions (partial RoPE, PR #315; all when dims = head
    dim); the rest pass through unrotated. With `yarn_from` > 0, a sequence longer than that (the
    training length) gets YaRN's base rescaling, base' = base * (T / yarn_from)^(d / (d - 2)), so
    evaluation at a longer context keeps the trained frequencies' range.

    cos/sin are computed per call from the fixed T: cheap, no cache to invalidate, one graph per T."""

    def __init__(self, head_dim: int, base: float, dims: int = 0, yarn_from: int = 0):
        super().__init__()
        self.dims = dims or head_dim
        self.base, self.yarn_from = base, yarn_from

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base
        if self.yarn_from and seq_len > self.yarn_from:
            base = base * (seq_len / self.yarn_from) ** (self.dims / (self.dims - 2))
        inv_freq = base ** (-torch.arange(0, self.dims, 2, device=device, dtype=torch.float32) / self.dims)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, None], freqs.sin()[None, None]  # (1, 1, T, dims/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first 2 * cos.size(-1) dims of x (B, H, T, D); the rest unchanged."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


# ---- attention cores: (q, k, v, segments) -> y, all (B, H, T, D) -----------------------------------

def document_segments(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Segment id per position (B, T): the number of BOS tokens up to and including it. Positions before
    a row's first BOS share segment 0 (the tail of a document that started in an earlier row)."""
    return torch.cumsum((input_ids == bos_id).to(torch.int32), dim=-1)


def no_documents(input_ids: torch.Tensor) -> None:
    return None


def causal_attention(q, k, v, segments=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


def document_attention(q, k, v, segments):
    """Causal attention that never crosses a document boundary: a block-diagonal causal mask."""
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    same_doc = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same_doc & causal, enable_gqa=q.size(1) != k.size(1))


def varlen_boundaries(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """cu_seqlens of the flattened (B*T) batch: every row start and every BOS, then B*T. Rows split documents
    as document_segments does."""
    starts = input_ids == bos_id
    starts[:, 0] = True
    return F.pad(torch.nonzero(starts.flatten()).flatten(), (0, 1), value=starts.numel()).to(torch.int32)


def varlen_attention(q, k, v, cu_seqlens, kernel):
    """document_attention through a variable-length kernel (flash_attn_varlen_func), which skips masked blocks."""
    B, H, T, D = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(B * T, t.size(1), D)  # noqa: E731
    y = kernel(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, T, T, causal=True)
    y = y[0] if isinstance(y, tuple) else y  # some FlashAttention 3 builds also return the log-sum-exp
    return y.view(B, T, H, D).transpose(1, 2)


# ---- attention output transforms ---------------------------------------------------------------------

def keep(y: torch.Tensor, *_) -> torch.Tensor:
    return y


def exclude_own_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (PR #478): remove from each head's output its component along the token's own value vector.
    y (B, H, T, D), v (B, Hkv, T, D); query head h reads kv head h // (H / Hkv), as GQA does."""
    B, H, T, D = y.shape
    group = H // v.size(1)
    vn = F.normalize(v, dim=-1).unsqueeze(2)  # (B, Hkv, 1, T, D)
    yg = y.view(B, v.size(1), group, T, D)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, H, T, D)


class SparseAttnGate(nn.Module):
    """Per-head sigmoid gate on the attention output from the first `window` channels of the block's
    normed input (PR #1787): y_h *= sigmoid(scale * w_h . x[:window]). w starts at 0 (gate 0.5)."""

    def __init__(self, num_heads: int, window: int, scale: float, init_std: float = 0.0):
        super().__init__()
        self.window, self.scale = window, scale
        self.w = nn.Parameter(torch.randn(num_heads, window) * init_std if init_std > 0 else torch.zeros(num_heads, window))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.scale * F.linear(x[..., :self.window], self.w.to(x.dtype)))  # (B, T, H)
        return y * g.transpose(1, 2).unsqueeze(-1)


def no_gate(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y


# ---- MLP activation ------------------------------------------------------------------------------------

class LeakyReLUSquared(nn.Module):
    """leaky_relu(x, s)^2 (PR #493); s = 0 is the baseline's relu^2 exactly."""

    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope).square()


# ---- token mixers on the embedding (BOS-safe: nothing crosses into a document's first token) ----------

class SmearGate(nn.Module):
    """Blend form (seed PR #170): out_t = x_t + a * (x_{t-1} * [id_t != BOS] - x_t), a = lam * sigmoid(gate)
    per dimension. Both parameters start at 0 (identity). Note the BOS row becomes (1 - a) * x_t."""

    def __init__(self, dim: int, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.smear_gate = nn.Parameter(torch.zeros(dim))
        self.smear_lambda = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        a = (self.smear_lambda * torch.sigmoid(self.smear_gate)).to(x.dtype)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * (input_ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        return x + a * (prev - x)


class SmearGateAdd(nn.Module):
    """Additive form (the 1.0611 record, PR #1667 + its BOS fix): out_t = x_t + g_t * x_{t-1} * [id_t != BOS],
    g_t = lam * sigmoid(w . x_t[:window]), one scalar per token. Identity at init; BOS rows untouched."""

    def __init__(self, window: int, bos_id: int):
        super().__init__()
        self.window, self.bos_id = window, bos_id
        self.smear_w = nn.Parameter(torch.zeros(1, window))
        self.smear_lambda = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        g = self.smear_lambda.to(x.dtype) * torch.sigmoid(F.linear(x[..., :self.window], self.smear_w.to(x.dtype)))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * (input_ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        return x + g * prev


def no_mixer(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return x
