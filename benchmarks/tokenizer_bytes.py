"""Tokens per byte of each dataset's val split, on the bytes the metric divides by; prints JSON.

For each DATA_PATH: val tokens, targets (tokens minus the first), the metric's bytes (the byte sidecar
when there is one, else the tokenizer's tables, pgolf.eval), tokens per byte, and how many tokens are
CaseOps markers. Comparing tokenizers is only fair when the byte totals are equal (same val text).

    python benchmarks/tokenizer_bytes.py DIR [DIR ...] [--tokenizer-name tokenizer.model]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def measure(data_dir: Path, tokenizer: Path) -> dict:
    from pgolf import caseops
    from pgolf.data import load_byte_sidecar, load_tokens, val_pattern
    from pgolf.eval import byte_tables, load_sentencepiece
    from pgolf.sidecar import token_spans

    sp = load_sentencepiece(tokenizer)
    tokens = load_tokens(val_pattern(str(data_dir)), sp.vocab_size())
    sidecar = load_byte_sidecar(str(data_dir), tokens.size)
    if sidecar is not None:
        nbytes, source = int(sidecar[1:].astype(np.int64).sum()), "sidecar"
    else:
        nbytes, source = int(token_spans(byte_tables(sp, sp.vocab_size()), tokens)[1:].sum()), "tables"
    marker_ids = [sp.piece_to_id(m) for m in caseops.MARKERS if sp.id_to_piece(sp.piece_to_id(m)) == m]
    markers = int(np.isin(tokens, marker_ids).sum()) if marker_ids else 0
    return {"data": str(data_dir), "vocab": sp.vocab_size(), "val_tokens": int(tokens.size),
            "val_docs": int((tokens == 1).sum()), "val_bytes": nbytes, "bytes_from": source,
            "targets_per_byte": round((tokens.size - 1) / nbytes, 5), "marker_tokens": markers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--tokenizer-name", default="tokenizer.model", help="the tokenizer's file in each DIR")
    args = parser.parse_args()
    rows = [measure(Path(d), Path(d) / args.tokenizer_name) for d in args.dirs]
    print(json.dumps({"benchmark": "tokenizer_bytes", "rows": rows,
                      "equal_val_bytes": len({r["val_bytes"] for r in rows}) == 1}, indent=1))


if __name__ == "__main__":
    main()
