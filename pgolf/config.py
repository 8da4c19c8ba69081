"""Hyperparameters: one flat set of settings, named presets, and the env/flag resolution.

Each setting is defined once, in the settings dataclass of the component it configures (GPTConfig in
model.py, MuonConfig/AdamConfig in optim.py, the run-level groups below); `Hyperparameters` inherits
them all, so the names stay one flat namespace: the challenge's env-var names in lower case, so
`NUM_LAYERS=11 pgolf train` works as it does with the reference script. Precedence, lowest first:
field default, preset (or a run's saved config), env vars (`NAME` or `PGOLF_NAME`), `--name=value`
flags. Unknown `PGOLF_*` env vars and unknown flags are errors. Only entry points read this;
components take their own settings dataclass or plain values.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, fields

from pgolf.coder import CoderSettings
from pgolf.gptq import GPTQSettings
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings
from pgolf.model import GPTConfig
from pgolf.optim import AdamConfig, MuonConfig
from pgolf.ttt import TTTSettings

ENV_PREFIX = "PGOLF_"
# Other spellings of a setting (the 1.0611 record's names for settings pgolf already had).
ALIASES = {"muon_wd": "muon_weight_decay"}
# Env vars with the project prefix that are not hyperparameters.
RESERVED_ENV = {"PGOLF_PRESET"}
DEFAULT_PRESET = "baseline"  # the packed train_gpt.py points this at its own preset


@dataclass
class DataSettings:
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # dir with fineweb_{train,val}_*.bin ("": pgolf train makes ./data/synth)
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # SentencePiece model of the shards
    run_id: str = ""  # empty: a fresh id per run
    out_dir: str = "runs"  # each run writes out_dir/run_id/
    seed: int = 1337  # torch and numpy seed


@dataclass
class TrainingSettings:
    iterations: int = 20_000  # optimizer steps (the wallclock cap usually stops earlier)
    warmdown_iters: int = 1200  # linear LR decay to 0 over the last N steps (placed by time under a cap)
    warmdown_frac: float = 0.0  # >0: decay over this last fraction of training progress instead (the record's)
    min_lr: float = 0.0  # floor of the LR multiplier during the warmdown (PR #1787: 0.1)
    warmup_steps: int = 20  # untimed compile warmup steps, state restored afterwards
    train_batch_tokens: int = 524_288  # global tokens per optimizer step
    train_seq_len: int = 1024  # tokens per training sequence
    max_wallclock_seconds: float = 600.0  # training time cap; 0 disables it
    grad_clip_norm: float = 0.0  # clip the global gradient norm; 0 disables
    enable_looping_at: float = 0.35  # depth recurrence (NUM_LOOPS > 0) switches on at this training fraction
    val_loss_every: int = 1000  # validate every N steps; 0: only the final validation
    train_log_every: int = 200  # train-loss log line every N steps (and the first 10)


@dataclass
class AveragingSettings:
    swa_every: int = 0  # SWA checkpoint every N steps during the warmdown; 0 disables SWA
    swa_start_frac: float = 0.0  # start this far into the warmdown (0 = its first step)
    swa_start_lr: float = 0.0  # >0: start once the LR multiplier falls below this instead
    ema_decay: float = 0.0  # >0: EMA of the weights, updated every step and applied before export


@dataclass
class ExportSettings:
    quant_format: str = "int8_zlib"  # int8_zlib (baseline) | int6_zstd (mixed int6/fp16, zstd-22)
    qat: bool = False  # STE fake-int6 on the matrices exported as int6
    qat_start_frac: float = 0.0  # fraction of training before QAT switches on
    fp16_passthrough_patterns: str = "tok_emb"  # int6_zstd: name patterns stored fp16
    control_tensor_name_patterns: str = (  # stored fp32 and trained by Adam (comma-separated name parts)
        "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,skip_weights,smear,"
        "skip_gates,lambdas,attn_gate"
    )


@dataclass
class EvalSettings:
    val_batch_size: int = 524_288  # global tokens per standard-eval batch
    val_max_tokens: int = 0  # 0: the whole val split; >0 truncates (smoke runs only)
    eval_stride: int = 0  # 0: no sliding-window eval; else score every target with stride S
    eval_seq_len: int = 0  # sliding-window length; 0: train_seq_len
    eval_batch_seqs: int = 32  # windows per forward in sliding eval (per rank)


@dataclass
class ExecutionSettings:
    compile: str = "auto"  # auto (on for CUDA) | 1 | 0
    autocast: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    progress: str = "auto"  # auto (when stdout is a terminal) | 1 | 0


# The settings groups, in the order `--help` and the docs list them.
GROUPS: list[tuple[str, type]] = [
    ("data and run", DataSettings), ("training", TrainingSettings), ("model", GPTConfig),
    ("Muon", MuonConfig), ("Adam", AdamConfig), ("averaging", AveragingSettings), ("export", ExportSettings),
    ("quantization", QuantSettings), ("GPTQ", GPTQSettings), ("LQER", LQERSettings), ("compression", CoderSettings),
    ("evaluation", EvalSettings), ("test-time training", TTTSettings), ("execution", ExecutionSettings),
]


@dataclass
class Hyperparameters(ExecutionSettings, TTTSettings, EvalSettings, CoderSettings, LQERSettings, GPTQSettings, QuantSettings,
                      ExportSettings, AveragingSettings, AdamConfig, MuonConfig, GPTConfig, TrainingSettings, DataSettings):
    """Every setting of a run, flat (fields come from the groups above)."""

    def part(self, group: type):
        """This run's values of one settings group, e.g. cfg.part(GPTConfig) for the model."""
        return group(**{f.name: getattr(self, f.name) for f in fields(group)})


def _preset(**kw) -> dict:
    return kw


# Presets are plain override dicts; every value is a documented field.
PRESETS: dict[str, dict] = {
    # The challenge baseline (train_gpt.py defaults), exactly.
    "baseline": _preset(),
    # Tiny CPU run on the offline synthetic corpus (`pgolf data synth`): about a minute on 2 cores.
    "smoke": _preset(
        data_path="", tokenizer_path="", vocab_size=1024, num_layers=2, model_dim=64, num_heads=4,
        num_kv_heads=2, train_seq_len=128, train_batch_tokens=8192, iterations=150, warmdown_iters=50,
        warmup_steps=0, val_loss_every=50, train_log_every=25, val_batch_size=16384,
        max_wallclock_seconds=0.0, matrix_lr=0.04, scalar_lr=0.04, tied_embed_lr=0.05,
    ),
    # Record PR #137 (val_bpb 1.1666): NorMuon + int6 STE QAT + MLP 3x + SWA + sliding eval, 9 x 512.
    # "PR #137" = the PR text (../shared/seeds); "§6.2" = reference-notes §6.2 (the MixedQuant
    # record this stack grew from), used where the PR text gives no value.
    "seed137": _preset(
        mlp_mult=3.0,  # PR #137: "MLP 3x expansion (hidden=1536): 21.8M params"
        train_seq_len=2048, train_batch_tokens=786_432,  # PR #137: seq_len=2048, batch=786K
        muon_variant="normuon",  # PR #137: per-neuron row-wise RMS normalisation after Newton-Schulz
        muon_momentum=0.99,  # PR #137
        muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500,  # §6.2: 0.92 -> 0.99 over 1500
        matrix_lr=0.02,  # PR #137
        scalar_lr=0.02, tied_embed_lr=0.03,  # §6.2 (SCALAR_LR 0.020, TIED_EMBED_LR 0.030)
        muon_weight_decay=0.01,  # PR #137: Muon WD=0.01
        grad_clip_norm=0.3,  # PR #137
        warmdown_iters=3000,  # PR #137
        logit_softcap=15.0,  # PR #137
        swa_every=200, swa_start_frac=0.0,  # PR #137: every 200 steps during warmdown
        quant_format="int6_zstd",  # PR #137: int6 per-row attn/MLP, fp16 tied embedding, zstd-22
        qat=True, qat_start_frac=0.0,  # PR #137: STE fake-int6 "throughout training"
        eval_stride=64,  # PR #137: sliding window eval, stride 64
        val_loss_every=0,  # §6.2: no periodic validation (saves training time)
    ),
    # Record PR #170 (val_bpb 1.1669): int6 STE QAT + SmearGate + Muon WD, 9 x 512. The PR text names
    # the techniques only; the rest is the lineage it extends: the SmearGate/MuonWD record (§6.3),
    # itself the MixedQuant record (§6.2) plus SmearGate, OrthoInit, BigramHash and Muon WD.
    "seed170": _preset(
        mlp_mult=3.0,  # PR #170: "14.77MB from 21.8M params" = 9 x 512 with MLP 3x (§6.2)
        smear_gate=True,  # PR #170: ~513 parameters, zero-initialised
        smear_lr=0.02,  # §6.3/§7.4: the gate trains in the scalar Adam group at 0.020
        muon_weight_decay=0.01,  # PR #170: decoupled Muon WD 0.01
        quant_format="int6_zstd",  # PR #170: int6-in-int8 + zstd-22, fp16 tied embedding
        qat=True, qat_start_frac=0.0,  # PR #170: STE fake int6 QAT; §6.3: on from step 0
        matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03,  # §6.2
        muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500,  # §6.2
        warmdown_iters=3000,  # §6.2
        eval_stride=64, eval_batch_seqs=32,  # PR #170: sliding window, stride 64, batch 32 seqs
        val_loss_every=0,  # §6.2
        # seq 1024, batch 524,288, softcap 30, no grad clip, no SWA: §6.2/§6.3 keep the baseline's
    ),
}
# PR #170's second run: 11 layers, Muon WD 0.038 (PR #170 text); everything else as seed170.
PRESETS["seed170-11l"] = {**PRESETS["seed170"], "num_layers": 11, "muon_weight_decay": 0.038}

# The 1.0611 record (PR #1855, openai/parameter-golf records/track_10min_16mb/
# 2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611): its training configuration, model and
# optimizer side. "README" = its README's tables and run command; "code" = a default of its
# train_gpt.py that the run command keeps. Where pgolf still differs (tokenizer data, GPTQ/LQER/
# per-group export, TTT): docs/techniques.md.
PRESETS["frontier"] = _preset(
    vocab_size=8192,  # README: VOCAB_SIZE=8192
    # README run command: the published CaseOps sp8192 data (val byte sidecar read by the evaluator)
    data_path="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
    tokenizer_path="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
    num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4,  # README: 11 x 512d, 8 GQA heads, 4 KV heads
    mlp_mult=4.0, mlp_negative_slope=0.5,  # README: MLP 4x (2048) with LeakyReLU(0.5)^2 (PR #493)
    xsa_last_n=11,  # README: XSA on all 11 layers (PR #478)
    rope_dims=16,  # README: partial RoPE 16/64 (PR #315); code: ROPE_YARN=0 (YaRN off)
    ln_scale=True,  # README: LN scale 1/sqrt(layer+1) (PR #315)
    qk_gain_init=5.0,  # README: QK gain init 5.0 (PR #1276)
    skip_gates_enabled=True,  # README: encoder-decoder skips + skip gates (PR #289)
    parallel_start_layer=8,  # README: 2-lane parallel decoder from layer 8 (PR #1530); code: mean of lanes
    num_loops=2, loop_start=3, loop_end=5, enable_looping_at=0.35,  # README: layers 3-5 run 3x once frac >= 0.35
    sparse_attn_gate_enabled=True, gate_window=12, sparse_attn_gate_scale=0.5,  # README: sparse gate (PR #1787)
    smear_gate_enabled=True,  # README: SMEAR_GATE_ENABLED=1, the BOS-fixed additive form (PR #1667 + the record)
    doc_mask=True,  # code: DocumentPackingLoader + varlen attention (PR #1530): no attention across documents
    fused_ce_enabled=True,  # README: FUSED_CE_ENABLED=1 (PR #1787)
    ortho_init=True,  # code: _init_weights (orthogonal q/k/v/up, zero output projections)
    logit_softcap=30.0,  # README: softcap 30
    train_seq_len=2048, train_batch_tokens=786_432, eval_seq_len=2048,  # code defaults
    iterations=20_000, max_wallclock_seconds=600.0, warmup_steps=20,  # README
    warmdown_frac=0.85, min_lr=0.1,  # README: WARMDOWN_FRAC=0.85, MIN_LR=0.1 (PR #1787)
    grad_clip_norm=0.3,  # README: GRAD_CLIP_NORM=0.3
    matrix_lr=0.026,  # README: MATRIX_LR=0.026 (PR #1586)
    muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500,  # code defaults
    muon_backend_steps=5, muon_ns="polar_express",  # README: Polar-Express Newton-Schulz, 5 steps (PR #1344)
    muon_row_normalize=True,  # code: MUON_ROW_NORMALIZE=1 (MuonEq-R, PR #1285 lineage)
    muon_weight_decay=0.095,  # code: MUON_WD=0.095
    tied_embed_lr=0.03, scalar_lr=0.02, smear_lr=0.02,  # README: Adam lr 0.03 (embedding) / 0.02 (scalars, smear)
    beta2=0.99,  # README: BETA2=0.99
    embed_wd=0.085, adam_wd=0.02,  # code: EMBED_WD=0.085, ADAM_WD=0.02 (AdamW)
    ema_decay=0.9965,  # README: EMA decay 0.9965
    val_loss_every=0, train_log_every=500,  # README: VAL_LOSS_EVERY=0; code: TRAIN_LOG_EVERY=500
    quant_format="int6_zstd", matrix_quant="gptq", matrix_bits=6,  # README: GPTQ int6 matrices
    embed_bits=7,  # README: EMBED_BITS=7 (int7 tied embedding)
    attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0,  # README: SD-clip k per group
    matrix_clip_sigmas=12.85,  # code: MATRIX_CLIP_SIGMAS default
    gated_attn_quant_gate=True,  # README: GATED_ATTN_QUANT_GATE=1
    gptq_calibration_batches=16, gptq_reserve_seconds=0.5,  # README: GPTQ_CALIBRATION_BATCHES=16, GPTQ_RESERVE_SECONDS=0.5
    lqer_enabled=True, lqer_rank=4, lqer_top_k=3, lqer_factor_bits=4,  # README: LQER rank 4 on the top 3, int4
    lqer_asym_enabled=True, lqer_asym_group=64,  # README: LQER_ASYM_ENABLED=1 LQER_ASYM_GROUP=64
    compressor="pergroup",  # README: COMPRESSOR=pergroup
)
# The frontier's techniques at the CPU bench shape (benchmarks/core.py: 4 x 256, 4/2 heads, seq 256,
# 16,384 tokens/step, vocab 1024, 60 steps): only sizes change; the loop (1-2) and the parallel start (3)
# are scaled to 4 layers and XSA covers all 4. EMA is off: at 0.9965 a 60-step average is still mostly
# the initialisation (the record's own script gave 3.58 bpb with it at this shape).
PRESETS["frontier-bench"] = {
    **PRESETS["frontier"], "vocab_size": 1024, "data_path": "./data/datasets/fineweb10B_sp1024",
    "tokenizer_path": "./data/tokenizers/fineweb_1024_bpe.model", "num_layers": 4, "model_dim": 256,
    "num_heads": 4, "num_kv_heads": 2, "train_seq_len": 256, "eval_seq_len": 256, "train_batch_tokens": 16_384,
    "iterations": 60, "max_wallclock_seconds": 0.0, "warmup_steps": 0, "loop_start": 1, "loop_end": 2,
    "parallel_start_layer": 3, "xsa_last_n": 4, "ema_decay": 0.0, "train_log_every": 10,
}

# One line per preset for `pgolf train --help` (a test keeps it in step with PRESETS).
PRESET_HELP: dict[str, str] = {
    "baseline": "the challenge's train_gpt.py exactly: 9x512, vocab 1024, seq 1024, int8+zlib, 600 s cap (needs data)",
    "smoke": "2x64 model on the offline synthetic corpus, 150 steps: a few minutes on 2 CPU cores, no data needed",
    "seed137": "record PR #137: MLP 3x, int6 STE QAT, NorMuon, Muon WD, SWA, seq 2048, int6+zstd, sliding eval",
    "seed170": "record PR #170: MLP 3x, int6 STE QAT, SmearGate, Muon WD 0.01, int6+zstd, sliding eval",
    "seed170-11l": "PR #170's second run: seed170 with 11 layers and Muon WD 0.038",
    "frontier": "the 1.0611 record's training stack: 11x512, MLP 4x, XSA, loop, lanes, EMA, Polar Express; vocab 8192",
    "frontier-bench": "the frontier stack at the CPU bench shape: 4x256, seq 256, 16,384 tokens/step, 60 steps",
}


def fill_run_defaults(values: dict) -> dict:
    """Model fields whose 0 means "from the run" get the run's value (the artifact stores the filled one)."""
    out = dict(values)
    if not out.get("rope_train_seq_len") and out.get("train_seq_len"):
        out["rope_train_seq_len"] = out["train_seq_len"]
    return out


class ConfigError(ValueError):
    pass


def _unknown(what: str, name: str, spell) -> ConfigError:
    """Unknown setting: suggest the closest names (not all of them) and where the full list is."""
    close = difflib.get_close_matches(name, FIELD_TYPES, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(spell, close))}? " if close else ""
    return ConfigError(f"unknown setting {what}; {hint}`pgolf train --help` lists every setting")


def _coerce(name: str, raw: str, typ: str):
    try:
        if typ == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ == "int":
            return int(float(raw)) if "e" in raw.lower() else int(raw.replace("_", ""))
        if typ == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {typ}") from None


FIELD_TYPES = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(Hyperparameters)}


def resolve_traced(preset: str | None = None, env: dict | None = None, flags: dict | None = None,
                   saved: dict | None = None) -> tuple[Hyperparameters, dict[str, str]]:
    """-> (settings, {field: where its value came from}) for every field not left at its default.

    Layers, lowest first: defaults, `saved` (a run's config.json, for commands that act on a run)
    or else the preset, env (NAME or PGOLF_NAME), flags. Unknown keys raise ConfigError naming them."""
    env = dict(os.environ if env is None else env)
    values: dict = {}
    origin: dict[str, str] = {}
    if saved is not None:
        values.update({k: v for k, v in saved.items() if k in FIELD_TYPES})
        origin.update({k: "saved config" for k in values})
    else:
        preset = preset or env.get("PGOLF_PRESET") or env.get("PRESET") or DEFAULT_PRESET
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        origin.update({k: f"preset {preset}" for k in PRESETS[preset]})
    for key, raw in env.items():
        if key.startswith(ENV_PREFIX) and key not in RESERVED_ENV:
            name = key[len(ENV_PREFIX):].lower()
            name = ALIASES.get(name, name)
            if name not in FIELD_TYPES:
                raise _unknown(f"in env var {key}", name, lambda n: ENV_PREFIX + n.upper())
            values[name], origin[name] = _coerce(key, raw, FIELD_TYPES[name]), f"env {key}"
    spellings = [(n, n) for n in FIELD_TYPES] + list(ALIASES.items())
    for spelling, name in spellings:
        if spelling.upper() in env:  # the challenge's unprefixed names
            key = spelling.upper()
            values[name], origin[name] = _coerce(key, env[key], FIELD_TYPES[name]), f"env {key}"
    for key, raw in (flags or {}).items():
        name = key.replace("-", "_").lower()
        name = ALIASES.get(name, name)
        if name not in FIELD_TYPES:
            raise _unknown(f"--{key}", name, lambda n: f"--{n}")
        values[name] = raw if not isinstance(raw, str) else _coerce(f"--{key}", raw, FIELD_TYPES[name])
        origin[name] = f"flag --{key}"
    cfg = Hyperparameters(**values)
    validate(cfg)
    return cfg, origin


def resolve(preset: str | None = None, env: dict | None = None, flags: dict | None = None,
            saved: dict | None = None) -> Hyperparameters:
    """Default < preset (or saved config) < env (NAME or PGOLF_NAME) < flags."""
    return resolve_traced(preset, env, flags, saved)[0]


def parse_flags(argv: list[str]) -> tuple[str | None, dict]:
    """Split `--preset P` / `--key=value` / `--key value` / `--set KEY=VALUE` into (preset, flags).

    `--set KEY=VALUE` is the same override spelled as the other commands used to spell it."""
    preset, flags, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--help":
            raise ConfigError(f"unexpected argument {arg!r}; settings are --key=value (--help lists them)")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            val, i = argv[i + 1], i + 1
        if key == "set":
            pair = val
            key, eq, val = pair.partition("=")
            if not eq or not key:
                raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set num_layers=11")
        if key == "preset":
            preset = val
        else:
            flags[key] = val
        i += 1
    return preset, flags


def validate(cfg: Hyperparameters) -> None:
    choices = {"quant_format": ("int8_zlib", "int6_zstd"), "compile": ("auto", "0", "1"),
               "autocast": ("auto", "bf16", "off"), "progress": ("auto", "0", "1")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name.upper()}={getattr(cfg, name)!r}; allowed: {', '.join(allowed)}")
    try:
        for group in (GPTConfig, MuonConfig):
            cfg.part(group).check()
        cfg.part(QuantSettings).validate(cfg.quant_format)
        for group in (GPTQSettings, LQERSettings, CoderSettings, TTTSettings):
            cfg.part(group).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train_batch_tokens % (8 * cfg.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} must be a multiple of "
                          f"8 * TRAIN_SEQ_LEN={8 * cfg.train_seq_len} (8 micro-batches per step)")
    if cfg.eval_stride < 0 or cfg.eval_stride > (cfg.eval_seq_len or cfg.train_seq_len):
        raise ConfigError(f"EVAL_STRIDE={cfg.eval_stride} must be in [0, eval seq len]")
    if cfg.qat and cfg.quant_format != "int6_zstd":
        raise ConfigError("QAT=1 fakes the int6 export; set QUANT_FORMAT=int6_zstd")
    if not 0.0 <= cfg.qat_start_frac < 1.0 or not 0.0 <= cfg.swa_start_frac < 1.0:
        raise ConfigError("QAT_START_FRAC and SWA_START_FRAC must be in [0, 1)")
    if not 0.0 <= cfg.warmdown_frac <= 1.0 or not 0.0 <= cfg.min_lr < 1.0 or not 0.0 <= cfg.enable_looping_at <= 1.0:
        raise ConfigError(f"WARMDOWN_FRAC={cfg.warmdown_frac} and ENABLE_LOOPING_AT={cfg.enable_looping_at} must be "
                          f"in [0, 1], MIN_LR={cfg.min_lr} in [0, 1)")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"EMA_DECAY={cfg.ema_decay} must be in [0, 1); 0 disables the EMA")
    if cfg.ema_decay and cfg.swa_every:
        raise ConfigError(f"EMA_DECAY={cfg.ema_decay} and SWA_EVERY={cfg.swa_every} are alternative weight "
                          "averages; set one of them to 0")


def to_dict(cfg: Hyperparameters) -> dict:
    return dataclasses.asdict(cfg)


# Per-run settings that never become a packed file's defaults.
RUN_SPECIFIC = ("run_id", "out_dir")


def preset_diff(cfg: Hyperparameters) -> dict:
    """Fields that differ from the field defaults, less per-run settings (a packed file's defaults)."""
    base = Hyperparameters()
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name) and f.name not in RUN_SPECIFIC}
