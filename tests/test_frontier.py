"""The frontier (1.0611 record) model options: each against its formula or invariant, on tiny shapes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import ConfigError, resolve
from pgolf.layers import (LeakyReLUSquared, Rotary, SmearGateAdd, SparseAttnGate, apply_rotary, document_segments,
                          exclude_own_value)
from pgolf.loss import chunked_softcap_ce, plain_softcap_ce
from pgolf.model import GPT, GPTConfig, layer_order
from pgolf.optim import Muon, ns_coefficients, zeropower_newton_schulz

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
ALL_ON = dict(mlp_negative_slope=0.5, xsa_last_n=4, rope_dims=4, ln_scale=True, qk_gain_init=5.0,
              skip_gates_enabled=True, parallel_start_layer=3, num_loops=2, loop_start=1, loop_end=2,
              sparse_attn_gate_enabled=True, gate_window=6, sparse_attn_gate_scale=0.5, smear_gate_enabled=True,
              doc_mask=True, fused_ce_enabled=True, ortho_init=True)


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose zero-initialised tensors get values, so every part affects the output."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight") or "attn_gate" in name or "smear" in name or "skip_gates" in name:
                p.normal_(0, 0.3)
    return model


# ---- attention parts --------------------------------------------------------------------------------

def test_xsa_output_is_orthogonal_to_the_own_value_of_its_kv_head():
    torch.manual_seed(0)
    y, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 5, 8)  # 6 query heads share 3 kv heads (GQA 2:1)
    out = exclude_own_value(y, v)
    for h in range(6):
        own = F.normalize(v[:, h // 2], dim=-1)
        assert (out[:, h] * own).sum(-1).abs().max() < 1e-5  # nothing left along the own value
        # and only that component was removed: the rest of y is untouched
        assert torch.allclose(out[:, h] + (y[:, h] * own).sum(-1, keepdim=True) * own, y[:, h], atol=1e-5)


def test_partial_rope_leaves_the_unrotated_dims_unchanged_and_rotates_the_rest():
    rot = Rotary(head_dim=16, base=10000.0, dims=4)
    x = torch.randn(1, 2, 7, 16)
    cos, sin = rot(7, x.device)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # position 0: angle 0
    assert not torch.allclose(out[:, :, 1:, :4], x[:, :, 1:, :4])
    assert torch.allclose(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-5)  # a rotation
    full = apply_rotary(x, *Rotary(16, 10000.0)(7, x.device))
    assert not torch.equal(full[..., 4:], x[..., 4:])


def test_yarn_changes_only_contexts_longer_than_training():
    plain, yarn = Rotary(16, 10000.0, 8), Rotary(16, 10000.0, 8, yarn_from=32)
    assert all(torch.equal(a, b) for a, b in zip(plain(32, "cpu"), yarn(32, "cpu")))
    cos_p, _ = plain(64, "cpu")
    cos_y, _ = yarn(64, "cpu")
    base = 10000.0 * 2 ** (8 / 6)  # T / train = 2, d / (d - 2) = 8 / 6
    assert torch.allclose(cos_y[0, 0, 10, 1], torch.tensor(math.cos(10 * base ** (-2 / 8))), atol=1e-5)
    assert not torch.allclose(cos_p, cos_y)


def test_sparse_attn_gate_halves_at_init_and_gates_each_head_from_the_window():
    gate = SparseAttnGate(num_heads=3, window=4, scale=0.5)
    y, x = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 16)
    assert torch.equal(gate(y, x), 0.5 * y)
    with torch.no_grad():
        gate.w.normal_()
    x2 = x.clone()
    x2[..., 4:] += 10.0  # channels outside the window do not matter
    assert torch.equal(gate(y, x), gate(y, x2))
    g = torch.sigmoid(0.5 * x[..., :4] @ gate.w.T)  # (B, T, H)
    assert torch.allclose(gate(y, x), y * g.transpose(1, 2)[..., None], atol=1e-6)


def test_document_mask_packed_documents_score_as_if_alone():
    cfg = GPTConfig(**TINY, doc_mask=True)
    model = randomized(cfg).eval()
    a = torch.tensor([[1, 5, 9, 13, 22, 7]])
    b = torch.tensor([[1, 40, 3, 3, 17]])
    packed = model.logits(model.hidden(torch.cat([a, b], dim=1)))
    alone_a, alone_b = model.logits(model.hidden(a)), model.logits(model.hidden(b))
    assert torch.allclose(packed[:, :6], alone_a, atol=1e-5) and torch.allclose(packed[:, 6:], alone_b, atol=1e-5)
    plain = randomized(GPTConfig(**TINY)).eval()  # without the mask, the second document sees the first
    assert not torch.allclose(plain.logits(plain.hidden(torch.cat([a, b], 1)))[:, 6:], plain.logits(plain.hidden(b)),
                              atol=1e-3)
    assert document_segments(torch.tensor([[4, 1, 5, 1, 1]]), 1).tolist() == [[0, 1, 1, 2, 3]]


# ---- MLP, embedding mixers, skips, lanes, init ------------------------------------------------------

def test_leaky_relu_squared():
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5])
    assert torch.equal(LeakyReLUSquared(0.0)(x), torch.relu(x).square())
    assert torch.allclose(LeakyReLUSquared(0.5)(x), torch.tensor([1.0, 0.0625, 0.0, 2.25]))


def test_additive_smeargate_is_identity_at_init_and_never_touches_bos():
    gate = SmearGateAdd(window=3, bos_id=1)
    ids = torch.tensor([[1, 7, 9, 1, 5]])
    x = torch.randn(1, 5, 6)
    assert torch.equal(gate(x, ids), x)
    with torch.no_grad():
        gate.smear_w.normal_()
        gate.smear_lambda.fill_(0.7)
    out = gate(x, ids)
    assert torch.equal(out[:, [0, 3]], x[:, [0, 3]])  # document starts keep their own embedding
    g = 0.7 * torch.sigmoid(x[0, 2, :3] @ gate.smear_w[0])
    assert torch.allclose(out[0, 2], x[0, 2] + g * x[0, 1], atol=1e-6)


def test_gated_skips_lerp_and_off_is_plain_addition():
    torch.manual_seed(0)
    gated, plain = GPT(GPTConfig(**TINY, skip_gates_enabled=True)), GPT(GPTConfig(**TINY))
    x, s = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        gated.skip_gates.normal_()
    w, g = gated.skip_weights[0], torch.sigmoid(gated.skip_gates[0])
    assert torch.allclose(gated.add_skip(0, x, s), g * x + (1 - g) * w * s, atol=1e-6)
    assert torch.equal(plain.add_skip(0, x, s), x + plain.skip_weights[0] * s)


def test_parallel_lanes_follow_their_formula():
    cfg = GPTConfig(**TINY, parallel_start_layer=3)
    model = randomized(cfg)
    with torch.no_grad():
        model.lanes.parallel_resid_lambdas.normal_()
        model.lanes.parallel_post_lambdas.normal_()
    block, x0 = model.blocks[3], torch.randn(1, 4, 32)
    l0, l1 = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    a, m = block.attn_branch(block.mix(l0, x0), None), block.mlp_branch(l1)
    r, p = model.lanes.parallel_resid_lambdas[0], model.lanes.parallel_post_lambdas[0]
    n0, n1 = model.lanes.step(0, block, (l0, l1), x0, None)
    assert torch.allclose(n0, r[0] * l0 + p[0, 0] * a + p[1, 0] * m, atol=1e-5)
    assert torch.allclose(n1, r[1] * l1 + p[0, 1] * a + p[1, 1] * m, atol=1e-5)


def test_ln_scale_and_ortho_init():
    model = GPT(GPTConfig(**TINY, ln_scale=True, ortho_init=True))
    x = torch.randn(2, 32)
    for i, block in enumerate(model.blocks):
        assert torch.allclose(block.norm(x), F.rms_norm(x, (32,)) / math.sqrt(i + 1))
    w = model.blocks[0].attn.c_q.weight
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0


# ---- depth recurrence -----------------------------------------------------------------------------------

def test_layer_order_repeats_the_segment():
    cfg = GPTConfig(num_layers=11, num_loops=2, loop_start=3, loop_end=5)
    assert layer_order(cfg, looping=False) == list(range(11))
    assert layer_order(cfg, looping=True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]


def test_recurrence_changes_compute_not_parameters():
    model = randomized(GPTConfig(**TINY, num_loops=2, loop_start=1, loop_end=2))
    before = {n: p.numel() for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (1, 8))
    flat = model.hidden(x)
    calls = []
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in model.blocks]
    model.set_looping(True)
    looped = model.hidden(x)
    assert len(calls) == 8 and {n: p.numel() for n, p in model.named_parameters()} == before
    assert not torch.allclose(flat, looped, atol=1e-4)
    for h in hooks:
        h.remove()


def test_recurrence_switch_takes_effect_under_compile():
    """A compiled forward guards on the looping flag: flipping it after compiling must change the graph."""
    torch._dynamo.reset()
    model = randomized(GPTConfig(**TINY, num_loops=1, loop_start=1, loop_end=2))
    x = torch.randint(0, 64, (2, 8))
    compiled = torch.compile(model.hidden, fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(x), model.hidden(x), atol=1e-5)
    model.set_looping(True)
    eager_looped = model.hidden(x)
    assert torch.allclose(compiled(x), eager_looped, atol=1e-5)


# ---- loss and optimizer -----------------------------------------------------------------------------------

def test_chunked_ce_equals_plain_ce_and_its_gradients():
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    plain = plain_softcap_ce(h, w, t, 3.0)
    gh, gw = torch.autograd.grad(plain, (h, w))
    chunked = chunked_softcap_ce(h, w, t, 3.0, chunk=64)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    assert abs(chunked.item() - plain.item()) <= 1e-5 * plain.item()
    assert (ch - gh).abs().max() <= 1e-5 * gh.abs().max() and (cw - gw).abs().max() <= 1e-5 * gw.abs().max()


def test_polar_express_orthogonalises_at_least_as_well_as_the_quintic():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 96), (96, 32)]:
        g = torch.randn(*shape)
        err = {kind: (torch.linalg.svdvals(zeropower_newton_schulz(g, ns_coefficients(kind, 5), torch.float32))
                      - 1).abs().mean().item() for kind in ("quintic", "polar_express")}
        assert err["polar_express"] <= err["quintic"] and err["polar_express"] < 0.15, err


def test_muoneq_r_makes_the_update_blind_to_row_scales():
    torch.manual_seed(0)
    g = torch.randn(8, 12)
    scaled = g * torch.linspace(0.1, 10.0, 8)[:, None]
    updates = {}
    for name, grad in (("g", g), ("scaled", scaled)):
        for row_norm in (False, True):
            p = torch.nn.Parameter(torch.zeros(8, 12))
            p.grad = grad.clone()
            Muon([p], lr=1.0, momentum=0.0, backend_steps=5, row_normalize=row_norm, ns_dtype=torch.float32).step()
            updates[name, row_norm] = p.detach().clone()
    assert torch.allclose(updates["g", True], updates["scaled", True], atol=1e-5)
    assert not torch.allclose(updates["g", False], updates["scaled", False], atol=1e-3)


# ---- everything together ---------------------------------------------------------------------------------

def test_all_options_together_train_and_compile_fullgraph():
    """The whole frontier model (loop on), compiled with fullgraph=True under inductor (no graph breaks),
    gives the eager loss and gradients, and one optimizer step moves the weights."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **ALL_ON))
    model.set_looping(True)
    x = torch.randint(0, 64, (2, 16))
    x[:, [0, 9]] = 1  # two documents per row
    y = torch.randint(0, 64, (2, 16))
    eager = model(x, y)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    loss = torch.compile(model, fullgraph=True, dynamic=False)(x, y)
    assert abs(loss.item() - eager.item()) < 1e-4
    loss.backward()
    for (name, p), g in zip(model.named_parameters(), eager_grads):
        assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-5, rtol=1e-3), name
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.") and "gate" not in n]
    before = model.blocks[0].attn.proj.weight.detach().clone()  # zero at init, so the first step must move it
    Muon(matrices, lr=0.02, momentum=0.9, backend_steps=5, ns="polar_express", row_normalize=True,
         ns_dtype=torch.float32).step()
    assert not torch.equal(before, model.blocks[0].attn.proj.weight)


@pytest.mark.parametrize("settings, message", [
    (dict(num_loops=2, loop_start=2, loop_end=5), "LOOP_START=2..LOOP_END=5"),
    (dict(rope_dims=10), "ROPE_DIMS=10"),
    (dict(rope_dims=3), "ROPE_DIMS=3"),
    (dict(parallel_start_layer=2, num_loops=1, loop_start=1, loop_end=2), "must be after LOOP_END"),
    (dict(parallel_start_layer=9), "PARALLEL_START_LAYER=9"),
    (dict(smear_gate=True, smear_gate_enabled=True), "exclusive"),
    (dict(xsa_last_n=5), "XSA_LAST_N=5"),
])
def test_options_that_cannot_work_together_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve("baseline", env={}, flags={**{k: v for k, v in TINY.items()}, **settings})


def test_frontier_preset_is_the_record_model():
    cfg = resolve("frontier", env={})
    with torch.device("meta"):
        model = GPT(cfg.part(GPTConfig))
    # The record's log: model_params:35945671; its lane lambdas cover all 11 layers (66), pgolf's only the
    # 3 parallel ones (18).
    assert sum(p.numel() for p in model.parameters()) == 35_945_671 - 66 + 18
    bench = resolve("frontier-bench", env={})
    same = {k for k in ALL_ON if k not in ("gate_window", "xsa_last_n", "loop_start", "loop_end", "rope_dims",
                                            "parallel_start_layer")}
    assert {k: getattr(bench, k) for k in same} == {k: getattr(cfg, k) for k in same}


def test_adapter_hooks_reach_every_executed_slot():
    """Test-time training reuses the blocks: hidden(ids, adapters) asks adapters.slot(k) for every executed
    block (a repeated layer once per pass) and adds its deltas; zero deltas change nothing."""
    model = randomized(GPTConfig(**TINY, num_loops=2, loop_start=1, loop_end=2, parallel_start_layer=3))
    model.set_looping(True)
    x = torch.randint(0, 64, (2, 8))

    class Adapters:
        def __init__(self, scale):
            self.scale, self.slots = scale, []

        def slot(self, k):
            self.slots.append(k)
            return self

        def delta(self, x, out):
            return self.scale * x[..., :1].expand(*x.shape[:-1], out)

        q = o = mlp = lambda self, x: self.delta(x, 32)
        k = v = lambda self, x: self.delta(x, 16)
        head = lambda self, h: self.delta(h, 64)  # noqa: E731

    zero = Adapters(0.0)
    assert torch.equal(model.logits(model.hidden(x, zero), zero), model.logits(model.hidden(x)))
    assert zero.slots == list(range(len(layer_order(model.cfg, True))))  # 8 slots for 4 layers with the loop
    assert not torch.allclose(model.hidden(x, Adapters(0.1)), model.hidden(x), atol=1e-4)
