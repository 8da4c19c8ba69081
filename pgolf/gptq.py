"""GPTQ: quantize a matrix column by column, pushing each column's rounding error onto the columns
not yet quantized, weighted by the input Hessian H = X^T X of the layer (Frantar et al., 2022).

RTN minimizes ||W - Q||; GPTQ minimizes the layer-output error ||X W^T - X Q^T|| = tr(E H E^T),
which matters when inputs are correlated. The row scales and the rounding rule are the RTN
quantizer's own (quant.row_clip / row_scales / round_to_levels), so GPTQ with H = I is RTN and the
stored (int8 levels, fp16 row scales) read back exactly like an RTN matrix.

Hessians come from forward hooks on every CastedLinear (its input) plus the tied embedding, whose
Hessian is that of the output head's input: the final normed hidden state `model.hidden(x)`.
Calibration batches must be TRAINING data: the score is on validation data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from pgolf.model import CastedLinear
from pgolf.quant import round_to_levels, row_clip, row_scales

TIED_EMBEDDING = "tok_emb.weight"


@dataclass
class GPTQSettings:
    matrix_quant: str = "rtn"  # rtn (round to nearest, today) | gptq (Hessian-aware, needs calibration batches)
    gptq_calibration_batches: int = 16  # training batches whose activations build the Hessians (record: 16)
    gptq_reserve_seconds: float = 0.0  # training wallclock kept back for calibration + quantization (record: 0.5-4)
    gptq_block_size: int = 128  # columns per lazy-update block (the GPTQ paper's 128)
    gptq_damp: float = 0.01  # H += damp * mean(diag H) * I before the Cholesky (paper: 0.01)
    gptq_act_order: bool = True  # quantize columns by decreasing H diagonal (largest inputs first)

    def validate(self) -> None:
        if self.matrix_quant not in ("rtn", "gptq"):
            raise ValueError(f"MATRIX_QUANT={self.matrix_quant!r}; allowed: rtn, gptq")
        if self.matrix_quant == "gptq" and self.gptq_calibration_batches < 1:
            raise ValueError("MATRIX_QUANT=gptq needs GPTQ_CALIBRATION_BATCHES >= 1")


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, CastedLinear)}


@torch.no_grad()
def collect_hessians(model: torch.nn.Module, batches: Iterable, names: set[str] | None = None,
                     all_reduce: Callable | None = None) -> dict[str, torch.Tensor]:
    """{weight name: X^T X / rows} over the calibration batches, fp32 on CPU.

    batches yields input ids [B, T] or (inputs, targets) pairs of training data. names limits the
    collection (None: every CastedLinear weight and the tied embedding). all_reduce (e.g.
    Dist.all_reduce) sums the statistics over ranks, each rank having seen its own batches.
    The model runs in eval mode (no QAT fake-quant): GPTQ quantizes the trained fp32 weights.
    """
    linears = {n: m for n, m in _linear_modules(model).items() if names is None or n in names}
    want_embed = model.cfg.tie_embeddings and (names is None or TIED_EMBEDDING in names)
    sums: dict[str, torch.Tensor] = {}
    rows = torch.zeros((), dtype=torch.float64)

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if name not in sums:
            sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        sums[name].addmm_(x.T, x)

    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: add(name, inp[0]))
             for name, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            h = model.hidden(x)
            if want_embed:
                add(TIED_EMBEDDING, h)
            rows += x.numel()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if all_reduce is not None:
        rows = all_reduce(rows.to(next(model.parameters()).device)).cpu()
        for name in sorted(sums):
            sums[name] = all_reduce(sums[name])
    if float(rows) == 0:
        raise ValueError("collect_hessians got no calibration batches; pass GPTQ_CALIBRATION_BATCHES >= 1 "
                         "training batches")
    return {name: (s / float(rows)).cpu() for name, s in sums.items()}


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag) * I)^-1, damping up tenfold if H is singular."""
    mean_diag = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping {damp * 10**4:g}; "
                     "calibrate on more tokens (GPTQ_CALIBRATION_BATCHES)")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, max_level: int, clip_sigmas: float = 0.0,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (int8 levels [rows, cols], fp16 row scales), the same containers as quant.quantize_rows.

    Scales come from the original rows (abs-max, or clip_sigmas * row std: SD-clip). Columns whose
    inputs are always zero (H diagonal 0) carry no signal and are quantized as zeros.
    """
    W = w.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"GPTQ: Hessian of shape {tuple(H.shape)} does not fit a [{rows}, {cols}] weight")
    scale = row_scales(row_clip(W, clip_sigmas), max_level)
    s = scale.float()
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Wb, Hb = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            q = round_to_levels(Wb[:, j], s, max_level)
            Q[:, i1 + j] = q.to(torch.int8)
            err = (Wb[:, j] - q * s) / Hb[j, j]
            Wb[:, j:] -= err[:, None] * Hb[j, j:][None, :]
            Err[:, j] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].contiguous(), scale
