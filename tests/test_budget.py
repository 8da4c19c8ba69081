"""The byte-budget planner: exact parameter and stored-byte accounting, and predictions checked
against real serialized artifacts of known models."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pgolf import budget
from pgolf.artifact import serialize
from pgolf.fileio import write_atomic
from pgolf.config import resolve
from pgolf.model import GPT
from pgolf.quant import quantize_state, split_patterns
from pgolf.model import GPTConfig

TINY = dict(vocab_size=512, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
# dim 256: the MLP matrices (512 x 256) and the embedding (512 x 256) exceed the 65,536-entry
# small-tensor cut and get quantized; the 256 x 256 attention matrices stay fp16.
MID = dict(vocab_size=512, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2)


def config(fmt="int8_zlib", **kw):
    return resolve("baseline", env={}, flags={**kw, "quant_format": fmt})


def random_normal_artifact(cfg, path):
    """Serialize a model whose every float tensor is N(0, 1): the regime the normal basis assumes."""
    torch.manual_seed(123)
    model = GPT(cfg.part(GPTConfig))
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    blob, _ = serialize(state, model.cfg.to_dict(), cfg.quant_format, split_patterns(cfg.control_tensor_name_patterns),
                        split_patterns(cfg.fp16_passthrough_patterns))
    write_atomic(path, blob)
    return len(blob)


def test_tiny_model_params_and_stored_bytes_are_exact():
    cfg = config(**TINY)
    planner = budget.Planner(cfg)
    rows = {(r.role, r.kind): r for r in planner.class_rows(budget.model_shapes(cfg))}
    # 512 x 64 embedding; per layer q 64x64, k/v 32x64, proj 64x64; fc 128x64 + proj 64x128;
    # control per layer: attn_scale 64 + mlp_scale 64 + resid_mix 2x64 + q_gain 4, plus skip_weights 1x64
    assert {k: r.params for k, r in rows.items()} == {
        ("embedding", "fp16"): 32_768, ("attention", "fp16"): 2 * 12_288, ("mlp", "fp16"): 2 * 16_384,
        ("control", "fp32"): 2 * 260 + 64}
    assert sum(r.params for r in rows.values()) == 90_696 == sum(p.numel() for p in GPT(cfg.part(GPTConfig)).parameters())
    assert {k: r.tensors for k, r in rows.items()} == {("embedding", "fp16"): 1, ("attention", "fp16"): 8,
                                                       ("mlp", "fp16"): 4, ("control", "fp32"): 9}
    assert sum(r.stored for r in rows.values()) == 2 * (32_768 + 24_576 + 32_768) + 4 * 584


@pytest.mark.parametrize("fmt", ["int8_zlib", "int6_zstd"])
def test_stored_bytes_match_the_quantizer(fmt):
    cfg = config(fmt, **MID)
    state = GPT(cfg.part(GPTConfig)).state_dict()
    control, keep = split_patterns(cfg.control_tensor_name_patterns), split_patterns(cfg.fp16_passthrough_patterns)
    entries = quantize_state(state, fmt, control, keep)
    kinds = {e["kind"] for e in entries.values()}
    assert kinds == ({"fp16", "fp32", "int8"} if fmt == "int8_zlib" else {"fp16", "fp32", "int6"})
    for name, entry in entries.items():
        assert budget.stored_bytes(entry["kind"], state[name]) == len(budget.entry_bytes(entry)), name
    assert budget.stored_bytes("int8", torch.empty(512, 256, device="meta")) == 512 * 256 + 2 * 512


@pytest.mark.parametrize("fmt", ["int8_zlib", "int6_zstd"])
def test_prediction_matches_a_random_normal_artifact(fmt, tmp_path):
    cfg = config(fmt, **MID)
    actual = random_normal_artifact(cfg, tmp_path / "model.ptz")
    planner = budget.Planner(cfg)
    pred = budget.predict(planner, cfg, code=0)
    assert pred.params == 131_072 + 2 * (196_608 + 262_144 + 1_028) + 256
    assert abs(pred.model - actual) / actual < 0.01, (pred.model, actual)
    calibrated = budget.predict(budget.Planner(cfg, calibrate=str(tmp_path / "model.ptz")), cfg, code=0)
    assert abs(calibrated.model - actual) / actual < 0.005, (calibrated.model, actual)
    # the int6 levels carry ~5.4 bits of a normal's 63 levels; int8's 255 levels ~7.4 bits
    mlp = next(r for r in pred.rows if r.role == "mlp")
    bits = 8 * mlp.compressed / mlp.params
    assert (5.2 < bits < 5.7) if fmt == "int6_zstd" else (7.3 < bits < 7.7)


def test_largest_fitting_finds_the_boundary():
    calls = []
    assert budget.largest_fitting(lambda v: calls.append(v) or v <= 10**6, 1) == 10**6
    assert len(calls) < 60  # a stride-doubling search, not a scan
    assert budget.largest_fitting(lambda v: v <= 1000, 64, 64) == 960
    assert budget.largest_fitting(lambda v: v <= 1000, 1) == 1000
    assert budget.largest_fitting(lambda v: v <= 64, 64, 64) == 64
    assert budget.largest_fitting(lambda v: v <= 10, 64, 64) is None


def test_search_limits_stop_exactly_at_the_limit():
    cfg = config(**TINY)
    planner = budget.Planner(cfg)
    base = budget.predict(planner, cfg, code=50_000)
    per_tensor = base.container / len(budget.model_shapes(cfg))
    limit = base.total + 100_000
    found = budget.search_limits(planner, cfg, base, limit=limit)

    def total(**changes):
        return budget.predict(planner, replace(cfg, **changes), 50_000, per_tensor).total

    layers, hidden = found["num_layers"], found["mlp_hidden"]
    assert total(num_layers=layers) == found["layers_total"] <= limit < total(num_layers=layers + 1)
    assert total(mlp_mult=hidden / 64) == found["mlp_total"] <= limit < total(mlp_mult=(hidden + 64) / 64)
    assert layers > 2 and hidden > 128


def test_budget_command_reports_a_known_preset(capsys):
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    assert budget.budget_command(["--preset", "baseline", *sets, "--no-search"]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 64, MLP hidden 128, vocab 512, export int8_zlib (zlib-9)" in out
    model_line = next(line for line in out.splitlines() if line.startswith("model "))
    assert "90,696" in model_line
    assert "headroom" in out and "(OK)" in out


def test_calibrating_on_another_format_warns(tmp_path):
    random_normal_artifact(config("int8_zlib", **MID), tmp_path / "int8.ptz")
    assert budget.Planner(config("int8_zlib", **MID), calibrate=str(tmp_path / "int8.ptz")).warning == ""
    planner = budget.Planner(config("int6_zstd", **MID), calibrate=str(tmp_path / "int8.ptz"))
    assert planner.warning.startswith(f"warning: {tmp_path / 'int8.ptz'} is a int8_zlib artifact")
    assert planner.basis[("mlp", "int6")] == "calibrated on int8.ptz (int8_zlib artifact)"
