"""pgolf preflight: the first command on a rented GPU. It trains the seed170 preset (or --preset) for 50
steps on one GPU with the full CUDA path (compile, bf16 autocast, fused Adam, TF32, flash attention), runs
a short sliding-window eval and the artifact round trip, prints ms/step, MFU and peak memory, and fails
(exit 1) on any difference from the CPU path's behaviour:

- execution: on CUDA the run compiles and autocasts to bf16 (the `execution:` line);
- compiled = eager: the first steps' losses match an eager run of the same settings on the same device;
- training works: every loss finite, the last losses below the first;
- round trip: the artifact read back from disk scores within MAX_QUANT_GAP bpb of the trained model;
- sliding eval: it ran and scores no worse than the standard eval.

`--device cpu` is a dry run at a tiny size on the synthetic corpus (no data needed; the test suite runs it).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

CHECK_STEPS = 3  # steps compared between the compiled and the eager run
LOSS_TOLERANCE = 0.05  # |compiled - eager| per step, in nats (bf16 kernels differ in rounding, not in maths)
MAX_QUANT_GAP = 0.1  # bpb the round trip may lose against the trained model
GPU_SETTINGS = dict(iterations=50, max_wallclock_seconds=0.0, val_loss_every=0, train_log_every=10, warmup_steps=10,
                    val_max_tokens=262_145, progress="0")
CPU_SETTINGS = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=512, train_seq_len=64,
                    train_batch_tokens=4096, iterations=6, warmdown_iters=2, warmup_steps=0, eval_seq_len=64,
                    eval_stride=32, val_max_tokens=4097, val_batch_size=8192)


def settings(preset: str, device: str, flags: dict, data_dir: str | None) -> dict:
    """The preflight run's overrides: the GPU length, or the tiny CPU shape on the synthetic corpus."""
    out = {**GPU_SETTINGS, **(CPU_SETTINGS if device == "cpu" else {})}
    if data_dir:
        out.update(data_path=data_dir, tokenizer_path=str(Path(data_dir) / "tokenizer.model"))
    return {**out, **flags}


def checks(main: dict, eager: dict | None, execution: str, device: str) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for each behaviour the CUDA path must share with the CPU path."""
    losses = main["losses"]
    out = []
    if device == "cuda":
        out.append(("execution", "compile=1" in execution and "autocast=bf16" in execution, execution))
    if eager is not None:
        diff = max(abs(a - b) for a, b in zip(main["losses"][:CHECK_STEPS], eager["losses"][:CHECK_STEPS]))
        out.append(("compiled_equals_eager", diff <= LOSS_TOLERANCE, f"max |loss diff| {diff:.4f} over {CHECK_STEPS} steps"))
    falling = len(losses) > 1 and sum(losses[-2:]) / 2 < losses[0]
    out.append(("training", all(map(math.isfinite, losses)) and falling, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"))
    final = main["final"]
    gap = final["roundtrip_val_bpb"] - final["pre_quant_val_bpb"]
    out.append(("round_trip", math.isfinite(final["roundtrip_val_bpb"]) and gap <= MAX_QUANT_GAP,
                f"pre-quant {final['pre_quant_val_bpb']:.4f} round trip {final['roundtrip_val_bpb']:.4f} gap {gap:+.4f}"))
    sliding = final.get("sliding_val_bpb")
    out.append(("sliding_eval", sliding is not None and sliding <= final["roundtrip_val_bpb"] + 1e-3,
                f"sliding {sliding if sliding is None else round(sliding, 4)} vs standard {final['roundtrip_val_bpb']:.4f}"))
    return out


def run_one(preset: str, overrides: dict) -> dict:
    from pgolf.config import resolve
    from pgolf.runs import load_run
    from pgolf.train import run

    cfg = resolve(preset, env={"PATH": os.environ.get("PATH", "")}, flags=overrides)
    final = run(cfg)
    record = load_run(Path(final["run_dir"]))
    log = (Path(final["run_dir"]) / "train.log").read_text().splitlines()
    mfus = [m for m in record.series("train", "mfu")[2] if m]
    return dict(final=final, losses=record.series("train", "train_loss")[2], mfu=mfus[-1] if mfus else None,
                execution=next((line for line in log if line.startswith("execution:")), ""))


def preflight(preset: str, device: str, flags: dict, out_dir: str) -> int:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible; `pgolf preflight --device cpu` is the dry run")
    data_dir = None
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
        if "data_path" not in flags:
            from pgolf.synth import ensure_synthetic_dataset

            data_dir = str(Path(out_dir) / "synth")
            ensure_synthetic_dataset(data_dir, vocab_size=CPU_SETTINGS["vocab_size"])
    stamp = time.strftime("%Y%m%d_%H%M%S")
    base = {**settings(preset, device, flags, data_dir), "out_dir": out_dir}
    main = run_one(preset, {**base, "run_id": f"preflight_{stamp}"})
    eager = None
    if "compile=1" in main["execution"]:
        eager = run_one(preset, {**base, "run_id": f"preflight_{stamp}_eager", "compile": "0",
                                 "iterations": CHECK_STEPS, "eval_stride": 0, "val_max_tokens": 4097})
    final = main["final"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    mfu = "n/a" if main["mfu"] is None else f"{100 * main['mfu']:.1f}%"
    memory = "n/a" if peak is None else f"{peak:.0f} MiB"
    print(f"preflight: preset {preset} device {device} steps {final['step_stop']} "
          f"ms/step {final['train_time_ms'] / max(final['step_stop'], 1):.1f} mfu {mfu} peak_memory {memory}")
    results = checks(main, eager, main["execution"], device)
    for name, passed, detail in results:
        print(f"  {'PASS' if passed else 'FAIL'} {name}: {detail}")
    failed = [name for name, passed, _ in results if not passed]
    print("preflight: PASS" if not failed else f"preflight: FAIL ({', '.join(failed)})")
    return 1 if failed else 0


def preflight_command(argv: list[str]) -> int:
    from pgolf.options import command_parser, parse_with_settings

    parser = command_parser("pgolf preflight", __doc__, settings=True)
    parser.set_defaults(preset="seed170")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or the cpu dry run")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args, flags = parse_with_settings(parser, argv)
    if args.out:
        return preflight(args.preset, args.device, flags, args.out)
    with tempfile.TemporaryDirectory(prefix="pgolf_preflight_") as tmp:
        return preflight(args.preset, args.device, flags, tmp)
