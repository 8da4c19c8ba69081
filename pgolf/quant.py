"""Per-row quantization, shared by QAT and export, and the two v1 export formats.

`quantize_rows` is the single round-to-nearest quantizer: STE fake-quant in training
(`fake_quantize`) and the int6 export both call it, so a QAT weight survives the export bit for bit.
Its clip range per row is the abs-max (today's int6), k row standard deviations (SD-clip,
clip_sigmas = k > 0) or a quantile of |w| (the int8 baseline); `row_scales` and `round_to_levels`
are the scale and rounding rules GPTQ (pgolf.gptq) uses too.
- int8_zlib: the challenge baseline. 2-D float tensors over 65,536 entries become int8 per row
  (clip at the 99.99984th percentile of |w|, scale = max(clip/127, 1/127)); small tensors stay
  float (control tensors fp32, others fp16).
- int6_zstd: every attention and MLP matrix int6 per row (levels -31..31, scale = row abs-max / 31,
  stored in int8 with fp16 scales), whatever its size; fp16 passthrough for the tied embedding and
  any listed pattern; control tensors fp32; other small tensors fp16; other large 2-D tensors int8.
  Matrices go int6 before the small-tensor rule so that a scaled-down model (a 256-wide benchmark,
  a test) quantizes the same tensors, and QAT fakes the same tensors, as the full-size one.
The mixed plan of artifact v2 (pgolf.mixed) builds on these kinds.
"""
from __future__ import annotations

import re

import torch

INT6_MAX = 31
INT8_MAX = 127
INT6_SCALE_FLOOR = 2.0**-20  # a small floor: only all-zero rows hit it (fp16-representable)
INT8_CLIP_QUANTILE = 0.9999984
SMALL_TENSOR_NUMEL = 65_536
INT6_MATRIX = re.compile(r"^blocks\.\d+\.(attn|mlp)\.[a-z_]+\.weight$")


def row_clip(w: torch.Tensor, clip_sigmas: float = 0.0, clip_quantile: float | None = None) -> torch.Tensor:
    """Per-row clip range of a float matrix: abs-max (clip_sigmas 0, no quantile), k * row std
    (SD-clip, clip_sigmas = k > 0), or the clip_quantile-th quantile of |w| (the int8 baseline)."""
    if clip_sigmas > 0:
        return clip_sigmas * w.std(dim=1)
    if clip_quantile is not None:
        return torch.quantile(w.abs(), clip_quantile, dim=1)
    return w.abs().amax(dim=1)


def row_scales(clip: torch.Tensor, max_level: int, scale_floor: float = INT6_SCALE_FLOOR) -> torch.Tensor:
    # Rounded to fp16 *before* use, so dequantizing the stored (q, scale) is exact.
    return (clip / max_level).clamp_min(scale_floor).to(torch.float16)


def round_to_levels(w: torch.Tensor, scale: torch.Tensor, max_level: int) -> torch.Tensor:
    """Nearest level of w / scale (scale broadcast along w's last dim), clamped to +-max_level.
    The one rounding rule: per-row rounding (RTN) and GPTQ's column-by-column rounding both use it;
    values beyond the clip range land on the end levels."""
    return torch.clamp(torch.round(w / scale.float()), -max_level, max_level)


def quantize_rows(w: torch.Tensor, max_level: int, clip_quantile: float | None = None,
                  scale_floor: float = INT6_SCALE_FLOOR, clip_sigmas: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row round-to-nearest -> (int8 levels in [-max_level, max_level], fp16 row scales).
    The clip range is the row's abs-max unless clip_sigmas (SD-clip) or clip_quantile is given."""
    w = w.detach().float()
    clip = row_clip(w, clip_sigmas, clip_quantile)
    scale = row_scales(clip, max_level, scale_floor)
    # Clip w itself (not only the levels): where the scale floor wins, a clipped value keeps its clip.
    w = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    q = round_to_levels(w, scale[:, None], max_level).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def max_level(bits: int) -> int:
    """Largest level of a symmetric signed `bits`-bit grid (int6 -> 31, int8 -> 127)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"{bits} bits: per-row levels are stored in int8, so bits must be in 2..8")
    return 2 ** (bits - 1) - 1


def fake_quantize(w: torch.Tensor, max_level: int = INT6_MAX, clip_sigmas: float = 0.0) -> torch.Tensor:
    """The RTN export's round trip of w, in fp32 (what QAT trains against); defaults = the int6 export."""
    return dequantize_rows(*quantize_rows(w, max_level, clip_sigmas=clip_sigmas))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(p and p in name for p in patterns)


def split_patterns(csv: str) -> list[str]:
    return [p.strip() for p in csv.split(",") if p.strip()]


def export_kind(name: str, t: torch.Tensor, fmt: str, control: list[str], fp16_keep: list[str]) -> str:
    """How a state-dict entry is stored: raw | fp32 | fp16 | int6 | int8 | int8_tensor."""
    if not t.is_floating_point():
        return "raw"
    if _matches(name, control):
        return "fp32"
    if fmt == "int6_zstd":
        if _matches(name, fp16_keep):
            return "fp16"
        if t.ndim == 2 and INT6_MATRIX.match(name):
            return "int6"
    if t.numel() <= SMALL_TENSOR_NUMEL:
        return "fp16"
    return "int8" if t.ndim == 2 else "int8_tensor"


def store_tensor(t: torch.Tensor, kind: str) -> dict:
    """One state-dict entry in a stored kind (raw | fp32 | fp16 | int6 | int8 | int8_tensor)."""
    entry = {"kind": kind, "dtype": str(t.dtype).removeprefix("torch.")}
    if kind == "raw":
        entry["data"] = t.detach().cpu().clone()
    elif kind in ("fp32", "fp16"):
        entry["data"] = t.detach().cpu().to(torch.float32 if kind == "fp32" else torch.float16).clone()
    elif kind == "int6":
        entry["q"], entry["scale"] = quantize_rows(t.cpu(), INT6_MAX)
    elif kind == "int8":
        entry["q"], entry["scale"] = quantize_rows(t.cpu(), INT8_MAX, INT8_CLIP_QUANTILE, 1.0 / INT8_MAX)
    elif kind == "int8_tensor":  # one fp32 scale for a non-matrix tensor
        flat = t.detach().float().cpu().reshape(1, -1)
        q, scale = quantize_rows(flat, INT8_MAX, INT8_CLIP_QUANTILE, 1.0 / INT8_MAX)
        entry.update(q=q.view(t.shape), scale=scale.float(), shape=list(t.shape))
    else:
        raise ValueError(f"unknown tensor kind {kind!r}")
    return entry


def quantize_state(state: dict[str, torch.Tensor], fmt: str, control: list[str],
                   fp16_keep: list[str]) -> dict[str, dict]:
    """state dict -> {name: {"kind", tensors..., "dtype"}} ready for torch.save."""
    return {name: store_tensor(t, export_kind(name, t, fmt, control, fp16_keep)) for name, t in state.items()}


def load_tensor(name: str, e: dict) -> torch.Tensor:
    """The float (or raw) tensor of one stored entry of a kind store_tensor writes."""
    dtype = getattr(torch, e["dtype"])
    if e["kind"] in ("raw", "fp32", "fp16"):
        return e["data"].to(dtype)
    if e["kind"] in ("int6", "int8"):
        return dequantize_rows(e["q"], e["scale"]).to(dtype)
    if e["kind"] == "int8_tensor":
        return (e["q"].reshape(1, -1).float() * e["scale"].float()).view(e["shape"]).to(dtype)
    raise ValueError(f"unknown tensor kind {e['kind']!r} for {name}; the artifact is from a newer pgolf")


def dequantize_state(packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {name: load_tensor(name, e) for name, e in packed.items()}


def int6_weight_names(state: dict[str, torch.Tensor], control: list[str], fp16_keep: list[str]) -> set[str]:
    """The exact set of tensors the int6 export quantizes (QAT must fake exactly these)."""
    return {n for n, t in state.items() if export_kind(n, t, "int6_zstd", control, fp16_keep) == "int6"}
