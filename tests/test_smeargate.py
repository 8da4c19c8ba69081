"""SmearGate: identity at init, the blend formula, and no leak across a BOS (document start)."""
from __future__ import annotations

import torch

from pgolf.layers import SmearGate
from pgolf.model import GPT, GPTConfig
from pgolf.optim import split_params
from pgolf.quant import quantize_state

DIM = 8
BOS_ID = 1
# Two documents in one row: BOS at positions 0 and 4.
IDS = torch.tensor([[BOS_ID, 7, 9, 11, BOS_ID, 5, 6, 13]])


def trained_gate(seed: int = 0) -> SmearGate:
    torch.manual_seed(seed)
    gate = SmearGate(DIM, BOS_ID)
    with torch.no_grad():
        gate.smear_gate.normal_(0.0, 2.0)
        gate.smear_lambda.fill_(0.8)
    return gate


def test_identity_at_init():
    gate = SmearGate(DIM, BOS_ID)
    assert sum(p.numel() for p in gate.parameters()) == DIM + 1
    x = torch.randn(2, 8, DIM)
    ids = torch.randint(0, 50, (2, 8))
    assert torch.equal(gate(x, ids), x)


def test_gpt_with_an_untrained_gate_equals_the_gpt_without_one():
    cfg = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
    torch.manual_seed(1)
    plain = GPT(GPTConfig(**cfg))
    smeared = GPT(GPTConfig(**cfg, smear_gate=True))
    missing = smeared.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["smear.smear_gate", "smear.smear_lambda"]
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    assert torch.equal(smeared(x, y), plain(x, y))
    assert sum(p.numel() for p in smeared.parameters()) - sum(p.numel() for p in plain.parameters()) == 32 + 1


def test_blend_formula_with_trained_parameters():
    gate = trained_gate()
    x = torch.randn(1, 8, DIM)
    out = gate(x, IDS)
    a = 0.8 * torch.sigmoid(gate.smear_gate)
    for t in (1, 2, 3, 5, 6, 7):  # not BOS: (1 - a) * x_t + a * x_{t-1}
        assert torch.allclose(out[0, t], (1 - a) * x[0, t] + a * x[0, t - 1], atol=1e-6)
    for t in (0, 4):  # BOS: the previous-token term is zero
        assert torch.allclose(out[0, t], (1 - a) * x[0, t], atol=1e-6)


def test_no_leak_across_bos_even_when_trained():
    gate = trained_gate(seed=2)
    x = torch.randn(1, 8, DIM)
    changed = x.clone()
    changed[0, 3] += 10.0  # the last token of document 1
    out, out_changed = gate(x, IDS), gate(changed, IDS)
    assert torch.equal(out[0, 4:], out_changed[0, 4:])  # document 2 (from its BOS on) is untouched
    assert not torch.equal(out[0, 3], out_changed[0, 3])
    # Without the BOS the same change would have reached position 4: the mask is doing the work.
    no_bos = IDS.clone()
    no_bos[0, 4] = 2
    assert not torch.equal(gate(x, no_bos)[0, 4], gate(changed, no_bos)[0, 4])


def test_gate_gradients_routing_and_export():
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, smear_gate=True))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model(x, y).backward()
    # At init only lambda gets a gradient (the gate's is multiplied by lambda = 0), so it opens first.
    assert float(model.smear.smear_lambda.grad.abs()) > 0
    assert torch.equal(model.smear.smear_gate.grad, torch.zeros(32))
    groups = split_params(model, ["attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear"])
    assert [p.shape for p in groups["smear"]] == [torch.Size([32]), torch.Size([])]
    packed = quantize_state(model.state_dict(), "int6_zstd", ["smear"], ["tok_emb"])
    assert packed["smear.smear_gate"]["kind"] == "fp32" and packed["smear.smear_lambda"]["kind"] == "fp32"
