"""Rate-distortion of the quantizers and the coders on one trained model; prints JSON lines.

Takes a finished run's folder (its config.json and its unquantized weights final_model.pt), applies
each quantizer through the real export (pgolf.artifact.export_artifact), writes the artifact, reads
it back from disk into a fresh model and scores the standard val_bpb (pgolf.eval). Rows, at each
--bits width: rtn (today's rule: row abs-max), rtn_sdclip, gptq, gptq_sdclip, gptq_sdclip_lqer; then
at int6 the record's recipe (SD-clip 13.0 / 11.5, int7 embedding at 14.0, LQER asym rank 4 top 3).
The embedding stays fp16 (today's int6_zstd) except in the rows that say embed_bits.
Bytes are the artifact with zstd-22 (COMPRESSOR=auto), so rows compare quantizers, not coders.

SD-clip k per bit width: the grid value minimizing the summed Hessian-weighted output error
tr(E H E^T) / tr(W H W^T) of RTN over the attention and the MLP matrices (one k per group), on the
calibration Hessians. Calibration batches are TRAINING batches (the start of the train shards).

--compression: the same quantized tensors under every coder (today's v1 zstd-22 stream, v2 single
streams, per-group with and without row sorting) and the per-group codec table.

    python benchmarks/quant_rd.py --run-dir runs/rd_bench [--bits 4,5,6,7] [--compression]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pgolf.artifact import export_artifact, load_artifact, serialize
from pgolf.coder import CoderSettings
from pgolf.config import FIELD_TYPES, Hyperparameters
from pgolf.data import DistributedTokenLoader, train_pattern
from pgolf.dist import Dist
from pgolf.eval import Evaluator, load_validation
from pgolf.fileio import write_atomic
from pgolf.gptq import GPTQSettings, collect_hessians
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings
from pgolf.model import GPT
from pgolf.quant import dequantize_rows, int6_weight_names, max_level, quantize_rows, split_patterns
from pgolf.train import model_settings

CLIP_GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0)
RECORD = dict(attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0)


def quiet(msg: str, console: bool = True) -> None:
    pass


def load_run(run_dir: Path, data: str | None, tokenizer: str | None) -> tuple[Hyperparameters, GPT]:
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = Hyperparameters(**{k: v for k, v in saved.items() if k in FIELD_TYPES})
    cfg.data_path, cfg.tokenizer_path = data or cfg.data_path, tokenizer or cfg.tokenizer_path
    model = GPT(model_settings(cfg))
    model.load_state_dict(torch.load(run_dir / "final_model.pt", weights_only=True), strict=True)
    return cfg, model


def calibration(cfg: Hyperparameters, n: int):
    loader = DistributedTokenLoader(train_pattern(cfg.data_path), 0, 1, torch.device("cpu"), cfg.vocab_size)
    return [loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, 8) for _ in range(n)]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    e = w.float() - w_hat
    return float(torch.trace(e @ H @ e.T) / torch.trace(w.float() @ H @ w.float().T).clamp_min(1e-30))


def pick_clip(state: dict, hessians: dict, names: set[str], bits: int) -> dict[str, float]:
    best = {}
    for group in ("attn", "mlp"):
        members = [n for n in names if f".{group}." in n]
        scores = {k: sum(output_error(state[n], dequantize_rows(*quantize_rows(state[n], max_level(bits), clip_sigmas=k)),
                                      hessians[n]) for n in members) for k in CLIP_GRID}
        best[f"{group}_clip_sigmas"] = min(scores, key=scores.get)
    return best


def rows_for(bits: int, clip: dict[str, float]) -> list[tuple[str, QuantSettings, GPTQSettings, LQERSettings]]:
    rtn, gptq = GPTQSettings(), GPTQSettings(matrix_quant="gptq")
    plain, sd = QuantSettings(matrix_bits=bits), QuantSettings(matrix_bits=bits, **clip)
    lqer = LQERSettings(lqer_enabled=True, lqer_rank=4, lqer_top_k=3)
    return [("rtn", plain, rtn, LQERSettings()), ("rtn_sdclip", sd, rtn, LQERSettings()),
            ("gptq", plain, gptq, LQERSettings()), ("gptq_sdclip", sd, gptq, LQERSettings()),
            ("gptq_sdclip_lqer", sd, gptq, lqer)]


def record_rows(clip: dict[str, float]) -> list[tuple[str, QuantSettings, GPTQSettings, LQERSettings]]:
    gptq = GPTQSettings(matrix_quant="gptq")
    asym = LQERSettings(lqer_enabled=True, lqer_rank=4, lqer_top_k=3, lqer_asym_enabled=True)
    tuned_emb = QuantSettings(matrix_bits=6, embed_bits=7, embed_clip_sigmas=0.0, **clip)
    return [("gptq_sdclip_lqer_asym", QuantSettings(matrix_bits=6, **clip), gptq, asym),
            ("gptq_sdclip_emb7", tuned_emb, gptq, LQERSettings()),
            ("record_clip", QuantSettings(matrix_bits=6, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5), gptq,
             LQERSettings()),
            ("record_recipe", QuantSettings(matrix_bits=6, embed_bits=7, **RECORD), gptq, asym)]


def score(model: GPT, evaluator: Evaluator, blob: bytes, tmp: Path) -> float:
    path = tmp / "artifact.ptz"
    write_atomic(path, blob)
    state, cfg, _ = load_artifact(path)
    fresh = GPT(type(model.cfg)(**cfg))
    fresh.load_state_dict(state, strict=True)
    return evaluator.standard(fresh).val_bpb


def compression_table(model: GPT, control, keep, hessians, clip: dict) -> list[dict]:
    """Every coder on the same quantized tensors: today's int6 (RTN) and GPTQ + SD-clip int6."""
    out = []
    cases = {"rtn_int6": (QuantSettings(), GPTQSettings()),
             "gptq_sdclip_int6": (QuantSettings(**clip), GPTQSettings(matrix_quant="gptq")),
             "record_recipe": (QuantSettings(embed_bits=7, **RECORD), GPTQSettings(matrix_quant="gptq"))}
    for case, (qs, gs) in cases.items():
        state = {k: v.detach() for k, v in model.state_dict().items()}
        row = {"table": "compression", "tensors": case}
        if case == "rtn_int6":
            row["v1_zstd22"] = len(serialize(state, model.cfg.to_dict(), "int6_zstd", control, keep)[0])
        for comp, sort in (("zstd", True), ("brotli", True), ("lzma", True), ("pergroup", False), ("pergroup", True)):
            t0 = time.perf_counter()
            blob, stats = export_artifact(model, "int6_zstd", control, keep, qs, gs, hessians=hessians,
                                          coder=CoderSettings(compressor=comp, pergroup_row_sort=sort))
            key = comp if comp != "pergroup" else f"pergroup_{'sorted' if sort else 'unsorted'}"
            row[key] = len(blob)
            row[f"{key}_seconds"] = round(time.perf_counter() - t0, 1)
            if comp == "pergroup":
                row[f"{key}_groups"] = stats["coder"]
        row["pergroup_vs_zstd22"] = round(row["pergroup_sorted"] / row["zstd"] - 1, 4)
        if "v1_zstd22" in row:
            row["pergroup_vs_v1_zstd22"] = round(row["pergroup_sorted"] / row["v1_zstd22"] - 1, 4)
        out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a pgolf run folder with config.json and final_model.pt")
    parser.add_argument("--data", default=None, help="DATA_PATH (default: the run's)")
    parser.add_argument("--tokenizer", default=None, help="TOKENIZER_PATH (default: the run's)")
    parser.add_argument("--bits", default="4,5,6,7")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--val-max-tokens", type=int, default=None,
                        help="score only the first N validation tokens (default: the run's VAL_MAX_TOKENS)")
    parser.add_argument("--clip", type=float, default=None,
                        help="SD-clip k for attention and MLP in the *_sdclip rows (default: picked by the proxy)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the row names")
    parser.add_argument("--compression", action="store_true", help="also the coder table")
    parser.add_argument("--no-rd", action="store_true", help="skip the rate-distortion rows")
    args = parser.parse_args()
    cfg, model = load_run(Path(args.run_dir), args.data, args.tokenizer)
    if args.val_max_tokens is not None:
        cfg.val_max_tokens = args.val_max_tokens
    control, keep = split_patterns(cfg.control_tensor_name_patterns), split_patterns(cfg.fp16_passthrough_patterns)
    tokens, tables, sidecar = load_validation(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, cfg.val_max_tokens, quiet)
    evaluator = Evaluator(Dist(), tokens, tables, sidecar, None, seq_len=cfg.train_seq_len, batch_tokens=cfg.val_batch_size,
                          eval_seq_len=0, stride=0, batch_seqs=cfg.eval_batch_seqs)
    t0 = time.perf_counter()
    fp32 = evaluator.standard(model).val_bpb
    print(json.dumps({"benchmark": "quant_rd", "run_dir": args.run_dir, "model_params": sum(p.numel() for p in model.parameters()),
                      "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                      f"threads {torch.get_num_threads()}", "fp32_val_bpb": round(fp32, 5),
                      "val_tokens": len(tokens),
                      "eval_seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    t0 = time.perf_counter()
    batches = calibration(cfg, args.calibration_batches)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    names = int6_weight_names(state, control, keep)
    hessians = collect_hessians(model, iter(batches), names | {"tok_emb.weight"})
    print(json.dumps({"hessians": len(hessians), "calibration_tokens": sum(x.numel() for x, _ in batches),
                      "hessian_seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    clip6 = None
    with tempfile.TemporaryDirectory() as tmp:
        for bits in [int(b) for b in args.bits.split(",")] if not args.no_rd else []:
            clip = pick_clip(state, hessians, names, bits) if args.clip is None else {
                "attn_clip_sigmas": args.clip, "mlp_clip_sigmas": args.clip}
            clip6 = clip if bits == 6 else clip6
            todo = rows_for(bits, clip) + (record_rows(clip) if bits == 6 else [])
            todo = [row for row in todo if args.methods is None or row[0] in args.methods.split(",")]
            for method, qs, gs, ls in todo:
                blob, stats = export_artifact(model, "int6_zstd", control, keep, qs, gs, ls, hessians=hessians)
                bpb = score(model, evaluator, blob, Path(tmp))
                print(json.dumps({"method": method, "bits": bits, "embed_bits": qs.embed_bits,
                                  "clip": {k: v for k, v in vars(qs).items() if k.endswith("sigmas") and v},
                                  "lqer": (("asym" if ls.lqer_asym_enabled else "sym") if ls.lqer_enabled else ""),
                                  "bytes": stats["bytes"], "roundtrip_val_bpb": round(bpb, 5),
                                  "gap_vs_fp32": round(bpb - fp32, 5),
                                  "quant_seconds": round(stats["quant_seconds"], 2)}), flush=True)
        if args.compression:
            clip6 = clip6 or pick_clip(state, hessians, names, 6)
            for row in compression_table(model, control, keep, hessians, clip6):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
