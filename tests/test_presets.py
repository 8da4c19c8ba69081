"""Presets: the seed stacks' values, exact full-size parameter counts, QAT coverage at full size, and
one training step of every preset at a tiny size."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pgolf.config import PRESETS, resolve
from pgolf.model import GPT, CastedLinear
from pgolf.quant import int6_weight_names, split_patterns
from pgolf.train import build_model, model_config, run
from tests.conftest import tiny_env

# The issue's / PR texts' values for the seed stacks (everything else is lineage, see config.py).
SEED_VALUES = {
    "seed137": dict(num_layers=9, model_dim=512, mlp_mult=3.0, train_seq_len=2048, train_batch_tokens=786_432,
                    muon_variant="normuon", muon_momentum=0.99, matrix_lr=0.02, muon_weight_decay=0.01,
                    grad_clip_norm=0.3, warmdown_iters=3000, logit_softcap=15.0, swa_every=200, qat=True,
                    qat_start_frac=0.0, quant_format="int6_zstd", fp16_passthrough_patterns="tok_emb",
                    eval_stride=64, smear_gate=False),
    "seed170": dict(num_layers=9, model_dim=512, mlp_mult=3.0, smear_gate=True, qat=True, qat_start_frac=0.0,
                    muon_weight_decay=0.01, quant_format="int6_zstd", fp16_passthrough_patterns="tok_emb",
                    eval_stride=64, eval_batch_seqs=32, muon_variant="muon", swa_every=0),
    "seed170-11l": dict(num_layers=11, model_dim=512, mlp_mult=3.0, smear_gate=True, qat=True,
                        muon_weight_decay=0.038, quant_format="int6_zstd", eval_stride=64),
}
# Exact parameter counts of the full-size models (the seeds report 21.8M for both 9-layer stacks).
FULL_PARAMS = {"baseline": 17_059_912, "smoke": 123_464, "seed137": 21_778_504, "seed170": 21_779_017,
               "seed170-11l": 26_502_233}


def param_formula(layers: int, dim: int, heads: int, kv_heads: int, mlp_mult: float, vocab: int, smear: bool) -> int:
    kv = dim // heads * kv_heads
    hidden = int(round(mlp_mult * dim))
    block = 2 * dim * dim + 2 * dim * kv + 2 * dim * hidden + 4 * dim + heads  # + attn/mlp scale, resid_mix, q_gain
    return layers * block + vocab * dim + min(layers // 2, layers - layers // 2) * dim + (dim + 1 if smear else 0)


def meta_model(cfg) -> GPT:
    with torch.device("meta"):
        return GPT(model_config(cfg))


@pytest.mark.parametrize("name", sorted(SEED_VALUES))
def test_seed_presets_carry_the_record_values(name):
    cfg = resolve(name, env={})
    assert {k: getattr(cfg, k) for k in SEED_VALUES[name]} == SEED_VALUES[name]


def test_seed170_11l_differs_from_seed170_only_in_depth_and_decay():
    diff = {k for k in PRESETS["seed170-11l"].keys() | PRESETS["seed170"].keys()
            if PRESETS["seed170-11l"].get(k) != PRESETS["seed170"].get(k)}
    assert diff == {"num_layers", "muon_weight_decay"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_parameter_count_is_exact(name):
    cfg = resolve(name, env={})
    n = sum(p.numel() for p in meta_model(cfg).parameters())
    assert n == FULL_PARAMS[name] == param_formula(cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads,
                                                   cfg.mlp_mult, cfg.vocab_size, cfg.smear_gate)


@pytest.mark.parametrize("name", ["seed137", "seed170", "seed170-11l"])
def test_full_size_qat_covers_every_attention_and_mlp_matrix(name):
    cfg = resolve(name, env={})
    with torch.device("meta"):
        model = build_model(cfg, torch.device("meta"))
    faked = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear) and m.qat}
    exported = int6_weight_names(model.state_dict(), split_patterns(cfg.control_tensor_name_patterns),
                                 split_patterns(cfg.fp16_passthrough_patterns))
    assert faked == exported and len(faked) == 6 * cfg.num_layers
    hidden = int(cfg.mlp_mult * cfg.model_dim)
    assert sum(model.get_parameter(n).numel() for n in faked) == cfg.num_layers * (786_432 + 2 * 512 * hidden)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_a_step_at_tiny_size(name, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    env = tiny_env(data_dir, tmp_path, RUN_ID=name, ITERATIONS=2, WARMDOWN_ITERS=1, VAL_MAX_TOKENS=2049,
                   TRAIN_BATCH_TOKENS=1024)
    env = {k: v for k, v in env.items() if k.isupper()}
    cfg = resolve(name, env=env)
    # Sizes come from the tiny overrides; every technique setting the preset names survives.
    untouched = {k: v for k, v in PRESETS[name].items() if k.upper() not in env}
    assert {k: getattr(cfg, k) for k in untouched} == untouched
    final = run(cfg)
    assert final["step_stop"] == 2
    assert final["model_params"] == param_formula(2, 64, 4, 2, cfg.mlp_mult, 512, cfg.smear_gate)
    run_dir = Path(tmp_path) / name
    log = (run_dir / "train.log").read_text()
    roundtrip = "final_int6_roundtrip" if cfg.quant_format == "int6_zstd" else "final_int8_zlib_roundtrip"
    assert re.search(rf"^{roundtrip}_exact val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}}$", log, re.M)
    assert Path(final["artifact"]).stat().st_size == final["bytes_model"]
    assert (f"smear_gate:{cfg.smear_gate} qat:{cfg.qat} muon_variant:{cfg.muon_variant}") in log
    assert ("final_sliding_window_exact" in log) == (cfg.eval_stride > 0)
    assert 0 < final["roundtrip_val_bpb"] < 4.0
