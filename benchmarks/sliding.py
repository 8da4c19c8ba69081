"""Sliding-window vs standard evaluation on the core benchmark's model and data; prints JSON.

    python benchmarks/sliding.py [ARTIFACT] [--data ../shared/data/fineweb_sp1024] [--strides 128,64]

Without ARTIFACT it first trains the core benchmark configuration (benchmarks/core.py) and uses the
artifact of that run. Every evaluation runs once (the machine is shared). Besides the scores it
times the trunk alone (model.hidden over the standard batches), which splits the standard eval
into the part a sliding eval repeats seq_len/stride times and the head + loss it does only once.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.artifact import load_artifact
from pgolf.data import load_tokens, val_pattern
from pgolf.eval import byte_tables, evaluate, load_sentencepiece
from pgolf.model import rebuild_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import BENCH  # noqa: E402  (the core benchmark's configuration, one definition)

STANDARD_BATCH_TOKENS = 524_288 // 8  # the challenge's per-rank standard batch on one process


def train_core_model(data: str, tokenizer: str) -> Path:
    from pgolf.config import resolve
    from pgolf.train import run

    flags = {**{k: str(v) for k, v in BENCH.items()}, "data_path": data, "tokenizer_path": tokenizer,
             "out_dir": "runs", "run_id": f"bench_sliding_{int(time.time())}"}
    final = run(resolve("baseline", env={"PATH": os.environ.get("PATH", "")}, flags=flags))
    return Path(final["artifact"])


@torch.no_grad()
def trunk_seconds(model, tokens: np.ndarray, seq_len: int, batch: int) -> float:
    """Time model.hidden alone over the standard eval's batches (no head, no loss)."""
    blocks = torch.from_numpy(tokens[:-1].astype(np.int64)).view(-1, seq_len)
    t0 = time.perf_counter()
    for b0 in range(0, len(blocks), batch):
        model.hidden(blocks[b0:b0 + batch])
    return time.perf_counter() - t0


def summary(r, seq_len: int, stride: int, batch: int) -> dict:
    return {"seq_len": seq_len, "stride": stride, "batch_seqs": batch, "val_loss": round(r.val_loss, 6),
            "val_bpb": round(r.val_bpb, 6), "eval_time_s": round(r.seconds, 2), "targets": r.targets,
            "bytes": r.bytes, "tokens_scored_per_s": round(r.tokens_per_second, 1),
            "token_forwards": r.token_forwards, "forwards_per_token": round(r.forwards_per_token, 4)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", help="final_model.*.ptz of a core benchmark run (default: train one)")
    parser.add_argument("--data", default="../shared/data/fineweb_sp1024")
    parser.add_argument("--tokenizer", default="../shared/data/tokenizers/fineweb_1024_bpe.model")
    parser.add_argument("--strides", default="128,64")
    parser.add_argument("--batch-seqs", type=int, default=32, help="windows per forward in the sliding evals")
    args = parser.parse_args()
    path = Path(args.artifact) if args.artifact else train_core_model(args.data, args.tokenizer)
    state, model_config, fmt = load_artifact(path)
    model = rebuild_model(state, model_config, str(path)).eval()
    run_config = path.with_name("config.json")
    seq_len = json.loads(run_config.read_text())["train_seq_len"] if run_config.exists() else BENCH["train_seq_len"]
    tables = byte_tables(load_sentencepiece(args.tokenizer), model.cfg.vocab_size)
    tokens = load_tokens(val_pattern(args.data), model.cfg.vocab_size)
    usable = (len(tokens) - 1) // seq_len * seq_len + 1
    std_batch = max(1, STANDARD_BATCH_TOKENS // seq_len)

    std = evaluate(model, tokens[:usable], tables, seq_len=seq_len, stride=seq_len, batch_seqs=std_batch)
    trunk = trunk_seconds(model, tokens[:usable], seq_len, std_batch)
    head = max(std.seconds - trunk, 0.0)
    out = {"benchmark": "sliding", "artifact": str(path), "format": fmt, "val_tokens": len(tokens),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), torch {torch.__version__}, "
                      f"threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f} at start",
           "standard": summary(std, seq_len, seq_len, std_batch),
           "standard_split_s": {"trunk": round(trunk, 2), "head_loss_and_rest": round(head, 2)}}
    for stride in [seq_len] + [int(s) for s in args.strides.split(",")]:
        r = evaluate(model, tokens, tables, seq_len=seq_len, stride=stride, batch_seqs=args.batch_seqs)
        row = summary(r, seq_len, stride, args.batch_seqs)
        ratio = seq_len / stride
        row.update(bpb_vs_standard=round(r.val_bpb - std.val_bpb, 6),
                   time_vs_standard=round(r.seconds / std.seconds, 3), seq_len_over_stride=ratio,
                   predicted_time_s=round(ratio * trunk + head, 2))
        out[f"sliding_stride{stride}"] = row
    out["sliding_beats_standard"] = all(out[f"sliding_stride{int(s)}"]["val_bpb"] < std.val_bpb
                                        for s in args.strides.split(","))
    print(json.dumps(out, indent=1))
    return 0 if out["sliding_beats_standard"] else 1


if __name__ == "__main__":
    sys.exit(main())
