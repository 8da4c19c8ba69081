"""Muon (with the NorMuon variant and decoupled weight decay) for block matrices, Adam for the rest.

Muon: Nesterov momentum, then Newton-Schulz orthogonalisation (5 steps, coefficients
(3.4445, -4.7750, 2.0315)), scaled by sqrt(max(1, rows/cols)). Across ranks each matrix is
orthogonalised by one rank (index % world_size) and the results are shared with one all-reduce.
NorMuon (arXiv 2510.05491) adds, after Newton-Schulz, a per-row (per output neuron) EMA v of the
mean squared update and divides each row by sqrt(v) + eps, then rescales:
- "frobenius" (default, as the NorMuon reference code): back to the pre-normalisation Frobenius
  norm, then the usual sqrt(max(1, rows/cols)) factor;
- "paper": to 0.2 * sqrt(rows * cols) / ||O||_F, i.e. an update of RMS 0.2 (no aspect factor).
Weight decay is decoupled: p <- p * (1 - lr_t * wd) with the scheduled lr.
Options from the 1.0611 record's lineage: Polar Express Newton-Schulz (a tuned coefficient tuple per
iteration instead of one fixed quintic) and MuonEq-R (each row of the momentum update scaled to unit
norm before orthogonalisation, PR #1285 lineage). Adam is AdamW: decoupled decay per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al., arXiv 2505.16932): per-iteration minimax (a, b, c) for 5 steps, as used
# by PR #1344 and the 1.0611 record; more steps repeat the last (converged) tuple.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    if kind == "polar_express":
        return [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    return [NS_COEFFS] * steps


@dataclass
class MuonConfig:
    """Muon on the block matrices."""
    matrix_lr: float = 0.04  # peak learning rate
    muon_momentum: float = 0.95  # Nesterov momentum after the warmup
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_momentum_warmup_start: float = 0.85  # momentum at step 0, warmed linearly to MUON_MOMENTUM
    muon_momentum_warmup_steps: int = 500  # steps of that warmup
    muon_variant: str = "muon"  # muon | normuon (per-row second-moment normalisation after Newton-Schulz)
    normuon_beta2: float = 0.95  # NorMuon's per-row EMA decay
    normuon_rescale: str = "frobenius"  # frobenius (NorMuon reference code) | paper (0.2*sqrt(mn)/||O||_F)
    muon_weight_decay: float = 0.0  # decoupled: p *= 1 - lr_t * wd (the record's MUON_WD)
    muon_ns: str = "quintic"  # Newton-Schulz coefficients: quintic (fixed) | polar_express (per iteration)
    muon_row_normalize: bool = False  # MuonEq-R: unit-norm rows of the update before Newton-Schulz

    def check(self) -> None:
        for name, value, allowed in (("MUON_VARIANT", self.muon_variant, ("muon", "normuon")),
                                     ("NORMUON_RESCALE", self.normuon_rescale, ("frobenius", "paper")),
                                     ("MUON_NS", self.muon_ns, ("quintic", "polar_express"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


@dataclass
class AdamConfig:
    """Adam on everything Muon does not take: embeddings, head, SmearGate, vectors and control tensors."""
    embed_lr: float = 0.6  # untied input embedding
    head_lr: float = 0.008  # untied output head
    tied_embed_lr: float = 0.05  # the tied embedding (input and head)
    scalar_lr: float = 0.04  # vectors and control tensors
    smear_lr: float = 0.04  # the SmearGate parameters
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    embed_wd: float = 0.0  # AdamW decay of the embedding and head (the record: 0.085)
    adam_wd: float = 0.0  # AdamW decay of vectors, control tensors and SmearGate (the record: 0.02)


def zeropower_newton_schulz(g: torch.Tensor, coeffs: list[tuple[float, float, float]],
                            dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonalise g (push its singular values towards 1): one odd polynomial
    x <- a x + (b S + c S^2) x, S = x x^T, per (a, b, c) in coeffs."""
    x = g.to(dtype)
    x = x / (x.norm() + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for a, b, c in coeffs:
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


def normuon_normalize(u: torch.Tensor, row_sq: torch.Tensor, beta2: float, rescale: str,
                      eps: float = 1e-10) -> torch.Tensor:
    """Per-row second-moment normalisation of an orthogonalised update (updates row_sq in place)."""
    u = u.float()
    row_sq.mul_(beta2).add_(u.square().mean(dim=1), alpha=1.0 - beta2)
    out = u / (row_sq.sqrt() + eps)[:, None]
    if rescale == "frobenius":
        return out * (u.norm() / out.norm().clamp_min(eps))
    return out * (0.2 * math.sqrt(u.numel()) / out.norm().clamp_min(eps))


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, *, weight_decay: float = 0.0,
                 variant: str = "muon", beta2: float = 0.95, rescale: str = "frobenius", ns: str = "quintic",
                 row_normalize: bool = False, rank: int = 0, world_size: int = 1,
                 ns_dtype: torch.dtype = torch.bfloat16, orthogonalize=zeropower_newton_schulz):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.variant, self.beta2, self.rescale = variant, beta2, rescale
        self.ns, self.row_normalize = ns, row_normalize
        self.rank, self.world_size, self.ns_dtype = rank, world_size, ns_dtype
        self.orthogonalize = orthogonalize  # zeropower_newton_schulz, or its compiled form

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        g = p.grad
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(g)
        g = g.add(buf, alpha=group["momentum"])  # Nesterov
        if self.row_normalize:
            g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype)
        u = self.orthogonalize(g, ns_coefficients(self.ns, group["backend_steps"]), self.ns_dtype)
        if self.variant == "normuon":
            if "row_sq" not in state:
                state["row_sq"] = torch.zeros(p.size(0), device=p.device, dtype=torch.float32)
            u = normuon_normalize(u, state["row_sq"], self.beta2, self.rescale)
            if self.rescale == "paper":
                return u
        return u * max(1.0, p.size(0) / p.size(1)) ** 0.5

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank:
                    flat[offset:offset + p.numel()] = self._update(p, group).flatten()
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset, lr, wd = 0, group["lr"], group["weight_decay"]
            for p in params:
                u = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(u, alpha=-lr)
                offset += p.numel()


def split_params(model, control_patterns: list[str]) -> dict[str, list]:
    """Route parameters: block matrices -> Muon; embedding, head, smear, scalars/control -> Adam."""
    groups = {"matrix": [], "scalar": [], "embed": [], "head": [], "smear": []}
    for name, p in model.named_parameters():
        if name.startswith("tok_emb."):
            groups["embed"].append(p)
        elif name.startswith("lm_head."):
            groups["head"].append(p)
        elif name.startswith("smear."):
            groups["smear"].append(p)
        elif name.startswith("blocks.") and p.ndim == 2 and not any(c in name for c in control_patterns):
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def fused_adam(device: torch.device) -> bool:
    """Fused AdamW on CUDA (one kernel for all parameters, 0-dim ones included); the foreach form elsewhere."""
    return device.type == "cuda"


def build_optimizers(model, muon: MuonConfig, adam: AdamConfig, *, control_patterns: list[str],
                     rank: int = 0, world_size: int = 1, ns_dtype: torch.dtype | None = None,
                     compile_ns: bool = False) -> list:
    """[AdamW, Muon]; every group remembers its base lr in 'base_lr' for the schedule. Newton-Schulz runs
    in ns_dtype (None: bf16 on CUDA, fp32 elsewhere), compiled when compile_ns (as the reference)."""
    groups = split_params(model, control_patterns)
    tied = model.lm_head is None
    settings = {"embed": (adam.tied_embed_lr if tied else adam.embed_lr, adam.embed_wd),
                "head": (adam.head_lr, adam.embed_wd), "scalar": (adam.scalar_lr, adam.adam_wd),
                "smear": (adam.smear_lr, adam.adam_wd)}
    adam_groups = [dict(params=groups[k], lr=lr, base_lr=lr, weight_decay=wd)
                   for k, (lr, wd) in settings.items() if groups[k]]
    device = next(model.parameters()).device
    opt_adam = torch.optim.AdamW(adam_groups, betas=(adam.beta1, adam.beta2), eps=adam.adam_eps,
                                 fused=fused_adam(device))
    if ns_dtype is None:
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    orthogonalize = torch.compile(zeropower_newton_schulz) if compile_ns else zeropower_newton_schulz
    opt_muon = Muon(groups["matrix"], lr=muon.matrix_lr, momentum=muon.muon_momentum,
                    backend_steps=muon.muon_backend_steps, weight_decay=muon.muon_weight_decay,
                    variant=muon.muon_variant, beta2=muon.normuon_beta2, rescale=muon.normuon_rescale,
                    ns=muon.muon_ns, row_normalize=muon.muon_row_normalize, rank=rank, world_size=world_size,
                    ns_dtype=ns_dtype, orthogonalize=orthogonalize)
    for g in opt_muon.param_groups:
        g["base_lr"] = muon.matrix_lr
    return [opt_adam, opt_muon]
