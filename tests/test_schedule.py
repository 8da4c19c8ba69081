"""Schedule functions: LR warmdown, Muon momentum warmup, training progress, SWA checkpoint steps."""
from __future__ import annotations

import pytest

from pgolf.schedule import lr_multiplier, muon_momentum, progress, swa_due


def lr_by_steps(step: int, iterations: int = 60, warmdown: int = 20) -> float:
    return lr_multiplier(step, 0.0, iterations=iterations, warmdown_iters=warmdown, max_wallclock_ms=0.0)


def swa_steps(iterations=60, warmdown=20, **kw) -> list[int]:
    """Steps (counted after the optimizer step, as the trainer does) that add an SWA checkpoint."""
    return [s + 1 for s in range(iterations) if swa_due(s + 1, lr_by_steps(s, iterations, warmdown), **kw)]


def test_step_warmdown():
    assert [lr_by_steps(s) for s in (0, 39, 40, 41, 50, 59)] == [1.0, 1.0, 1.0, 0.95, 0.5, 0.05]
    assert lr_multiplier(5, 0.0, iterations=60, warmdown_iters=0, max_wallclock_ms=0.0) == 1.0


def test_wallclock_warmdown_ends_at_the_cap():
    # 100 ms/step so far, warmdown 20 steps = 2,000 ms: it starts 2,000 ms before the 10,000 ms cap.
    kw = dict(iterations=10_000, warmdown_iters=20, max_wallclock_ms=10_000.0)
    assert lr_multiplier(79, 7_900.0, **kw) == 1.0
    assert lr_multiplier(90, 9_000.0, **kw) == pytest.approx(1_000 / 2_000)
    assert lr_multiplier(100, 10_000.0, **kw) == 0.0


def test_muon_momentum_warmup():
    kw = dict(start=0.92, end=0.99, warmup_steps=1500)
    assert muon_momentum(0, **kw) == 0.92
    assert muon_momentum(750, **kw) == pytest.approx(0.955)
    assert muon_momentum(5000, **kw) == 0.99
    assert muon_momentum(3, start=0.85, end=0.95, warmup_steps=0) == 0.95


def test_progress_by_steps_or_time():
    assert progress(30, 1e9, iterations=60, max_wallclock_ms=0.0) == 0.5
    assert progress(30, 9_000.0, iterations=60, max_wallclock_ms=10_000.0) == 0.9  # time is further along
    assert progress(90, 0.0, iterations=60, max_wallclock_ms=0.0) == 1.0


def test_swa_every_n_steps_inside_the_warmdown():
    # Warmdown covers steps 41..60 (lr_mul < 1 from the 41st step on): every 5 -> 45, 50, 55, 60.
    assert swa_steps(every=5, start_frac=0.0, start_lr=0.0) == [45, 50, 55, 60]
    assert swa_steps(every=0, start_frac=0.0, start_lr=0.0) == []
    # Start half-way into the warmdown: (1 - lr_mul) >= 0.5 first holds at the 51st step (lr_mul 0.5).
    assert swa_steps(every=5, start_frac=0.5, start_lr=0.0) == [55, 60]
    assert swa_steps(every=1, start_frac=0.5, start_lr=0.0)[0] == 51
    # LR-multiplier threshold instead (the Raahil Shah record's rule: scale < 0.5).
    assert swa_steps(every=5, start_frac=0.0, start_lr=0.5) == [55, 60]
    assert swa_steps(every=1, start_frac=0.0, start_lr=0.2)[0] == 58  # 57th: lr_mul 0.20; 58th: 0.15 < 0.2


def test_swa_never_outside_the_warmdown():
    assert not swa_due(200, 1.0, every=200, start_frac=0.0, start_lr=0.0)
    assert swa_due(6200, 0.4, every=200, start_frac=0.0, start_lr=0.0)
    assert not swa_due(6201, 0.4, every=200, start_frac=0.0, start_lr=0.0)
