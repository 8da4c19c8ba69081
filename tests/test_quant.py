"""The int6 quantizer shared by QAT and export, the export formats, and the zstd requirement."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from pgolf.artifact import load_artifact, serialize
from pgolf.fileio import write_atomic
from pgolf.model import GPT, CastedLinear, GPTConfig, mark_qat, set_qat_gate
from pgolf.quant import (INT6_MAX, SMALL_TENSOR_NUMEL, export_kind, fake_quantize, int6_weight_names,
                         quantize_rows, quantize_state, split_patterns)

CONTROL = split_patterns("attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,"
                         "skip_weights,smear")
KEEP = ["tok_emb"]
TINY = GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3.0)


def noisy_model(cfg: GPTConfig = TINY, std: float = 0.05) -> GPT:
    """A model whose matrices are all non-zero (the zero-initialised projections included)."""
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, std)
    return model


def qat_model(cfg: GPTConfig = TINY) -> GPT:
    model = noisy_model(cfg)
    mark_qat(model, int6_weight_names(model.state_dict(), CONTROL, KEEP))
    set_qat_gate(model, True)
    return model


def test_int6_levels_scales_and_containers():
    torch.manual_seed(3)
    w = torch.randn(16, 96) * torch.logspace(-3, 1, 16)[:, None]  # rows over four decades of scale
    w[5, 7] = 40.0  # an outlier: with no clipping it sets its row's scale
    q, scale = quantize_rows(w, INT6_MAX)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (16,)
    assert int(q.min()) >= -31 and int(q.max()) <= 31
    # The largest |w| of every row lands on +-31 (the full 63-level range is used, never 32).
    assert torch.equal(q.abs().amax(dim=1), torch.full((16,), 31, dtype=torch.int8))
    assert torch.equal(scale, (w.abs().amax(dim=1) / 31).to(torch.float16))
    assert float(scale[5]) == pytest.approx(40.0 / 31, rel=1e-3)
    assert torch.equal(fake_quantize(w), q.float() * scale.float()[:, None])
    # Round to nearest: the error is at most half a step (scales are fp16-rounded first).
    assert float(((fake_quantize(w) - w).abs() / scale.float()[:, None]).max()) <= 0.5 + 1e-6
    # An all-zero row (a zero-initialised projection) stays exactly zero.
    q0, s0 = quantize_rows(torch.zeros(2, 8), INT6_MAX)
    assert int(q0.abs().max()) == 0 and float(s0.min()) > 0


def test_exported_int6_tensors_are_int8_with_fp16_scales():
    packed = quantize_state(noisy_model().state_dict(), "int6_zstd", CONTROL, KEEP)
    int6 = {n: e for n, e in packed.items() if e["kind"] == "int6"}
    assert len(int6) == 2 * 6  # c_q, c_k, c_v, attn.proj, mlp.fc, mlp.proj per block
    for e in int6.values():
        assert e["q"].dtype == torch.int8 and e["scale"].dtype == torch.float16
        assert -31 <= int(e["q"].min()) and int(e["q"].max()) <= 31


def test_export_kinds():
    big = torch.zeros(1024, 512)
    small = torch.zeros(64, 32)
    assert export_kind("tok_emb.weight", big, "int6_zstd", CONTROL, KEEP) == "fp16"
    assert export_kind("tok_emb.weight", big, "int8_zlib", CONTROL, KEEP) == "int8"
    assert export_kind("blocks.3.mlp.fc.weight", big, "int6_zstd", CONTROL, KEEP) == "int6"
    # Attention/MLP matrices are int6 at any size, so small models quantize what big ones do.
    assert export_kind("blocks.0.attn.c_k.weight", small, "int6_zstd", CONTROL, KEEP) == "int6"
    assert export_kind("blocks.0.attn.c_k.weight", small, "int8_zlib", CONTROL, KEEP) == "fp16"
    assert export_kind("blocks.8.attn.c_k.weight", big, "int6_zstd", CONTROL, KEEP + ["blocks.8.attn.c_k"]) == "fp16"
    assert export_kind("lm_head.weight", big, "int6_zstd", CONTROL, KEEP) == "int8"
    assert export_kind("blocks.0.resid_mix", torch.zeros(2, 512), "int6_zstd", CONTROL, KEEP) == "fp32"
    assert export_kind("smear.smear_gate", torch.zeros(512), "int6_zstd", CONTROL, KEEP) == "fp32"
    assert export_kind("odd.vector", torch.zeros(SMALL_TENSOR_NUMEL), "int6_zstd", CONTROL, KEEP) == "fp16"
    assert export_kind("odd.cube", torch.zeros(64, 64, 32), "int6_zstd", CONTROL, KEEP) == "int8_tensor"
    assert export_kind("steps", torch.zeros(3, dtype=torch.int64), "int6_zstd", CONTROL, KEEP) == "raw"


def test_qat_covers_exactly_the_int6_tensors():
    model = qat_model()
    faked = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear) and m.qat}
    packed = quantize_state(model.state_dict(), "int6_zstd", CONTROL, KEEP)
    exported = {n for n, e in packed.items() if e["kind"] == "int6"}
    assert faked == exported and len(faked) == 12
    # A pattern kept in fp16 leaves both sets together.
    keep = KEEP + ["blocks.1.attn.c_k"]
    names = int6_weight_names(model.state_dict(), CONTROL, keep)
    assert names == exported - {"blocks.1.attn.c_k.weight"}


def test_mark_qat_refuses_a_tensor_it_cannot_fake():
    with pytest.raises(ValueError, match="tok_emb.weight"):
        mark_qat(GPT(TINY), {"tok_emb.weight"})


def test_qat_forward_weight_is_the_exported_weight_bit_for_bit(tmp_path):
    """Train a few QAT steps, export, read back: the dequantized file equals what QAT trained against."""
    torch.manual_seed(0)
    model = qat_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    for _ in range(3):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blob, _ = serialize(state, model.cfg.to_dict(), "int6_zstd", CONTROL, KEEP)
    write_atomic(tmp_path / "m.int6.ptz", blob)
    loaded, _, fmt = load_artifact(tmp_path / "m.int6.ptz")
    assert fmt == "int6_zstd"
    names = int6_weight_names(state, CONTROL, KEEP)
    assert len(names) == 12
    for name in names:
        assert torch.equal(loaded[name], fake_quantize(state[name])), name
        assert not torch.equal(loaded[name], state[name])  # it really was quantized
    # The QAT linear's forward output is the plain linear at the exported weight, exactly.
    lin = model.blocks[0].mlp.fc
    h = torch.randn(5, 32)
    assert torch.equal(lin(h), F.linear(h, loaded["blocks.0.mlp.fc.weight"]))


def test_straight_through_gradient():
    torch.manual_seed(1)
    lin = CastedLinear(24, 10)
    torch.nn.init.normal_(lin.weight, std=0.3)
    lin.qat = True
    lin.qat_gate.fill_(1.0)
    plain_w = fake_quantize(lin.weight).requires_grad_(True)
    x = torch.randn(7, 24)
    target = torch.randn(7, 10)
    loss_qat = ((lin(x) - target) ** 3).sum()  # non-linear in the output: the grad depends on the weight used
    loss_plain = ((F.linear(x, plain_w) - target) ** 3).sum()
    loss_qat.backward()
    loss_plain.backward()
    assert torch.equal(loss_qat, loss_plain)
    assert torch.equal(lin.weight.grad, plain_w.grad)  # identity STE: d(fake_quant(w))/dw = I
    # Gate off: the plain linear at the unquantized weight.
    lin.qat_gate.fill_(0.0)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    assert not torch.equal(F.linear(x, lin.weight), F.linear(x, plain_w))


def test_qat_gate_flips_inside_a_compiled_model():
    """The switch is a buffer, so a model compiled with QAT off sees it turn on (one record's late
    QAT never ran because its switch was a Python class flag that the compiled graph had baked in)."""
    torch.manual_seed(2)
    model = noisy_model()
    mark_qat(model, int6_weight_names(model.state_dict(), CONTROL, KEEP))
    set_qat_gate(model, False)
    reference = noisy_model()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss_off = compiled(x, y)
    assert torch.equal(loss_off, reference(x, y))
    set_qat_gate(model, True)
    loss_on = compiled(x, y)
    with torch.no_grad():
        for name in int6_weight_names(model.state_dict(), CONTROL, KEEP):
            reference.get_parameter(name).copy_(fake_quantize(model.get_parameter(name)))
    assert torch.equal(loss_on, reference(x, y))
    assert float((loss_on - loss_off).abs().detach()) > 1e-5


def test_int6_zstd_is_at_most_80_percent_of_int8_zlib():
    """Same weights, both formats. Every matrix is over 65,536 entries (so int8_zlib quantizes it too)
    and rows reach |w| > 1 (so the baseline's 1/127 int8 scale floor does not coarsen int8 and
    shrink it artificially). Gaussian weights: int8 ~7.4 bits/entry after zlib, int6 ~5.5 after zstd."""
    torch.manual_seed(4)
    cfg = GPTConfig(vocab_size=128, num_layers=1, model_dim=384, num_heads=6, num_kv_heads=3, mlp_mult=2.0)
    state = noisy_model(cfg, std=0.5).state_dict()
    int6, _ = serialize(state, cfg.to_dict(), "int6_zstd", CONTROL, KEEP)
    int8, _ = serialize(state, cfg.to_dict(), "int8_zlib", CONTROL, KEEP)
    assert len(int6) <= 0.80 * len(int8), (len(int6), len(int8))  # measured: 804,739 vs 1,059,258 (0.76)


def test_missing_zstandard_is_an_error_not_a_zlib_fallback(monkeypatch, tmp_path):
    state = noisy_model().state_dict()
    blob, _ = serialize(state, TINY.to_dict(), "int6_zstd", CONTROL, KEEP)
    write_atomic(tmp_path / "m.int6.ptz", blob)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    with pytest.raises(RuntimeError, match="needs the `zstandard` package"):
        serialize(state, TINY.to_dict(), "int6_zstd", CONTROL, KEEP)
    # Reading: load_artifact may wrap the cause in its own ValueError; the message must still name it.
    with pytest.raises((RuntimeError, ValueError), match="needs the `zstandard` package"):
        load_artifact(tmp_path / "m.int6.ptz")
    int8, _ = serialize(state, TINY.to_dict(), "int8_zlib", CONTROL, KEEP)  # zlib needs no extra package
    assert int8.startswith(b"PGOLF1zlib-9\0")
