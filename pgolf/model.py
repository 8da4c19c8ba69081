"""The challenge's reference GPT, with the record options (MLP multiplier, QAT linears, SmearGate).

Tied embedding, parameter-free RMSNorm, GQA attention with RMSNorm on q and k, RoPE (rotate-half),
a learned per-head q gain, relu^2 MLP, resid_mix with the embedding x0, attention/MLP output
scales, U-Net skip connections, zero-initialised output projections, logit softcap. Weights are
fp32 masters; under autocast the matrix products run in bf16.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.quant import fake_quantize

BOS_ID = 1


@dataclass
class GPTConfig:
    """The model's settings: the one definition of each (Hyperparameters inherits them; artifacts store them)."""
    vocab_size: int = 1024  # embedding rows; at least the tokenizer's piece count
    num_layers: int = 9  # transformer blocks (first half encoder, second half decoder of the U-Net skips)
    model_dim: int = 512  # residual width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (GQA)
    mlp_mult: float = 2.0  # MLP hidden = round(mlp_mult * model_dim)
    tie_embeddings: bool = True  # the output head is the input embedding
    rope_base: float = 10000.0  # RoPE frequency base
    logit_softcap: float = 30.0  # logits = c * tanh(raw / c)
    qk_gain_init: float = 1.5  # initial learned per-head query gain
    tied_embed_init_std: float = 0.005  # init std of the (tied) embedding
    smear_gate: bool = False  # blend each embedding with the previous token's (never across BOS)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise ValueError, naming the settings, for a shape that cannot be built."""
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} must divide by NUM_HEADS={self.num_heads}, "
                             f"which must divide by NUM_KV_HEADS={self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.model_dim // self.num_heads} (MODEL_DIM / NUM_HEADS) must be even for RoPE")


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
        self.register_buffer("qat_gate", torch.zeros(()), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat and self.training:
            w = w + self.qat_gate * (fake_quantize(w) - w).detach()
        return F.linear(x, w.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos()[None, None], freqs.sin()[None, None])
        return self._cache[2], self._cache[3]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim, self.num_heads, self.num_kv_heads = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(self.head_dim, cfg.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float):
        super().__init__()
        hidden = int(round(mult * dim))
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(dim, cfg.mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class SmearGate(nn.Module):
    """out_t = x_t + a * (x_{t-1} * [id_t != BOS] - x_t), a = lam * sigmoid(gate) per dimension.

    dim + 1 parameters, both zero-initialised, so it is the identity at init. Where the current
    token is BOS the previous-token term is zero: nothing crosses a document boundary.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.smear_gate = nn.Parameter(torch.zeros(dim))
        self.smear_lambda = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        a = (self.smear_lambda * torch.sigmoid(self.smear_gate)).to(x.dtype)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        prev = prev * (input_ids != BOS_ID).unsqueeze(-1).to(x.dtype)
        return x + a * (prev - x)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate else None
        self.num_encoder_layers = cfg.num_layers // 2
        num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, num_decoder_layers), cfg.model_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]."""
        x = self.tok_emb(input_ids)
        if self.smear is not None:
            x = self.smear(x, input_ids)
        x = x0 = rms_norm(x)
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:
                j = i - self.num_encoder_layers
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder_layers:
                skips.append(x)
        return rms_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raw = F.linear(h, self.tok_emb.weight.to(h.dtype)) if self.lm_head is None else self.lm_head(h)
        c = self.cfg.logit_softcap
        return c * torch.tanh(raw.float() / c)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        logits = self.logits(self.hidden(input_ids))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def mark_qat(model: GPT, names: set[str]) -> None:
    """Give QAT to exactly the linears whose weights are in `names` (call before compiling).

    A name that is not a CastedLinear weight is an error: the export would quantize a tensor that
    training never saw quantized, the train/export mismatch that QAT exists to remove."""
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    foreign = sorted(set(names) - linears.keys())
    if foreign:
        raise ValueError(f"QAT can only fake CastedLinear weights, not {foreign}; keep these out of the int6 "
                         f"export (e.g. list them in FP16_PASSTHROUGH_PATTERNS) or make them CastedLinear")
    for name, mod in linears.items():
        mod.qat = name in names


def set_qat_gate(model: GPT, on: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, CastedLinear) and mod.qat:
            mod.qat_gate.fill_(1.0 if on else 0.0)
