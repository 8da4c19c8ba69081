"""Pure schedule functions of (step, elapsed training time): LR multiplier, Muon momentum, switches.

The LR multiplier is the challenge's: constant 1, then a linear warmdown to 0 over the last
`warmdown_iters` steps. With a wallclock cap the warmdown is placed by time: it starts when the
projected remaining steps (remaining time / average step time) equal `warmdown_iters`, so it ends
exactly at the cap. The record's form (`warmdown_frac` > 0) decays over the last fraction of training
progress instead (by steps, or by time under a cap), and `min_lr` floors either form (PR #1787).
"""
from __future__ import annotations


def lr_multiplier(step: int, elapsed_ms: float, *, iterations: int, warmdown_iters: int,
                  max_wallclock_ms: float, warmdown_frac: float = 0.0, min_lr: float = 0.0) -> float:
    if warmdown_frac > 0:
        left = 1.0 - progress(step, elapsed_ms, iterations=iterations, max_wallclock_ms=max_wallclock_ms)
        mul = min(left / warmdown_frac, 1.0)
    elif warmdown_iters <= 0:
        return 1.0
    elif max_wallclock_ms <= 0:
        start = max(iterations - warmdown_iters, 0)
        mul = max((iterations - step) / warmdown_iters, 0.0) if step >= start else 1.0
    else:
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = warmdown_iters * step_ms
        remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
        mul = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return max(mul, min_lr)


def muon_momentum(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


def progress(step: int, elapsed_ms: float, *, iterations: int, max_wallclock_ms: float) -> float:
    """Fraction of training done: by steps, or by time when a wallclock cap is set (whichever is further)."""
    by_steps = step / max(iterations, 1)
    by_time = elapsed_ms / max_wallclock_ms if max_wallclock_ms > 0 else 0.0
    return min(max(by_steps, by_time), 1.0)


def swa_due(step: int, lr_mul: float, *, every: int, start_frac: float, start_lr: float) -> bool:
    """Take an SWA checkpoint now? Only inside the warmdown (lr_mul < 1), every `every` steps, after
    `start_frac` of the warmdown (warmdown progress = 1 - lr_mul) or, if start_lr > 0, once
    lr_mul < start_lr."""
    if every <= 0 or lr_mul >= 1.0 or step % every:
        return False
    return lr_mul < start_lr if start_lr > 0 else (1.0 - lr_mul) >= start_frac
