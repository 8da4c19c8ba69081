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
from pgolf.model import GPTConfig
from pgolf.train import build_model, run
from tests.conftest import tiny_env

SEEDS_DIR = Path(__file__).resolve().parents[2] / "shared" / "seeds"  # ../shared/seeds beside the repo
# Sentences quoted from the record PRs' texts (../shared/seeds/000_*.txt = PR #137, 003_*.txt = PR #170),
# and what each one fixes: (setting or derived fact, value parsed from the quote). The presets are
# checked against these quotes, and the quotes against the seed files whenever those are present.
SEED_QUOTES = {
    "seed137": [
        ("MLP 3x expansion (hidden=1536): 21.8M params.", {"mlp_mult": "3x", "hidden": "hidden=1536",
                                                          "params_m": "21.8M"}),
        ("Sliding window eval (stride=64): each token scored with nearly full context.", {"eval_stride": "stride=64"}),
        ("collects checkpoints every 200 steps during warmdown and averages them.", {"swa_every": "every 200"}),
        ("seq_len=2048, batch=786K, grad_clip=0.3, matrix_lr=0.02, Muon momentum=0.99, Muon WD=0.01, "
         "warmdown=3000 iters, logit softcap=15.",
         {"train_seq_len": "seq_len=2048", "train_batch_k": "batch=786K", "grad_clip_norm": "grad_clip=0.3",
          "matrix_lr": "matrix_lr=0.02", "muon_momentum": "momentum=0.99", "muon_weight_decay": "WD=0.01",
          "warmdown_iters": "warmdown=3000", "logit_softcap": "softcap=15"}),
        ("NorMuon optimizer: per-neuron row-wise RMS normalization after Newton-Schulz orthogonalization.",
         {"muon_variant": "NorMuon"}),
        ("int6 per-row on MLP and attention weights, fp16 passthrough for tied embedding, zstd-22 compression.",
         {"quant_format": "int6", "fp16_passthrough_patterns": "fp16 passthrough for tied embedding"}),
        ("weights fake-quantized to int6 via straight-through estimator throughout training.",
         {"qat": "straight-through", "qat_start_frac": "throughout training"}),
    ],
    "seed170": [
        ("9L 512dim int6 QAT with STE, SmearGate, Muon weight decay 0.01, int6-in-int8 zstd22 compression.",
         {"num_layers": "9L", "model_dim": "512dim", "qat": "QAT", "smear_gate": "SmearGate",
          "muon_weight_decay": "decay 0.01", "quant_format": "zstd22"}),
        ("Achieves 14.77MB from 21.8M params.", {"params_m": "21.8M"}),
        ("~513-param learned gate blending current + previous token embedding.", {"smear_params": "~513"}),
        ("Sliding window evaluation (stride=64, batch=32 seqs)", {"eval_stride": "stride=64",
                                                                  "eval_batch_seqs": "batch=32"}),
    ],
    "seed170-11l": [
        ("11-layer GPT with int6 QAT, SmearGate, and decoupled Muon weight decay 0.038.",
         {"num_layers": "11-layer", "muon_weight_decay": "decay 0.038", "smear_gate": "SmearGate", "qat": "QAT"}),
    ],
}
WORDS = {"NorMuon": "normuon", "int6": "int6_zstd", "zstd22": "int6_zstd", "SmearGate": True, "QAT": True,
         "straight-through": True, "throughout training": 0.0, "fp16 passthrough for tied embedding": "tok_emb"}


def parse_quoted(fragment: str):
    """The value a quoted fragment states: a word's meaning, or its number (786K -> 786,000; 21.8M -> 21.8)."""
    if fragment in WORDS:
        return WORDS[fragment]
    number = re.search(r"(\d+(?:\.\d+)?)([KM]?)", fragment)
    value = float(number.group(1))
    return value * 1000 if number.group(2) == "K" else value


def derived_facts(cfg) -> dict:
    with torch.device("meta"):
        model = GPT(cfg.part(GPTConfig))
    return {"hidden": model.blocks[0].mlp.fc.weight.shape[0],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_batch_k": cfg.train_batch_tokens,
            "smear_params": sum(p.numel() for n, p in model.named_parameters() if n.startswith("smear."))}


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
        return GPT(cfg.part(GPTConfig))


@pytest.mark.parametrize("name", sorted(SEED_QUOTES))
def test_seed_presets_match_the_quoted_record_texts(name):
    cfg = resolve(name, env={})
    facts = derived_facts(cfg)
    for quote, claims in SEED_QUOTES[name]:
        for key, fragment in claims.items():
            assert fragment in quote, (quote, fragment)
            stated, actual = parse_quoted(fragment), facts[key] if key in facts else getattr(cfg, key)
            if isinstance(stated, float):  # "21.8M", "786K" are rounded in the texts: 0.5% tolerance
                assert actual == pytest.approx(stated, rel=5e-3), (name, key, quote)
            else:
                assert actual == stated, (name, key, quote)


@pytest.mark.skipif(not SEEDS_DIR.is_dir(), reason="../shared/seeds not present")
def test_the_quotes_are_in_the_seed_texts():
    texts = {"seed137": (SEEDS_DIR / "000_1c07331b495b5a56.txt").read_text(),
             "seed170": (SEEDS_DIR / "003_dec0d24c4b34c7f2.txt").read_text()}
    texts["seed170-11l"] = texts["seed170"]
    for name, quotes in SEED_QUOTES.items():
        for quote, _ in quotes:
            assert quote in texts[name], (name, quote)


def test_seed170_11l_differs_from_seed170_only_in_depth_and_decay():
    diff = {k for k in PRESETS["seed170-11l"].keys() | PRESETS["seed170"].keys()
            if PRESETS["seed170-11l"].get(k) != PRESETS["seed170"].get(k)}
    assert diff == {"num_layers", "muon_weight_decay"}


SEED_PRESETS = sorted(FULL_PARAMS)  # the frontier presets' counts are checked in test_frontier.py


@pytest.mark.parametrize("name", SEED_PRESETS)
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
    layers = {}
    if PRESETS[name].get("num_loops"):  # the recurrence and the lanes, scaled to 4 layers as frontier-bench
        layers = dict(NUM_LAYERS=4, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3, XSA_LAST_N=4)
    env = tiny_env(data_dir, tmp_path, RUN_ID=name, ITERATIONS=2, WARMDOWN_ITERS=1, VAL_MAX_TOKENS=2049,
                   TRAIN_BATCH_TOKENS=1024, **layers)
    env = {k: v for k, v in env.items() if k.isupper()}
    cfg = resolve(name, env=env)
    # Sizes come from the tiny overrides; every technique setting the preset names survives.
    untouched = {k: v for k, v in PRESETS[name].items() if k.upper() not in env}
    assert {k: getattr(cfg, k) for k in untouched} == untouched
    final = run(cfg)
    assert final["step_stop"] == 2
    if name in FULL_PARAMS:
        assert final["model_params"] == param_formula(2, 64, 4, 2, cfg.mlp_mult, 512, cfg.smear_gate)
    run_dir = Path(tmp_path) / name
    log = (run_dir / "train.log").read_text()
    roundtrip = "final_int6_roundtrip" if cfg.quant_format == "int6_zstd" else "final_int8_zlib_roundtrip"
    assert re.search(rf"^{roundtrip}_exact val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}}$", log, re.M)
    assert Path(final["artifact"]).stat().st_size == final["bytes_model"]
    assert (f"smear_gate:{cfg.smear_gate} qat:{cfg.qat} muon_variant:{cfg.muon_variant}") in log
    assert ("final_sliding_window_exact" in log) == (cfg.eval_stride > 0)
    assert ("layer_loop:enabled step:1 frac:0.500 order:0,1,2,1,2,1,2,3" in log) == bool(cfg.num_loops)
    assert (f"ema:applied decay:{cfg.ema_decay} updates:2" in log) == bool(cfg.ema_decay)
    assert 0 < final["roundtrip_val_bpb"] < 4.0
