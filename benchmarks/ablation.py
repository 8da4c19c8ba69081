"""Ablation of the seed and frontier techniques on the core CPU benchmark; prints JSON lines and a table.

Every row trains benchmarks/core.py's fixed configuration (4 layers x 256, seq 256, 16,384 tokens
per step, 60 steps, warmdown 20, baseline learning rates) plus the row's settings:
- baseline; then each technique alone: int6_zstd (the int6 export, no QAT), qat (int6 STE QAT +
  int6 export), mlp3, normuon, muon_wd (0.01), swa (every 5 steps of the 20-step warmdown),
  smeargate, grad_clip (0.3), softcap (15);
- each frontier (1.0611 record) technique alone (FRONTIER_ROWS), sizes scaled to 4 layers;
- seed137 / seed170 / frontier-bench: the preset's technique settings on the benchmark's shape and step count.
  Shape and step-count fields (layers, width, heads, seq, batch, iterations, warmdown) come from
  the benchmark, SWA's 200-step interval becomes 5, sliding evaluation is off (every row reports the
  standard round trip), and the momentum warmup keeps the preset's 1,500 steps just as the baseline
  row keeps its 500 (neither is scaled to 60 steps).

Every row runs once per --seeds seed; the table gives the mean difference to the baseline of the same
seed. --equal-wallclock gives every row the baseline's training time instead of its step count.
Columns: post-round-trip val_bpb, quantization gap (round trip - pre-quant, pre-quant after SWA),
artifact bytes, ms/step, and the int6+zstd / int8+zlib byte ratio of the row's trained weights
serialized both ways.

    python benchmarks/ablation.py [--rows baseline,qat] [--iterations N] [--data DIR] [--key=value ...]
    python benchmarks/ablation.py --rows baseline,xsa --seeds 1337,42 [--equal-wallclock]
    python benchmarks/ablation.py --step-cost [--rows ...]   # no training: each row's training-step time

`--iterations N` is for a quick check: warmdown becomes max(2, N // 3) and the SWA interval a quarter of it.
Extra --key=value settings apply to every row (e.g. --val_max_tokens=16384).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import BENCH  # noqa: E402  (the core benchmark's fixed configuration)

SWA_EVERY = 5
TECHNIQUE_ROWS = {
    "baseline": {},
    "int6_zstd": {"quant_format": "int6_zstd"},
    "qat": {"quant_format": "int6_zstd", "qat": True},
    "mlp3": {"mlp_mult": 3.0},
    "normuon": {"muon_variant": "normuon"},
    "muon_wd": {"muon_weight_decay": 0.01},
    "swa": {"swa_every": SWA_EVERY},
    "smeargate": {"smear_gate": True},
    "grad_clip": {"grad_clip_norm": 0.3},
    "softcap": {"logit_softcap": 15.0},
}
# The frontier (1.0611 record) techniques, each alone on the baseline; sizes scaled to 4 layers.
FRONTIER_ROWS = {
    "leaky_relu2": {"mlp_negative_slope": 0.5},
    "mlp4": {"mlp_mult": 4.0},
    "xsa": {"xsa_last_n": 4},
    "partial_rope": {"rope_dims": 16},
    "ln_scale": {"ln_scale": True},
    "qk_gain5": {"qk_gain_init": 5.0},
    "skip_gates": {"skip_gates_enabled": True},
    "parallel": {"parallel_start_layer": 3},
    "loop": {"num_loops": 2, "loop_start": 1, "loop_end": 2},
    "sparse_gate": {"sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 0.5},
    "smear_add": {"smear_gate_enabled": True},
    "doc_mask": {"doc_mask": True},
    "ema": {"ema_decay": 0.9965},
    "polar_express": {"muon_ns": "polar_express"},
    "muoneq_r": {"muon_row_normalize": True},
    "warmdown_frac": {"warmdown_frac": 0.85, "min_lr": 0.1},
    "beta2": {"beta2": 0.99},
    "adamw_decay": {"embed_wd": 0.085, "adam_wd": 0.02},
    "fused_ce": {"fused_ce_enabled": True},
    "ortho_init": {"ortho_init": True},
}
TECHNIQUE_ROWS.update(FRONTIER_ROWS)
SEED_ROWS = ("seed137", "seed170", "frontier-bench")
# Preset fields that set the model's size or the run's length: the benchmark decides these.
SCALE_FIELDS = {"num_layers", "model_dim", "num_heads", "num_kv_heads", "train_seq_len", "train_batch_tokens",
                "iterations", "warmdown_iters", "val_loss_every", "eval_stride", "eval_batch_seqs", "swa_every",
                "vocab_size", "data_path", "tokenizer_path", "eval_seq_len", "max_wallclock_seconds", "warmup_steps",
                "train_log_every"}


def row_settings(row: str) -> dict:
    from pgolf.config import PRESETS

    if row in TECHNIQUE_ROWS:
        return dict(TECHNIQUE_ROWS[row])
    preset = PRESETS[row]
    settings = {k: v for k, v in preset.items() if k not in SCALE_FIELDS}
    if preset.get("swa_every"):
        settings["swa_every"] = SWA_EVERY
    return settings


def quick_settings(settings: dict, iterations: int | None) -> dict:
    if iterations is None:
        return settings
    warmdown = min(iterations, max(2, iterations // 3))  # >= 2 so some step runs at lr_mul < 1 (SWA)
    quick = {**settings, "iterations": iterations, "warmdown_iters": warmdown}
    if settings.get("swa_every"):
        quick["swa_every"] = max(1, warmdown // 4)
    return quick


def both_formats(state: dict, model_config: dict, cfg) -> dict:
    from pgolf.artifact import serialize
    from pgolf.quant import split_patterns

    control, keep = split_patterns(cfg.control_tensor_name_patterns), split_patterns(cfg.fp16_passthrough_patterns)
    int6 = len(serialize(state, model_config, "int6_zstd", control, keep)[0])
    int8 = len(serialize(state, model_config, "int8_zlib", control, keep)[0])
    return {"int6_zstd_bytes": int6, "int8_zlib_bytes": int8, "int6_over_int8": round(int6 / int8, 4)}


def run_row(row: str, settings: dict, args, extra: dict, seed: int, wallclock_s: float = 0.0) -> dict:
    from pgolf.artifact import load_artifact
    from pgolf.config import resolve
    from pgolf.train import run

    flags = {**{k: str(v) for k, v in BENCH.items()}, **{k: str(v) for k, v in settings.items()}, **extra}
    flags.update(data_path=args.data, tokenizer_path=args.tokenizer, out_dir="runs", seed=str(seed),
                 run_id=f"ablation_{row}_{seed}_{int(time.time())}")
    if wallclock_s:  # equal wallclock: as long as the baseline trained, steps uncapped, warmdown placed by time
        flags.update(max_wallclock_seconds=str(wallclock_s), iterations="100000")
    cfg = resolve("baseline", env={}, flags=flags)
    final = run(cfg)
    state = torch.load(Path(final["run_dir"]) / "final_model.pt", weights_only=True)  # the unquantized weights
    model_config = load_artifact(final["artifact"])[1]
    return {
        "row": row, "seed": seed, "settings": settings, "steps": final["step_stop"],
        "equal_wallclock_s": wallclock_s or None, "train_time_s": round(final["train_time_ms"] / 1000, 2),
        "ms_per_step": round(final["train_time_ms"] / final["step_stop"], 2),
        "pre_quant_val_bpb": round(final["pre_quant_val_bpb"], 5),
        "roundtrip_val_bpb": round(final["roundtrip_val_bpb"], 5),
        "quant_gap_bpb": round(final["roundtrip_val_bpb"] - final["pre_quant_val_bpb"], 5),
        "quant_format": final["quant_format"], "artifact_bytes": final["bytes_model"],
        "swa_checkpoints": final["swa_checkpoints"], "model_params": final["model_params"],
        **both_formats(state, model_config, cfg), "run_dir": final["run_dir"],
    }


def step_cost(rows: list[str], reps: int = 7) -> list[dict]:
    """Training-step time of each row at the benchmark shape, measured round robin in one process
    (forward + backward + optimizer step on one 2,048-token micro-batch, median of `reps`), so every row
    sees the same machine state; the ratio to the baseline row is the option's per-step price."""
    from pgolf.config import resolve
    from pgolf.optim import AdamConfig, MuonConfig, build_optimizers
    from pgolf.quant import split_patterns
    from pgolf.train import build_model

    runs = {}
    for row in ["baseline"] + [r for r in rows if r != "baseline"]:
        cfg = resolve("baseline", env={}, flags={**{k: str(v) for k, v in BENCH.items()}, **row_settings(row)})
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        model.set_looping(True)  # the loop's price: the recurrence is on for most of a frontier run
        opts = build_optimizers(model, cfg.part(MuonConfig), cfg.part(AdamConfig),
                                control_patterns=split_patterns(cfg.control_tensor_name_patterns))
        x = torch.randint(0, cfg.vocab_size, (BENCH["train_batch_tokens"] // 8 // BENCH["train_seq_len"],
                                              BENCH["train_seq_len"]))
        x[:, ::97] = 1  # a few document starts
        runs[row] = (model, opts, x, [])
    for _ in range(reps + 1):  # the first round warms caches and allocators; it is not counted
        for row, (model, opts, x, times) in runs.items():
            t0 = time.perf_counter()
            model(x, x).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            times.append(1000 * (time.perf_counter() - t0))
    median = {row: sorted(t[1:])[reps // 2] for row, (_, _, _, t) in runs.items()}
    return [{"row": row, "micro_step_ms": round(ms, 1), "vs_baseline": round(ms / median["baseline"], 3),
             "threads": torch.get_num_threads()} for row, ms in median.items()]


def markdown_table(results: list[dict]) -> str:
    """One line per row: round-trip val_bpb per seed and the mean difference to the baseline of the same seed."""
    base = {r["seed"]: r["roundtrip_val_bpb"] for r in results if r["row"] == "baseline"}
    lines = ["| row | round-trip val_bpb (per seed) | Δ vs baseline (mean) | quant gap | artifact bytes | steps "
             "| ms/step | int6+zstd / int8+zlib |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == row]
        deltas = [r["roundtrip_val_bpb"] - base[r["seed"]] for r in rs if r["seed"] in base]
        delta = f"{sum(deltas) / len(deltas):+.4f}" if deltas else ""
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        lines.append(f"| {row} | {' / '.join(format(r['roundtrip_val_bpb'], '.4f') for r in rs)} | {delta} "
                     f"| {mean('quant_gap_bpb'):+.4f} | {int(mean('artifact_bytes')):,} | {int(mean('steps'))} "
                     f"| {mean('ms_per_step'):.1f} | {mean('int6_over_int8'):.3f} |")
    return "\n".join(lines)


def main() -> int:
    all_rows = [*TECHNIQUE_ROWS, *SEED_ROWS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(all_rows), help="comma-separated subset of: " + ", ".join(all_rows))
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds; every row runs once per seed")
    parser.add_argument("--iterations", type=int, default=None, help="quick check: train N steps per row")
    parser.add_argument("--equal-wallclock", action="store_true",
                        help="run every row for the baseline's training time of the same seed (not its steps)")
    parser.add_argument("--data", default="../shared/data/fineweb_sp1024")
    parser.add_argument("--tokenizer", default="../shared/data/tokenizers/fineweb_1024_bpe.model")
    parser.add_argument("--step-cost", action="store_true", help="only time a training step of each row")
    args, rest = parser.parse_known_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in all_rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(all_rows)}")
    if args.step_cost:
        for line in step_cost(rows):
            print(json.dumps(line), flush=True)
        return 0
    from pgolf.config import parse_flags

    _, extra = parse_flags(rest)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(json.dumps({"benchmark": "ablation", "machine": f"{platform.processor() or platform.machine()} "
                      f"{os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}",
                      "bench": BENCH, "iterations": args.iterations, "seeds": seeds,
                      "equal_wallclock": args.equal_wallclock, "extra": extra}), flush=True)
    results = []
    for seed in seeds:
        base = None
        for row in (["baseline"] if args.equal_wallclock else []) + [r for r in rows if
                                                                       not (args.equal_wallclock and r == "baseline")]:
            wall = base["train_time_s"] if (args.equal_wallclock and base) else 0.0
            result = run_row(row, quick_settings(row_settings(row), args.iterations), args, extra, seed, wall)
            base = base or (result if row == "baseline" else None)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
