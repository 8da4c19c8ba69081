"""Predicted bytes of a v2 export (MATRIX_QUANT, EMBED_BITS, SD-clip, LQER, COMPRESSOR), before training.

The v1 planner (`pgolf.budget`) multiplies stored bytes by one ratio per tensor class. That does not
carry over to v2: the per-group coder picks a codec per group, SD-clip sets the entropy of the levels,
LQER adds factors. So the prediction here is a real export, run on a synthetic state:

- every tensor of the configuration's model is filled with random-normal values (std 1, seeded);
- it is quantized by `pgolf.mixed.quantize_mixed` with the configuration's bits, clips and LQER,
  rounding to nearest where the configuration asks for GPTQ (GPTQ needs activations; it keeps the
  grid and moves values between neighbouring levels);
- it is encoded by `pgolf.artifact.encode_v2` with the configuration's compressor, so the bytes are
  the file's bytes.

With SD-clip the level histogram of a row depends only on w / std(w), and a Gaussian has the largest
entropy for its spread, so trained (heavier-tailed) weights tend to compress better than this basis.
`calibrate(artifact)` measures that: it predicts the artifact's own configuration the same way and
returns real bytes / predicted bytes, a factor the caller applies to the target configuration.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from pgolf.artifact import MAGIC_V2, _decode_v2, encode_v2, file_codec
from pgolf.coder import CoderSettings
from pgolf.gptq import GPTQSettings
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings, quantize_mixed
from pgolf.model import GPT, GPTConfig
from pgolf.quant import split_patterns

V2_GROUPS = (QuantSettings, GPTQSettings, LQERSettings, CoderSettings)


def uses_v2(cfg) -> bool:
    """True when any v2 setting differs from its default (today's v1 export otherwise)."""
    return any(cfg.part(group) != group() for group in V2_GROUPS)


@dataclass
class ExportPrediction:
    bytes: int  # the synthetic state's v2 file
    groups: dict  # coder stats per group (pergroup) or {"payload_bytes": ...}
    lqer_tensors: int
    seconds: float


def synthetic_state(model_config: GPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = GPT(model_config).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=g).to(t.dtype) if t.is_floating_point()
            else torch.zeros(t.shape, dtype=t.dtype) for name, t in shapes.items()}


def predict_export(model_config: GPTConfig, fmt: str, control: list[str], fp16_keep: list[str],
                   quant: QuantSettings, gptq: GPTQSettings, lqer: LQERSettings, coder: CoderSettings,
                   seed: int = 0) -> ExportPrediction:
    t0 = time.perf_counter()
    state = synthetic_state(model_config, seed)
    packed, report = quantize_mixed(state, fmt, control, fp16_keep, quant, replace(gptq, matrix_quant="rtn"), lqer)
    obj = {"format": fmt, "version": 2, "model_config": model_config.to_dict(),
           "settings": {**asdict(quant), **asdict(gptq), **asdict(lqer), **asdict(coder)}, "tensors": packed}
    blob, stats = encode_v2(obj, file_codec(fmt, coder), coder.pergroup_row_sort)
    return ExportPrediction(len(blob), stats, sum("lqer" in r for r in report.values()), time.perf_counter() - t0)


def predict_config(cfg, seed: int = 0) -> ExportPrediction:
    return predict_export(cfg.part(GPTConfig), cfg.quant_format, split_patterns(cfg.control_tensor_name_patterns),
                          split_patterns(cfg.fp16_passthrough_patterns), *(cfg.part(g) for g in V2_GROUPS), seed=seed)


def _settings_of(group: type, saved: dict):
    return group(**{f.name: saved[f.name] for f in fields(group) if f.name in saved})


def calibrate(path: str | Path, control: list[str], fp16_keep: list[str]) -> tuple[float, str]:
    """-> (real bytes / synthetic prediction, description) for a v2 artifact of trained weights."""
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC_V2):
        raise ValueError(f"{path}: --calibrate needs a v2 artifact (written with the v2 settings, e.g. "
                         "MATRIX_QUANT=gptq or COMPRESSOR=pergroup); this one is v1")
    obj = _decode_v2(path, raw)
    saved = obj.get("settings", {})
    model_config = GPTConfig(**obj["model_config"])
    pred = predict_export(model_config, obj["format"], control, fp16_keep,
                          *(_settings_of(g, saved) for g in V2_GROUPS))
    factor = len(raw) / pred.bytes
    return factor, (f"{Path(path).name}: {len(raw):,} bytes real vs {pred.bytes:,} predicted for its own config "
                    f"({model_config.num_layers}x{model_config.model_dim}, vocab {model_config.vocab_size}) "
                    f"-> factor {factor:.4f}")


def format_groups(pred: ExportPrediction) -> list[str]:
    rows = [(g, s) for g, s in pred.groups.items() if isinstance(s, dict) and "raw_bytes" in s]
    if not rows:
        return [f"single stream: {pred.bytes:,} bytes"]
    lines = [f"{'group':<10} {'raw bytes':>12} {'bytes':>12} {'bits/byte':>9}  codec"]
    lines += [f"{g:<10} {s['raw_bytes']:>12,} {s['bytes']:>12,} {8 * s['bytes'] / max(s['raw_bytes'], 1):>9.3f}  "
              f"{s['codec']}" for g, s in rows]
    return lines
