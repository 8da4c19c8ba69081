"""The data tools on the real data in ../shared/data: reproduction, verification and speed; prints JSON.

1. `prepare` with the official sp1024 tokenizer on fineweb_sample/pg_val_prefix_sp1024.jsonl (234 val
   documents decoded from the official val prefix) against fineweb_sp1024_mini/fineweb_val_000000.bin,
   document by document (the shard is a 262,145-token prefix, so its last document is cut).
2. `prepare` on fineweb_sample/fineweb_legal_pilot_raw.jsonl (2,797 raw documents, all train) with 1
   and 2 worker processes: the outputs must be identical, and equal to fineweb_sp1024's train shards
   000001-000005, which were made from the same documents as [BOS] + encode(text).
3. `verify` on fineweb_sp1024_mini/ and fineweb_sp1024/.

    python benchmarks/data_real.py [--shared ../shared/data]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pgolf.data import read_shard
from pgolf.prepare import prepare_dataset
from pgolf.verify import verify_dataset


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    return np.split(tokens, np.flatnonzero(tokens == 1)[1:])


def compare_docs(prepared: np.ndarray, reference: np.ndarray) -> dict:
    ours, theirs = split_docs(prepared), split_docs(reference)
    complete = theirs[:-1]  # the reference's last document is cut by the prefix
    same = sum(np.array_equal(a, b) for a, b in zip(ours, complete))
    last_a, last_b = ours[len(complete)], theirs[-1]
    shared = min(last_a.size, last_b.size)
    return {"docs_prepared": len(ours), "docs_reference": len(theirs), "complete_docs": len(complete),
            "complete_docs_identical": int(same),
            "cut_doc_tokens": {"prepared": int(last_a.size), "reference": int(last_b.size),
                               "identical_prefix": int(np.array_equal(last_a[:shared], last_b[:shared]) and shared)}}


def timed_prepare(docs: Path, out: Path, **kw) -> tuple[dict, float]:
    t0 = time.perf_counter()
    manifest = prepare_dataset(docs, out, log=None, progress=False, **kw)
    return manifest, time.perf_counter() - t0


def shard_digest(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(out.glob("fineweb_*.bin")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def verify_summary(path: Path, tokenizer: Path) -> dict:
    t0 = time.perf_counter()
    report = verify_dataset(path, str(tokenizer))
    seconds = time.perf_counter() - t0
    tokens = sum(r.tokens for r in report.rows)
    return {"ok": report.ok, "problems": report.problems, "notes": len(report.notes), "shards": len(report.rows),
            "tokens": tokens, "docs_checked": report.docs_checked, "byte_mismatches": report.mismatches,
            "roundtrip_mismatches": report.roundtrip_mismatches,
            "val_bytes": report.totals("val").bytes, "train_bytes": report.totals("train").bytes,
            "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    shared = Path(parser.parse_args().shared)
    tokenizer = shared / "tokenizers/fineweb_1024_bpe.model"
    result = {"machine": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, seconds = timed_prepare(shared / "fineweb_sample/pg_val_prefix_sp1024.jsonl", tmp / "val",
                                   tokenizer=str(tokenizer), num_val_docs=234, workers=2)
        result["val_prefix_reproduction"] = {
            **compare_docs(read_shard(tmp / "val/fineweb_val_000000.bin"),
                           read_shard(shared / "fineweb_sp1024_mini/fineweb_val_000000.bin")),
            "seconds": round(seconds, 2)}
        raw = shared / "fineweb_sample/fineweb_legal_pilot_raw.jsonl"
        runs = {}
        for workers in (1, 2):
            manifest, seconds = timed_prepare(raw, tmp / f"raw{workers}", tokenizer=str(tokenizer), num_val_docs=0,
                                              workers=workers)
            tokens = manifest["splits"]["train"]["tokens"]
            runs[workers] = {"seconds": round(seconds, 2), "tokens": tokens,
                             "docs": manifest["splits"]["train"]["docs"], "tokens_per_second": round(tokens / seconds),
                             "shards_sha256": shard_digest(tmp / f"raw{workers}")}
        ours = np.concatenate([read_shard(p) for p in sorted((tmp / "raw2").glob("fineweb_train_*.bin"))])
        theirs = np.concatenate([read_shard(shared / f"fineweb_sp1024/fineweb_train_{i:06d}.bin") for i in range(1, 6)])
        result["raw_docs_prepare"] = {"workers_1": runs[1], "workers_2": runs[2],
                                      "identical_across_workers": runs[1]["shards_sha256"] == runs[2]["shards_sha256"],
                                      "equals_fineweb_sp1024_train_1_to_5": bool(np.array_equal(ours, theirs))}
    for name in ("fineweb_sp1024_mini", "fineweb_sp1024"):
        result[f"verify_{name}"] = verify_summary(shared / name, tokenizer)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
