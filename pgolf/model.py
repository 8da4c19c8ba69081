"""The GPT: the challenge's reference model, with the record techniques as parts chosen at construction.

Reference: tied embedding, parameter-free RMSNorm, GQA attention with RMSNorm on q and k, RoPE, a
learned per-head q gain, relu^2 MLP, resid_mix with the embedding x0, attention/MLP output scales,
U-Net skip connections, zero-initialised output projections, logit softcap. Options (GPTConfig):
LeakyReLU^2, XSA, partial RoPE + YaRN, LN scale, gated skips, parallel residual lanes, depth
recurrence, the sparse attention gate, two SmearGate forms, document-masked attention, chunked
softcapped CE, orthogonal init. Weights are fp32 masters; under autocast matmuls run in bf16.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.layers import (CastedLinear, LeakyReLUSquared, Rotary, SmearGate, SmearGateAdd, SparseAttnGate,
                          apply_rotary, causal_attention, document_attention, document_segments,
                          exclude_own_value, keep, no_documents, no_gate, no_mixer, rms_norm, to_autocast_dtype,
                          varlen_attention, varlen_boundaries)
from pgolf.loss import chunked_softcap_ce, plain_softcap_ce, softcap_logits


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
    qk_gain_init: float = 1.5  # initial learned per-head query gain (QK_GAIN_INIT, 5.0 in PR #1276)
    tied_embed_init_std: float = 0.005  # init std of the (tied) embedding
    smear_gate: bool = False  # SmearGate, blend form (seed PR #170): x + a*(x_prev - x), never across BOS
    smear_gate_enabled: bool = False  # SmearGate, additive form (the 1.0611 record): x + g*x_prev, never into BOS
    gate_window: int = 12  # input channels feeding the sparse attention gate and the additive SmearGate
    mlp_negative_slope: float = 0.0  # MLP activation leaky_relu(x, s)^2; 0 = relu^2 (PR #493 uses 0.5)
    xsa_last_n: int = 0  # exclusive self-attention on the last N layers (PR #478)
    rope_dims: int = 0  # rotate only the first R dims of each head (PR #315); 0 = all
    rope_yarn: bool = False  # YaRN base rescaling beyond ROPE_TRAIN_SEQ_LEN positions (longer eval context)
    rope_train_seq_len: int = 0  # YaRN's reference length; 0 = TRAIN_SEQ_LEN
    ln_scale: bool = False  # multiply each block's normed inputs by 1/sqrt(layer + 1) (PR #315)
    skip_gates_enabled: bool = False  # a learned sigmoid gate on each U-Net skip (PR #289)
    parallel_start_layer: int = 0  # decoder layers >= this run attention and MLP in two lanes (PR #1530); 0 = off
    parallel_final_lane: str = "mean"  # the lanes' output: mean | attn | mlp
    num_loops: int = 0  # depth recurrence: layers LOOP_START..LOOP_END run 1 + N times (PR #1344); 0 = off
    loop_start: int = 3  # first layer of the repeated segment
    loop_end: int = 5  # last layer of the repeated segment (inclusive)
    sparse_attn_gate_enabled: bool = False  # per-head output gate from GATE_WINDOW input channels (PR #1787)
    sparse_attn_gate_scale: float = 1.0  # gate = sigmoid(scale * w . x[:window])
    doc_mask: bool = False  # attention never crosses a BOS document boundary (block-diagonal causal)
    fused_ce_enabled: bool = False  # softcapped CE in chunks, never the full [tokens, vocab] fp32 logits
    ortho_init: bool = False  # orthogonal init of the q/k/v and MLP-up matrices (the record's init)
    bos_id: int = 1  # the tokenizer's BOS id (document starts)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise ValueError, naming the settings and the fix, for a model that cannot be built."""
        errors = []
        head_dim = self.model_dim // self.num_heads
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            errors.append(f"MODEL_DIM={self.model_dim} must divide by NUM_HEADS={self.num_heads}, which must "
                          f"divide by NUM_KV_HEADS={self.num_kv_heads}")
        rotated = self.rope_dims or head_dim
        if rotated % 2 or rotated > head_dim or self.rope_dims < 0:
            errors.append(f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {head_dim} "
                          "(MODEL_DIM / NUM_HEADS); 0 rotates all of them")
        if self.num_loops < 0 or self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            errors.append(f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must be a range of layers in "
                          f"0..{self.num_layers - 1} (NUM_LAYERS={self.num_layers}) when NUM_LOOPS={self.num_loops}")
        if self.parallel_start_layer and not 0 < self.parallel_start_layer < self.num_layers:
            errors.append(f"PARALLEL_START_LAYER={self.parallel_start_layer} must be in 1..{self.num_layers - 1}; 0 = off")
        if self.parallel_start_layer and self.num_loops and self.parallel_start_layer <= self.loop_end:
            errors.append(f"PARALLEL_START_LAYER={self.parallel_start_layer} must be after LOOP_END={self.loop_end}: "
                          "the lanes cannot be re-entered by a repeated layer")
        if self.parallel_start_layer and self.parallel_start_layer < self.num_layers // 2:
            errors.append(f"PARALLEL_START_LAYER={self.parallel_start_layer} must be a decoder layer "
                          f"(>= NUM_LAYERS // 2 = {self.num_layers // 2})")
        if self.parallel_final_lane not in ("mean", "attn", "mlp"):
            errors.append(f"PARALLEL_FINAL_LANE={self.parallel_final_lane!r}; allowed: mean, attn, mlp")
        if (self.sparse_attn_gate_enabled or self.smear_gate_enabled) and not 0 < self.gate_window <= self.model_dim:
            errors.append(f"GATE_WINDOW={self.gate_window} must be in 1..MODEL_DIM={self.model_dim}")
        if self.smear_gate and self.smear_gate_enabled:
            errors.append("SMEAR_GATE (blend form) and SMEAR_GATE_ENABLED (additive form) are exclusive; pick one")
        if not 0 <= self.xsa_last_n <= self.num_layers:
            errors.append(f"XSA_LAST_N={self.xsa_last_n} must be in 0..NUM_LAYERS={self.num_layers}")
        if errors:
            raise ValueError("; ".join(errors))


def layer_order(cfg: GPTConfig, looping: bool) -> list[int]:
    """The blocks in execution order: with looping, LOOP_START..LOOP_END repeated 1 + NUM_LOOPS times
    (e.g. 11 layers, 3..5, 2 loops: 0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10). The first half of the order is
    the U-Net's encoder, the rest its decoder."""
    if not (looping and cfg.num_loops):
        return list(range(cfg.num_layers))
    segment = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + segment * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, cfg.num_layers))


def scaled_rms_norm(x: torch.Tensor, scale: float) -> torch.Tensor:
    return rms_norm(x) * scale


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        dim, self.num_heads, self.num_kv_heads = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(self.head_dim, cfg.rope_base, cfg.rope_dims,
                             cfg.rope_train_seq_len if cfg.rope_yarn else 0)
        self.core = document_attention if cfg.doc_mask else causal_attention
        self.exclude = exclude_own_value if layer >= cfg.num_layers - cfg.xsa_last_n else keep
        self.attn_gate = (SparseAttnGate(cfg.num_heads, cfg.gate_window, cfg.sparse_attn_gate_scale)
                          if cfg.sparse_attn_gate_enabled else no_gate)

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None, adapter=None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if adapter is not None:  # test-time training: low-rank deltas on the projections (see ttt.py)
            q, k, v = q + adapter.q(x), k + adapter.k(x), v + adapter.v(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = self.exclude(self.core(q, k, v, segments), v)
        y = self.attn_gate(y, x)
        out = self.proj(y.transpose(1, 2).reshape(B, T, D))
        return out if adapter is None else out + adapter.o(x)


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, negative_slope: float):
        super().__init__()
        self.fc = CastedLinear(dim, int(round(mult * dim)))
        self.act = LeakyReLUSquared(negative_slope)
        self.proj = CastedLinear(self.fc.out_features, dim, zero_init=True)

    def forward(self, x: torch.Tensor, adapter=None) -> torch.Tensor:
        out = self.proj(self.act(self.fc(x)))
        return out if adapter is None else out + adapter.mlp(x)


class Block(nn.Module):
    """Attention and MLP branches around a residual stream. The sequential form (forward) adds them in
    turn; ParallelLanes combines the same two branches in two lanes."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(dim, cfg.mlp_mult, cfg.mlp_negative_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm = partial(scaled_rms_norm, scale=1.0 / math.sqrt(layer + 1)) if cfg.ln_scale else rms_norm

    def mix(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def attn_branch(self, x: torch.Tensor, segments: torch.Tensor | None, adapter=None) -> torch.Tensor:
        return self.attn_scale.to(x.dtype) * self.attn(self.norm(x), segments, adapter)

    def mlp_branch(self, x: torch.Tensor, adapter=None) -> torch.Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x), adapter)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, segments: torch.Tensor | None, adapter=None) -> torch.Tensor:
        x = self.mix(x, x0)
        x = x + self.attn_branch(x, segments, adapter)
        return x + self.mlp_branch(x, adapter)


class ParallelLanes(nn.Module):
    """Parallel residuals (PR #1530) for the last decoder layers: attention reads lane 0 (mixed with x0),
    the MLP reads lane 1, and each lane becomes r * lane + p_attn * attn_out + p_mlp * mlp_out with learned
    per-layer r (init 1.1) and p (init 1). The lanes start as copies of the stream; their output is their
    mean, or one lane (PARALLEL_FINAL_LANE)."""

    def __init__(self, num_lanes_layers: int, final_lane: str):
        super().__init__()
        self.parallel_resid_lambdas = nn.Parameter(torch.full((num_lanes_layers, 2), 1.1))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(num_lanes_layers, 2, 2))  # [branch, lane]
        self.final_lane = final_lane

    def step(self, j: int, block: Block, lanes: tuple, x0: torch.Tensor, segments, adapter=None) -> tuple:
        lane0, lane1 = lanes
        a = block.attn_branch(block.mix(lane0, x0), segments, adapter)
        m = block.mlp_branch(lane1, adapter)
        r = self.parallel_resid_lambdas[j].to(lane0.dtype)
        p = self.parallel_post_lambdas[j].to(lane0.dtype)
        return r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m

    def close(self, lanes: tuple) -> torch.Tensor:
        if self.final_lane == "mean":
            return 0.5 * (lanes[0] + lanes[1])
        return lanes[0] if self.final_lane == "attn" else lanes[1]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if cfg.smear_gate:
            self.smear = SmearGate(cfg.model_dim, cfg.bos_id)
        elif cfg.smear_gate_enabled:
            self.smear = SmearGateAdd(cfg.gate_window, cfg.bos_id)
        else:
            self.smear = no_mixer
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        # what the attention cores read to keep documents apart (segment ids for SDPA's block mask)
        self.document_layout = partial(document_segments, bos_id=cfg.bos_id) if cfg.doc_mask else no_documents
        self.looping = False  # depth recurrence switches on during training (set_looping); a compiled
        # forward guards on this attribute and recompiles once when it flips
        widest = layer_order(cfg, looping=True)  # U-Net skips are sized for the looped order (as the record)
        skips = min(len(widest) // 2, len(widest) - len(widest) // 2)
        self.skip_weights = nn.Parameter(torch.ones(skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(skips, cfg.model_dim)) if cfg.skip_gates_enabled else None
        start = cfg.parallel_start_layer
        self.lanes = ParallelLanes(cfg.num_layers - start, cfg.parallel_final_lane) if start else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        self.loss_fn = chunked_softcap_ce if cfg.fused_ce_enabled else plain_softcap_ce
        if cfg.ortho_init:
            for block in self.blocks:
                for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                    nn.init.orthogonal_(lin.weight)

    def add_skip(self, j: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """U-Net skip j (encoder outputs, last in first out): x + w_j * skip, or with skip gates (PR #289)
        lerp(w_j * skip, x, sigmoid(g_j)), g_j = 0 at init."""
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def set_looping(self, on: bool) -> None:
        self.looping = bool(on and self.cfg.num_loops)

    def use_varlen_kernel(self, kernel) -> None:
        """The same document masking through a varlen kernel (call with DOC_MASK): the layout becomes
        cu_seqlens, built inside the compiled graph (a data-dependent size, one device sync per forward)."""
        self.document_layout = partial(varlen_boundaries, bos_id=self.cfg.bos_id)
        for block in self.blocks:
            block.attn.core = partial(varlen_attention, kernel=kernel)

    def hidden(self, input_ids: torch.Tensor, adapters=None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]. `adapters` (test-time training) gives each executed block
        slot k (its position in the layer order, so a repeated layer gets one per pass) an adapter
        through adapters.slot(k), with q/k/v/o/mlp deltas."""
        segments = self.document_layout(input_ids)
        x = x0 = rms_norm(self.smear(to_autocast_dtype(self.tok_emb(input_ids)), input_ids))
        order = layer_order(self.cfg, self.looping)
        encoder, decoder = order[:len(order) // 2], order[len(order) // 2:]
        slot = (lambda k: None) if adapters is None else adapters.slot
        skips = []
        for k, i in enumerate(encoder):
            x = self.blocks[i](x, x0, segments, slot(k))
            skips.append(x)
        start = self.cfg.parallel_start_layer or self.cfg.num_layers
        sequential = [i for i in decoder if i < start]
        for j, i in enumerate(sequential):
            if j < len(self.skip_weights) and skips:
                x = self.add_skip(j, x, skips.pop())
            x = self.blocks[i](x, x0, segments, slot(len(encoder) + j))
        if self.lanes is not None:
            lanes = (x, x)
            for j, i in enumerate(decoder[len(sequential):], start=len(sequential)):
                if j < len(self.skip_weights) and skips:
                    lanes = (self.add_skip(j, lanes[0], skips.pop()), lanes[1])
                lanes = self.lanes.step(i - start, self.blocks[i], lanes, x0, segments, slot(len(encoder) + j))
            x = self.lanes.close(lanes)
        return rms_norm(x)

    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor, adapters=None) -> torch.Tensor:
        """Softcapped fp32 logits of hidden states h (plus the adapters' head delta in test-time training)."""
        raw = F.linear(h, self.head_weight().to(h.dtype))
        return softcap_logits(raw if adapters is None else raw + adapters.head(h), self.cfg.logit_softcap)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden(input_ids)
        return self.loss_fn(h.reshape(-1, h.size(-1)), self.head_weight(), target_ids.reshape(-1),
                            self.cfg.logit_softcap)


def rebuild_model(state: dict, model_config: dict, source: str) -> GPT:
    """A GPT from a stored configuration and weights (an artifact's), ready to evaluate: depth
    recurrence on, as training ended. Clear errors for configs or weights that don't fit."""
    unknown = sorted(set(model_config) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{source}: stored model config has settings this pgolf does not know ({', '.join(unknown)}); "
                         "it was written by a newer pgolf, upgrade to evaluate it")
    model = GPT(GPTConfig(**model_config))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{source}: weights do not match the stored model config ({first}); the artifact is "
                         "inconsistent, re-export it with pgolf train") from None
    model.set_looping(True)
    return model


def mark_qat(model: GPT, names: set[str] | dict[str, tuple[int, float]]) -> None:
    """Give QAT to exactly the linears whose weights are in `names` (call before compiling); a dict
    also gives each its export grid (max level, SD-clip sigmas), else the int6 abs-max grid.

    A name that is not a CastedLinear weight is an error: the export would quantize a tensor that
    training never saw quantized, the train/export mismatch that QAT exists to remove."""
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    foreign = sorted(set(names) - linears.keys())
    if foreign:
        raise ValueError(f"QAT can only fake CastedLinear weights, not {foreign}; keep these out of the int6 "
                         f"export (e.g. list them in FP16_PASSTHROUGH_PATTERNS) or make them CastedLinear")
    for name, mod in linears.items():
        mod.qat = name in names
        if isinstance(names, dict) and name in names:
            mod.qat_grid = names[name]


def set_qat_gate(model: GPT, on: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, CastedLinear) and mod.qat:
            mod.qat_gate.fill_(1.0 if on else 0.0)
