"""Muon / NorMuon updates, decoupled weight decay, and rank-sharded orthogonalisation."""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.distributed as dist

from pgolf.model import GPT, GPTConfig
from pgolf.optim import (AdamConfig, Muon, MuonConfig, build_optimizers, normuon_normalize, ns_coefficients,
                         split_params, zeropower_newton_schulz)

LR, MOMENTUM = 0.05, 0.9


def one_step(p0: torch.Tensor, grad: torch.Tensor, **kw) -> tuple[torch.Tensor, Muon]:
    p = torch.nn.Parameter(p0.clone())
    opt = Muon([p], lr=LR, momentum=MOMENTUM, backend_steps=5, ns_dtype=torch.float32, **kw)
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt


def ns_of_first_step(grad: torch.Tensor) -> torch.Tensor:
    """What Muon orthogonalises on step 1: buf = g, Nesterov g + momentum * buf."""
    return zeropower_newton_schulz(grad.add(grad, alpha=MOMENTUM), ns_coefficients("quintic", 5), torch.float32)


def manual_update(grad: torch.Tensor, variant: str) -> torch.Tensor:
    """Step 1's update u, computed outside the optimizer with the same operations."""
    u = ns_of_first_step(grad)
    if variant == "normuon":
        u = normuon_normalize(u, torch.zeros(grad.size(0)), 0.95, "frobenius")
    return u * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


def row_rms(u: torch.Tensor) -> torch.Tensor:
    return u.square().mean(dim=1).sqrt()


@pytest.fixture
def tall():
    torch.manual_seed(5)
    # Rows of very different gradient scale, so plain Muon's update rows differ in RMS.
    return torch.randn(24, 16), torch.randn(24, 16) * torch.linspace(0.1, 3.0, 24)[:, None]


def test_muon_update_is_scaled_newton_schulz(tall):
    p0, g = tall
    p1, _ = one_step(p0, g)
    assert torch.equal(p1, p0.clone().add_(ns_of_first_step(g) * math.sqrt(24 / 16), alpha=-LR))


def test_normuon_rows_have_equal_rms_and_frobenius_mode_keeps_the_ns_norm(tall):
    p0, g = tall
    u_muon = (p0 - one_step(p0, g)[0]) / LR
    rms = row_rms(u_muon)
    assert float(rms.max() / rms.min()) > 1.05  # plain Muon: rows differ

    p1, opt = one_step(p0, g, variant="normuon", rescale="frobenius")
    u = (p0 - p1) / LR / math.sqrt(24 / 16)  # undo the aspect factor: the normalised update
    rms = row_rms(u)
    assert float(rms.max() / rms.min()) < 1 + 1e-4  # every row (output neuron) has the same RMS
    ns = ns_of_first_step(g)
    assert float(u.norm()) == pytest.approx(float(ns.norm()), rel=1e-4)  # Frobenius norm of the NS output
    # The EMA state after one step: (1 - beta2) * mean over the row of the squared NS output.
    assert torch.allclose(opt.state[next(iter(opt.state))]["row_sq"], 0.05 * ns.square().mean(dim=1), rtol=1e-5)


def test_normuon_paper_mode_gives_update_rms_point_two(tall):
    p0, g = tall
    p1, _ = one_step(p0, g, variant="normuon", rescale="paper")
    u = (p0 - p1) / LR
    assert float(u.square().mean().sqrt()) == pytest.approx(0.2, rel=1e-4)
    rms = row_rms(u)
    assert float(rms.max() / rms.min()) < 1 + 1e-4


def test_normuon_second_moment_is_an_ema_across_steps():
    torch.manual_seed(6)
    u1, u2 = torch.randn(6, 10), torch.randn(6, 10) * 3
    row_sq = torch.zeros(6)
    normuon_normalize(u1, row_sq, 0.95, "frobenius")
    out = normuon_normalize(u2, row_sq, 0.95, "frobenius")
    v = 0.95 * 0.05 * u1.square().mean(dim=1) + 0.05 * u2.square().mean(dim=1)
    assert torch.allclose(row_sq, v, rtol=1e-6)
    expected = u2 / (v.sqrt() + 1e-10)[:, None]
    expected = expected * (u2.norm() / expected.norm())
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["muon", "normuon"])
def test_decoupled_weight_decay_arithmetic(tall, variant):
    p0, g = tall
    wd = 0.3
    # Zero gradient: Newton-Schulz of zero is zero, so the step is pure decay.
    p1, _ = one_step(p0, torch.zeros_like(g), weight_decay=wd, variant=variant)
    assert torch.equal(p1, p0 * (1 - LR * wd))
    # Non-zero gradient: p <- p * (1 - lr * wd) - lr * u, bit for bit against u computed by hand.
    p_wd, _ = one_step(p0, g, weight_decay=wd, variant=variant)
    assert torch.equal(p_wd, p0.clone().mul_(1 - LR * wd).add_(manual_update(g, variant), alpha=-LR))
    p_plain, _ = one_step(p0, g, variant=variant)
    assert float((p_wd - p_plain * (1 - LR * wd)).abs().max()) > 0  # decay before the update, not after


def test_weight_decay_uses_the_scheduled_lr():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([p], lr=0.04, momentum=0.95, backend_steps=5, weight_decay=0.5, ns_dtype=torch.float32)
    opt.param_groups[0]["lr"] = 0.04 * 0.25  # what set_schedule does in the warmdown
    p.grad = torch.zeros(4, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4, 4), 1 - 0.01 * 0.5))


def test_parameter_routing_and_learning_rates():
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, smear_gate=True))
    control = ["attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear"]
    groups = split_params(model, control)
    assert len(groups["matrix"]) == 2 * 6 and len(groups["smear"]) == 2 and len(groups["embed"]) == 1
    muon_cfg = MuonConfig(matrix_lr=0.02, muon_momentum=0.99, muon_weight_decay=0.01, muon_variant="normuon",
                          normuon_rescale="paper")
    adam_cfg = AdamConfig(scalar_lr=0.03, tied_embed_lr=0.05, embed_lr=0.7, smear_lr=0.001)
    adam, muon = build_optimizers(model, muon_cfg, adam_cfg, control_patterns=control)
    lrs = {g["lr"]: len(g["params"]) for g in adam.param_groups}
    assert lrs == {0.05: 1, 0.03: 2 * 4 + 1, 0.001: 2}  # embed; 4 control tensors per block + skip_weights; smear
    assert muon.param_groups[0]["weight_decay"] == 0.01 and muon.variant == "normuon" and muon.rescale == "paper"
    assert all(g["base_lr"] == g["lr"] for opt in (adam, muon) for g in opt.param_groups)


def test_normuon_sharded_over_two_ranks_matches_one_process(monkeypatch):
    """Each matrix is orthogonalised (and keeps its NorMuon state) on rank index % 2 only; one SUM
    all-reduce shares the results. Two ranks run as threads with an in-memory all-reduce, for three
    steps, so the per-row EMA state must persist on the owning rank."""
    torch.manual_seed(7)
    shapes = [(8, 12), (12, 8), (6, 6), (10, 4), (4, 10)]
    params0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]

    def make(rank: int, world: int):
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        return params, Muon(params, lr=LR, momentum=MOMENTUM, backend_steps=5, weight_decay=0.1,
                            variant="normuon", rank=rank, world_size=world, ns_dtype=torch.float32)

    def run(params, opt):
        for g_step in grads:
            for p, g in zip(params, g_step):
                p.grad = g.clone()
            opt.step()

    single = make(0, 1)
    run(*single)

    barrier, deposits = threading.Barrier(2), {}

    def fake_all_reduce(t, op=None):
        deposits[threading.get_ident()] = t.clone()
        barrier.wait()
        t.copy_(sum(deposits.values()))
        barrier.wait()

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    ranks = [make(r, 2) for r in range(2)]
    threads = [threading.Thread(target=run, args=r) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, (p_single, p0, p1) in enumerate(zip(single[0], ranks[0][0], ranks[1][0])):
        assert torch.equal(p_single, p0) and torch.equal(p0, p1)
        owner, other = ranks[i % 2][1], ranks[1 - i % 2][1]
        assert "row_sq" in owner.state[ranks[i % 2][0][i]] and not other.state[ranks[1 - i % 2][0][i]]
