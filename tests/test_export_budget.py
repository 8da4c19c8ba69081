"""The v2 size prediction: a real export of a synthetic state, equal to export_artifact's bytes on the
same weights, and a calibration factor measured against a real artifact."""
from __future__ import annotations

import re

import torch

from pgolf import budget, export_budget
from pgolf.artifact import export_artifact
from pgolf.coder import CoderSettings
from pgolf.config import resolve
from pgolf.fileio import write_atomic
from pgolf.gptq import GPTQSettings
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings
from pgolf.model import GPT, GPTConfig
from pgolf.quant import split_patterns

SHAPE = dict(vocab_size=512, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2)
V2 = dict(quant_format="int6_zstd", embed_bits=7, attn_clip_sigmas=4.0, mlp_clip_sigmas=3.5, embed_clip_sigmas=5.0,
          lqer_enabled=1, lqer_top_k=2, compressor="pergroup", pergroup_row_sort=1)


def config(**kw):
    return resolve("baseline", env={}, flags={k: str(v) for k, v in {**SHAPE, **V2, **kw}.items()})


def exported(cfg, state) -> bytes:
    model = GPT(cfg.part(GPTConfig))
    model.load_state_dict(state)
    blob, _ = export_artifact(model, cfg.quant_format, split_patterns(cfg.control_tensor_name_patterns),
                              split_patterns(cfg.fp16_passthrough_patterns), cfg.part(QuantSettings),
                              cfg.part(GPTQSettings), cfg.part(LQERSettings), cfg.part(CoderSettings))
    return blob


def test_prediction_is_the_real_export_of_the_synthetic_state():
    cfg = config()
    assert export_budget.uses_v2(cfg) and not export_budget.uses_v2(resolve("baseline", env={}, flags=SHAPE))
    pred = export_budget.predict_config(cfg, seed=3)
    assert pred.bytes == len(exported(cfg, export_budget.synthetic_state(cfg.part(GPTConfig), seed=3)))
    assert pred.lqer_tensors == 2
    assert set(pred.groups) >= {"attn_qo", "mlp_up", "embed", "small"}
    # the settings move the bytes the way they should: a coarser grid and fewer bits are smaller
    coarse = export_budget.predict_config(config(attn_clip_sigmas=12.0, mlp_clip_sigmas=12.0), seed=3)
    narrow = export_budget.predict_config(config(matrix_bits=5), seed=3)
    assert coarse.bytes < pred.bytes and narrow.bytes < pred.bytes


def test_calibration_factor_is_real_over_predicted(tmp_path):
    cfg = config()
    control, keep = split_patterns(cfg.control_tensor_name_patterns), split_patterns(cfg.fp16_passthrough_patterns)
    same = tmp_path / "same.ptz"
    write_atomic(same, exported(cfg, export_budget.synthetic_state(cfg.part(GPTConfig), seed=0)))
    factor, detail = export_budget.calibrate(same, control, keep)
    assert factor == 1.0, detail
    # heavier tails than a Gaussian (Laplace): under SD-clip most levels sit near 0, so fewer bytes
    torch.manual_seed(1)
    laplace = {k: (torch.distributions.Laplace(0.0, 1.0).sample(v.shape) if v.is_floating_point() else v)
               for k, v in export_budget.synthetic_state(cfg.part(GPTConfig), seed=0).items()}
    heavy = tmp_path / "heavy.ptz"
    blob = exported(cfg, laplace)
    write_atomic(heavy, blob)
    factor, detail = export_budget.calibrate(heavy, control, keep)
    assert 0.5 < factor < 0.99, detail
    assert f"{len(blob):,} bytes real" in detail


def test_budget_command_predicts_v2_and_names_the_code_file(capsys, tmp_path):
    sets = [arg for k, v in {**SHAPE, **V2}.items() for arg in ("--set", f"{k}={v}")]
    assert budget.budget_command(["--preset", "baseline", *sets, "--compress"]) == 0
    out = capsys.readouterr().out
    assert "export v2: MATRIX_QUANT=rtn MATRIX_BITS=6 EMBED_BITS=7" in out and "COMPRESSOR=pergroup" in out
    synthetic = int(re.search(r"synthetic export: ([\d,]+) bytes", out).group(1).replace(",", ""))
    assert synthetic == export_budget.predict_config(config()).bytes
    total = re.search(r"model ([\d,]+) \+ code ([\d,]+) \((.+?)\) = total ([\d,]+) bytes", out)
    assert total.group(3) == "lzma-compressed train_gpt.py stub"
    model, code, whole = (int(total.group(i).replace(",", "")) for i in (1, 2, 4))
    assert model == synthetic and whole == model + code and code < 60_000


def test_calibrate_bytes_scales_by_the_presets_own_export(capsys, monkeypatch):
    from pgolf import config as config_module

    typed = config()
    monkeypatch.setitem(config_module.PRESETS, "tiny-v2", {**config_module.PRESETS["baseline"],
                                                           **{k: getattr(typed, k) for k in {**SHAPE, **V2}}})
    own = export_budget.predict_config(config()).bytes
    real = round(own * 0.9)
    assert budget.budget_command(["--preset", "tiny-v2", "--calibrate-bytes", str(real)]) == 0
    out = capsys.readouterr().out
    assert f"calibrated on {real:,} real bytes of preset tiny-v2's export vs {own:,} predicted" in out
    assert re.search(rf"^model {real:,} \+ code", out, re.M)  # the preset itself: exactly the real bytes
    assert budget.budget_command(["--preset", "tiny-v2", "--set", "num_layers=3", "--calibrate-bytes", str(real)]) == 0
    deeper = export_budget.predict_config(config(num_layers=3)).bytes
    assert re.search(rf"^model {round(deeper * real / own):,} \+ code", capsys.readouterr().out, re.M)
