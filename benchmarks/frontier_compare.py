"""Faithfulness of the frontier stack: pgolf's `frontier-bench` preset against the 1.0611 record's own
train_gpt.py at the same shape, data, seed and step count; optionally pgolf's baseline preset too.

The record's script must first be ported to CPU with ../shared/tools/port_record.py and kept outside
this repository; pass its path. It runs at the bench shape (4 x 256, 4/2 heads, seq 256, 16,384
tokens/step, vocab 1024) with its README's run-command flags, the loop on layers 1-2, lanes from
layer 3, XSA on all 4 layers, EMA off and TTT off; WARMUP_STEPS=0 (its warmup restores the initial
state, so it changes nothing but the time), COMPRESSOR=brotli. Prints one JSON object per run and a
summary with the differences.

    python benchmarks/frontier_compare.py --record-port ../peer/record_cpu.py --steps 60 [--baseline]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(NUM_LAYERS=4, MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=256, EVAL_SEQ_LEN=256,
             TRAIN_BATCH_TOKENS=16384, VOCAB_SIZE=1024)
# The record README's run command, less data paths, TTT-only and CaseOps settings.
RECORD_FLAGS = dict(EMBED_BITS=7, MATRIX_LR=0.026, MIN_LR=0.1, MLP_CLIP_SIGMAS=11.5, ATTN_CLIP_SIGMAS=13.0,
                    EMBED_CLIP_SIGMAS=14.0, GRAD_CLIP_NORM=0.3, MUON_BACKEND_STEPS=5, WARMDOWN_FRAC=0.85, BETA2=0.99,
                    SPARSE_ATTN_GATE_SCALE=0.5, GPTQ_RESERVE_SECONDS=0.5, GPTQ_CALIBRATION_BATCHES=16,
                    VAL_LOSS_EVERY=0, GATED_ATTN_QUANT_GATE=1, SPARSE_ATTN_GATE_ENABLED=1, GATE_WINDOW=12,
                    SMEAR_GATE_ENABLED=1, LQER_ENABLED=1, LQER_ASYM_ENABLED=1, LQER_RANK=4, LQER_FACTOR_BITS=4,
                    LQER_ASYM_GROUP=64, LQER_TOP_K=3, FUSED_CE_ENABLED=1)
BENCH_SCALING = dict(LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3, XSA_LAST_N=4, EMA_DECAY=0.0, TTT_ENABLED=0,
                     CASEOPS_ENABLED=0, WARMUP_STEPS=0, COMPRESSOR="brotli", MAX_WALLCLOCK_SECONDS=0)


def record_run(port: Path, steps: int, seed: int, data: str, tokenizer: str) -> dict:
    env = {**os.environ, **{k: str(v) for k, v in {**SHAPE, **RECORD_FLAGS, **BENCH_SCALING}.items()},
           "ITERATIONS": str(steps), "SEED": str(seed), "DATA_PATH": str(Path(data).resolve()),
           "TOKENIZER_PATH": str(Path(tokenizer).resolve()),
           "TRAIN_LOG_EVERY": "10"}
    with tempfile.TemporaryDirectory() as tmp:
        env["TTT_COUNTER_DIR"] = tmp
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(port.resolve())], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{port}: failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = proc.stdout

    def bpb(label: str) -> float:
        return float(re.search(rf"{label} val_loss:\S+ val_bpb:(\S+)", out).group(1))

    steps_avg = [float(m) for m in re.findall(r"step_avg:(\d+\.\d+)ms", out)]
    return {"run": "record_port", "steps": steps, "seed": seed, "pre_quant_val_bpb": bpb("diagnostic pre-quantization post-ema"),
            "roundtrip_val_bpb": bpb("diagnostic quantized"), "ms_per_step": steps_avg[-1] if steps_avg else None,
            "model_params": int(re.search(r"model_params:(\d+)", out).group(1)), "wall_s": round(wall, 1)}


def pgolf_run(preset: str, steps: int, seed: int, data: str, tokenizer: str) -> dict:
    from pgolf.config import resolve
    from pgolf.train import run

    flags = {k.lower(): str(v) for k, v in SHAPE.items()}
    flags.update(iterations=str(steps), seed=str(seed), data_path=data, tokenizer_path=tokenizer, progress="0",
                 out_dir="runs", run_id=f"compare_{preset}_{steps}_{seed}_{int(time.time())}", val_loss_every="0",
                 max_wallclock_seconds="0", warmup_steps="0")
    if preset == "baseline":
        flags["warmdown_iters"] = str(max(1, steps // 3))  # the core benchmark's 20 of 60
    t0 = time.perf_counter()
    final = run(resolve(preset, env={"PATH": os.environ.get("PATH", "")}, flags=flags))
    return {"run": f"pgolf_{preset}", "steps": steps, "seed": seed, "pre_quant_val_bpb": round(final["pre_quant_val_bpb"], 5),
            "roundtrip_val_bpb": round(final["roundtrip_val_bpb"], 5),
            "ms_per_step": round(final["train_time_ms"] / final["step_stop"], 1), "model_params": final["model_params"],
            "wall_s": round(time.perf_counter() - t0, 1), "run_dir": final["run_dir"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record-port", type=Path, help="the record's train_gpt.py ported by port_record.py")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--baseline", action="store_true", help="also run pgolf's baseline preset")
    p.add_argument("--skip-pgolf", action="store_true", help="only the record's script")
    p.add_argument("--data", default="../shared/data/fineweb_sp1024")
    p.add_argument("--tokenizer", default="../shared/data/tokenizers/fineweb_1024_bpe.model")
    args = p.parse_args()
    results = []
    if args.record_port:
        results.append(record_run(args.record_port, args.steps, args.seed, args.data, args.tokenizer))
        print(json.dumps(results[-1]), flush=True)
    for preset in ([] if args.skip_pgolf else ["frontier-bench"]) + (["baseline"] if args.baseline else []):
        results.append(pgolf_run(preset, args.steps, args.seed, args.data, args.tokenizer))
        print(json.dumps(results[-1]), flush=True)
    by = {r["run"]: r for r in results}
    if "record_port" in by and "pgolf_frontier-bench" in by:
        ours, theirs = by["pgolf_frontier-bench"], by["record_port"]
        print(json.dumps({"summary": "frontier-bench vs record", "steps": args.steps,
                          "roundtrip_diff": round(ours["roundtrip_val_bpb"] - theirs["roundtrip_val_bpb"], 4),
                          "pre_quant_diff": round(ours["pre_quant_val_bpb"] - theirs["pre_quant_val_bpb"], 4),
                          "ms_per_step_ratio": round(ours["ms_per_step"] / theirs["ms_per_step"], 3)
                          if theirs["ms_per_step"] else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
