"""Step time on GPUs from FLOPs: the projected ms/step of a configuration on 8xH100, the achieved MFU of a
run, and the calibration of the one utilization figure against the ms/step that records report.

projected ms/step = training FLOPs per step / (GPUs x peak bf16 FLOP/s x utilization), with FLOPs from
pgolf.flops (matmuls + attention, forward + backward, recurrence counted) and one utilization for all
configurations: the geometric mean of the four records' own (their reported ms/step are in their logs).
"""
from __future__ import annotations

import math

# Dense bf16 peak per GPU in TFLOP/s (no sparsity), by a name fragment of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "B200": 2250, "A100": 312}
H100 = 989e12
# The ms/step the records' train logs report on 8xH100 (step_avg at the end of training), by pgolf preset.
RECORD_MS_PER_STEP = {"baseline": 43.5, "seed137": 98.9, "seed170": 61.8, "frontier": 121.7}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, None when unknown (then no MFU is printed)."""
    return next((1e12 * peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def mfu(flops_per_token: float, tokens_per_s: float, gpus: int, peak: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the GPUs' peak."""
    return flops_per_token * tokens_per_s / (gpus * peak)


def projected_ms(step_flops: float, utilization: float, gpus: int = 8, peak: float = H100) -> float:
    return 1000.0 * step_flops / (gpus * peak * utilization)


def step_flops(cfg) -> float:
    """Training FLOPs of one optimizer step of a resolved configuration (recurrence averaged over the run)."""
    from pgolf.flops import train_flops_per_token
    from pgolf.model import GPTConfig

    return cfg.train_batch_tokens * train_flops_per_token(cfg.part(GPTConfig), cfg.train_seq_len, cfg.enable_looping_at)


def calibrate() -> tuple[float, list[dict]]:
    """(utilization, one row per record: preset, FLOPs/token, reported and predicted ms/step, error %)."""
    from pgolf.config import resolve

    flops = {name: step_flops(resolve(name, env={})) for name in RECORD_MS_PER_STEP}
    own = {name: projected_ms(flops[name], 1.0) / ms for name, ms in RECORD_MS_PER_STEP.items()}
    utilization = math.exp(sum(math.log(u) for u in own.values()) / len(own))
    rows = []
    for name, ms in RECORD_MS_PER_STEP.items():
        predicted = projected_ms(flops[name], utilization)
        cfg = resolve(name, env={})
        rows.append(dict(preset=name, flops_per_token=flops[name] / cfg.train_batch_tokens, reported_ms=ms,
                         predicted_ms=predicted, error_pct=100.0 * (predicted - ms) / ms, own_utilization=own[name]))
    return utilization, rows


def projection_lines(cfg) -> list[str]:
    """`pgolf budget`'s lines: FLOPs per token and step, the projected 8xH100 ms/step, the calibration."""
    utilization, rows = calibrate()
    flops = step_flops(cfg)
    ms = projected_ms(flops, utilization)
    steps = int(600_000 / ms)
    lines = [f"flops: {flops / cfg.train_batch_tokens:.4g} training FLOPs/token (matmuls + attention, fwd + bwd), "
             f"{flops:.4g} per step of {cfg.train_batch_tokens:,} tokens",
             f"projected: {ms:.1f} ms/step on 8xH100 at {100 * utilization:.1f}% of the {H100 / 1e12:.0f} TFLOP/s bf16 "
             f"peak, about {steps:,} steps in 600 s",
             "calibration (the records' logged ms/step; utilization = their geometric mean):"]
    lines += [f"  {r['preset']:<9} {r['flops_per_token']:.4g} FLOPs/token  reported {r['reported_ms']:6.1f} ms  "
              f"predicted {r['predicted_ms']:6.1f} ms  error {r['error_pct']:+6.1f}%  (own utilization "
              f"{100 * r['own_utilization']:.1f}%)" for r in rows]
    return lines
