"""Ablation of the seed techniques on the core CPU benchmark; prints JSON lines and a markdown table.

Every row trains benchmarks/core.py's fixed configuration (4 layers x 256, seq 256, 16,384 tokens
per step, 60 steps, warmdown 20, baseline learning rates) plus the row's settings:
- baseline; then each technique alone: int6_zstd (the int6 export, no QAT), qat (int6 STE QAT +
  int6 export), mlp3, normuon, muon_wd (0.01), swa (every 5 steps of the 20-step warmdown),
  smeargate, grad_clip (0.3), softcap (15);
- seed137 / seed170: the preset's technique settings on the benchmark's shape and step count.
  Shape and step-count fields (layers, width, heads, seq, batch, iterations, warmdown) come from
  the benchmark, SWA's 200-step interval becomes 5, sliding evaluation is off (every row reports the
  standard round trip), and the momentum warmup keeps the preset's 1,500 steps just as the baseline
  row keeps its 500 (neither is scaled to 60 steps).

Columns: post-round-trip val_bpb, quantization gap (round trip - pre-quant, pre-quant after SWA),
artifact bytes, ms/step, and the int6+zstd / int8+zlib byte ratio of the row's trained weights
serialized both ways.

    python benchmarks/ablation.py [--rows baseline,qat] [--iterations N] [--data DIR] [--key=value ...]
    python benchmarks/ablation.py --qat-cost    # no training: QAT's forward+backward overhead only

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
SEED_ROWS = ("seed137", "seed170")
# Preset fields that set the model's size or the run's length: the benchmark decides these.
SCALE_FIELDS = {"num_layers", "model_dim", "num_heads", "num_kv_heads", "train_seq_len", "train_batch_tokens",
                "iterations", "warmdown_iters", "val_loss_every", "eval_stride", "eval_batch_seqs", "swa_every"}


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


def run_row(row: str, settings: dict, args, extra: dict) -> dict:
    from pgolf.artifact import load_artifact
    from pgolf.config import resolve
    from pgolf.train import run

    flags = {**{k: str(v) for k, v in BENCH.items()}, **{k: str(v) for k, v in settings.items()}, **extra}
    flags.update(data_path=args.data, tokenizer_path=args.tokenizer, out_dir="runs",
                 run_id=f"ablation_{row}_{int(time.time())}")
    cfg = resolve("baseline", env={}, flags=flags)
    final = run(cfg)
    state = torch.load(Path(final["run_dir"]) / "final_model.pt", weights_only=True)  # the unquantized weights
    model_config = load_artifact(final["artifact"])[1]
    return {
        "row": row, "settings": settings, "steps": final["step_stop"],
        "ms_per_step": round(final["train_time_ms"] / final["step_stop"], 2),
        "pre_quant_val_bpb": round(final["pre_quant_val_bpb"], 5),
        "roundtrip_val_bpb": round(final["roundtrip_val_bpb"], 5),
        "quant_gap_bpb": round(final["roundtrip_val_bpb"] - final["pre_quant_val_bpb"], 5),
        "quant_format": final["quant_format"], "artifact_bytes": final["bytes_model"],
        "swa_checkpoints": final["swa_checkpoints"], "model_params": final["model_params"],
        **both_formats(state, model_config, cfg), "run_dir": final["run_dir"],
    }


def qat_cost(reps: int = 7) -> dict:
    """Forward+backward time of one 2,048-token micro-batch at the benchmark shape, QAT off vs on
    (interleaved, median of `reps`): the per-step price of fake-quantizing every int6 matrix."""
    from pgolf.model import GPT, GPTConfig, mark_qat, set_qat_gate
    from pgolf.quant import int6_weight_names, split_patterns
    from pgolf.config import Hyperparameters

    defaults = Hyperparameters()
    cfg = GPTConfig(vocab_size=BENCH["vocab_size"], num_layers=BENCH["num_layers"], model_dim=BENCH["model_dim"],
                    num_heads=BENCH["num_heads"], num_kv_heads=BENCH["num_kv_heads"])
    models = {}
    for qat in (False, True):
        torch.manual_seed(0)
        models[qat] = GPT(cfg)
        if qat:
            names = int6_weight_names(models[qat].state_dict(), split_patterns(defaults.control_tensor_name_patterns),
                                      split_patterns(defaults.fp16_passthrough_patterns))
            mark_qat(models[qat], names)
            set_qat_gate(models[qat], True)
    x = torch.randint(0, cfg.vocab_size, (BENCH["train_batch_tokens"] // 8 // BENCH["train_seq_len"],
                                          BENCH["train_seq_len"]))
    times = {False: [], True: []}
    for _ in range(reps):
        for qat, model in models.items():
            t0 = time.perf_counter()
            model(x, x).backward()
            times[qat].append(1000 * (time.perf_counter() - t0))
    off, on = (sorted(times[q])[reps // 2] for q in (False, True))
    return {"benchmark": "qat_cost", "threads": torch.get_num_threads(), "fwd_bwd_ms_no_qat": round(off, 1),
            "fwd_bwd_ms_qat": round(on, 1), "qat_overhead": round(on / off - 1, 4)}


def markdown_table(results: list[dict]) -> str:
    base = next((r["roundtrip_val_bpb"] for r in results if r["row"] == "baseline"), None)
    lines = ["| row | round-trip val_bpb | vs baseline | quant gap | artifact bytes | format | ms/step "
             "| int6+zstd / int8+zlib |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        delta = "" if base is None else f"{r['roundtrip_val_bpb'] - base:+.4f}"
        lines.append(f"| {r['row']} | {r['roundtrip_val_bpb']:.4f} | {delta} | {r['quant_gap_bpb']:+.4f} "
                     f"| {r['artifact_bytes']:,} | {r['quant_format']} | {r['ms_per_step']:.1f} "
                     f"| {r['int6_over_int8']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join([*TECHNIQUE_ROWS, *SEED_ROWS]),
                        help="comma-separated subset of: " + ", ".join([*TECHNIQUE_ROWS, *SEED_ROWS]))
    parser.add_argument("--iterations", type=int, default=None, help="quick check: train N steps per row")
    parser.add_argument("--data", default="../shared/data/fineweb_sp1024")
    parser.add_argument("--tokenizer", default="../shared/data/tokenizers/fineweb_1024_bpe.model")
    parser.add_argument("--qat-cost", action="store_true", help="only time forward+backward with and without QAT")
    args, rest = parser.parse_known_args()
    if args.qat_cost:
        print(json.dumps(qat_cost()))
        return 0
    from pgolf.config import parse_flags

    _, extra = parse_flags(rest)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in TECHNIQUE_ROWS and r not in SEED_ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join([*TECHNIQUE_ROWS, *SEED_ROWS])}")
    print(json.dumps({"benchmark": "ablation", "machine": f"{platform.processor() or platform.machine()} "
                      f"{os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}",
                      "bench": BENCH, "iterations": args.iterations, "extra": extra}), flush=True)
    results = []
    for row in rows:
        result = run_row(row, quick_settings(row_settings(row), args.iterations), args, extra)
        results.append(result)
        print(json.dumps(result), flush=True)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
