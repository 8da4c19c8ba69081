"""The mixed-precision plan of artifact v2: which quantizer stores each state-dict entry.

On top of a v1 format's rules (quant.export_kind):
- the matrices the int6 format quantizes (every attention/MLP matrix, the set QAT fakes) are stored
  per row at MATRIX_BITS, by round-to-nearest or GPTQ (MATRIX_QUANT), clip range abs-max or k row
  standard deviations (SD-clip, k = ATTN_/MLP_/MATRIX_CLIP_SIGMAS by the matrix's group);
- EMBED_BITS > 0 stores the token embedding per row at that many bits (clip EMBED_CLIP_SIGMAS;
  GPTQ when tied, its Hessian being the head's), overriding FP16_PASSTHROUGH_PATTERNS;
- GATED_ATTN_QUANT_GATE stores 2-D `attn_gate` tensors int8 per row (abs-max), whatever else
  would apply to them;
- LQER adds a low-rank correction to the top-K of these matrices by error.
Everything else keeps its v1 kind. With the defaults (6 bits, RTN, no clip, EMBED_BITS 0, no
LQER) every entry is stored exactly as the v1 int6_zstd format stores it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.gptq import TIED_EMBEDDING, GPTQSettings, gptq_quantize
from pgolf.lqer import LQERSettings, correct, correction, top_k_by_error
from pgolf.quant import dequantize_rows, export_kind, load_tensor, max_level, quantize_rows, store_tensor

GATE_PATTERN = "attn_gate"
GATE_BITS = 8


@dataclass
class QuantSettings:
    matrix_bits: int = 6  # bits of every attention/MLP matrix, per row (int6 = today's int6_zstd)
    embed_bits: int = 0  # token embedding per row at this many bits; 0: as today (fp16 under int6_zstd) (record: 7)
    matrix_clip_sigmas: float = 0.0  # SD-clip k of quantized matrices outside attn/MLP; 0: row abs-max (today)
    attn_clip_sigmas: float = 0.0  # SD-clip k (clip = k * row std) of attention matrices; 0: abs-max (record: 13.0)
    mlp_clip_sigmas: float = 0.0  # SD-clip k of MLP matrices; 0: abs-max (record: 11.5)
    embed_clip_sigmas: float = 0.0  # SD-clip k of the embedding (EMBED_BITS > 0); 0: abs-max (record: 14.0)
    gated_attn_quant_gate: bool = False  # 2-D attn_gate tensors int8 per row instead of fp32/fp16

    def validate(self, fmt: str) -> None:
        max_level(self.matrix_bits)
        if self.embed_bits:
            max_level(self.embed_bits)
        if fmt != "int6_zstd" and self != QuantSettings(gated_attn_quant_gate=self.gated_attn_quant_gate):
            raise ValueError(f"MATRIX_BITS/EMBED_BITS/*_CLIP_SIGMAS apply to QUANT_FORMAT=int6_zstd, not {fmt}")

    def clip_sigmas(self, group: str) -> float:
        return {"attn": self.attn_clip_sigmas, "mlp": self.mlp_clip_sigmas, "embed": self.embed_clip_sigmas,
                "gate": 0.0}.get(group, self.matrix_clip_sigmas)


@dataclass(frozen=True)
class Plan:
    kind: str  # a v1 kind (raw, fp32, fp16, int6, int8, int8_tensor) or "rows" (per row at `bits`)
    bits: int = 0
    group: str = ""  # attn | mlp | matrix | embed | gate: which clip applies, and which may use GPTQ/LQER


def matrix_group(name: str) -> str:
    if name == TIED_EMBEDDING:
        return "embed"
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "matrix"


def plan_tensor(name: str, t: torch.Tensor, fmt: str, control: list[str], fp16_keep: list[str],
                qs: QuantSettings) -> Plan:
    if qs.gated_attn_quant_gate and GATE_PATTERN in name and t.is_floating_point() and t.ndim == 2:
        return Plan("rows", GATE_BITS, "gate")
    if fmt == "int6_zstd" and qs.embed_bits and name == TIED_EMBEDDING:
        return Plan("rows", qs.embed_bits, "embed")
    kind = export_kind(name, t, fmt, control, fp16_keep)
    if kind == "int6":
        return Plan("rows", qs.matrix_bits, matrix_group(name))
    return Plan(kind)


def _store_rows(name: str, t: torch.Tensor, plan: Plan, qs: QuantSettings, gs: GPTQSettings,
                hessians: dict[str, torch.Tensor] | None) -> dict:
    level, clip = max_level(plan.bits), qs.clip_sigmas(plan.group)
    use_gptq = gs.matrix_quant == "gptq" and plan.group != "gate"
    if use_gptq and (hessians is None or name not in hessians):
        raise ValueError(f"MATRIX_QUANT=gptq has no Hessian for {name}; collect them with gptq.collect_hessians "
                         "on the model being exported (calibration batches of training data)")
    if use_gptq:
        q, scale = gptq_quantize(t, hessians[name], level, clip, block_size=gs.gptq_block_size, damp=gs.gptq_damp,
                                 act_order=gs.gptq_act_order)
    else:
        q, scale = quantize_rows(t, level, clip_sigmas=clip)
    return {"kind": "rows", "dtype": str(t.dtype).removeprefix("torch."), "bits": plan.bits,
            "method": "gptq" if use_gptq else "rtn", "clip_sigmas": clip, "q": q, "scale": scale}


def quantize_mixed(state: dict[str, torch.Tensor], fmt: str, control: list[str], fp16_keep: list[str],
                   qs: QuantSettings, gs: GPTQSettings, ls: LQERSettings,
                   hessians: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """-> (stored entries for the artifact, per-tensor report {name: kind, bits, method, rel_error, lqer})."""
    packed, report, errors = {}, {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        plan = plan_tensor(name, t, fmt, control, fp16_keep, qs)
        if plan.kind != "rows":
            packed[name] = store_tensor(t, plan.kind)
            continue
        e = packed[name] = _store_rows(name, t, plan, qs, gs, hessians)
        err = t.float() - dequantize_rows(e["q"], e["scale"])
        report[name] = {"group": plan.group, "bits": plan.bits, "method": e["method"],
                        "rel_error": float(err.norm() / t.float().norm().clamp_min(1e-30))}
        if plan.group != "gate":
            errors[name] = float(err.norm())
    if ls.lqer_enabled:
        for name in top_k_by_error(errors, ls.lqer_top_k):
            e = packed[name]
            e.update(correct(state[name].cpu(), dequantize_rows(e["q"], e["scale"]), ls))
            w = state[name].cpu().float()
            report[name].update(lqer=e["lqer_mode"], rel_error_lqer=float(
                (w - load_entry(name, e).float()).norm() / w.norm().clamp_min(1e-30)))
    return packed, report


def load_entry(name: str, e: dict) -> torch.Tensor:
    if e["kind"] != "rows":
        return load_tensor(name, e)
    w = dequantize_rows(e["q"], e["scale"])
    if "lqer_mode" in e:
        w = w + correction(e)
    return w.to(getattr(torch, e["dtype"]))


def dequantize_mixed(packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {name: load_entry(name, e) for name, e in packed.items()}
