"""`pgolf data verify`, per document: the tokens give the original text back and the byte sidecar
counts exactly its bytes.

For every document of each split: decode its ids, undo the dataset's transform (pgolf.caseops, when
the manifest names it; a malformed marker sequence is a mismatch), and compare with the source
document's canonical text (pgolf.sidecar.canonical) when the source documents are at hand (--docs, or
the manifest's docs path). For val documents with a byte sidecar: the sidecar's counts must equal the
ones pgolf.sidecar derives from the decoded text, token for token, and sum to the original text's
UTF-8 length. Each mismatch is reported with the document's index in its split and the first
character (or token) that differs.
"""
from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf import caseops
from pgolf.data import ShardError, read_shard, sidecar_pattern, train_pattern, val_pattern
from pgolf.eval import byte_tables, load_sentencepiece
from pgolf.prepare import iter_documents
from pgolf.sidecar import (FOREIGN, canonical, check_transform, dataset_manifest, normalizer, token_spans,
                           transformed_counts)
from pgolf.spm import BOS_TOKEN
from pgolf.verify import Report, verify_dataset

SHOWN = 3  # problems printed per kind; the totals count all of them


@dataclass
class TextReport:
    docs_checked: int = 0
    source: str | None = None  # the documents compared against
    text_mismatches: int = 0
    sidecar_mismatches: int = 0
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the documents were not checked
    transform: str | None = None

    def lines(self) -> list[str]:
        if self.skipped:
            return [f"text round trip: not checked ({self.skipped})"]
        against = f"against {self.source}" if self.source else "(no source documents: decoding checked only)"
        head = [f"transform: {self.transform} (the bytes column counts the transformed text; val_bpb divides by "
                "the sidecar bytes)"] if self.transform else []
        return head + [f"text round trip: {self.docs_checked:,} documents {against}, {self.text_mismatches:,} mismatches",
                f"byte sidecar: {self.sidecar_mismatches:,} documents whose counts differ"]


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _documents(files: list[str]) -> Iterator[tuple[np.ndarray, int]]:
    """(ids of [BOS] + document, its offset in the split) over one split's shards, one shard in memory at
    a time; a document may continue into the next shard."""
    carry, base = np.zeros(0, np.uint16), 0  # base: split offset of carry[0]
    for k, name in enumerate(files):
        tokens = np.concatenate([carry, read_shard(name)])
        starts = np.flatnonzero(tokens == BOS_TOKEN)
        if k == 0 and (starts.size == 0 or starts[0] != 0):
            raise ShardError(f"{name}: the split does not start with BOS ({BOS_TOKEN})")
        ends = np.append(starts[1:], tokens.size)
        last = k == len(files) - 1
        for s, e in zip(starts, ends) if last else zip(starts[:-1], ends[:-1]):
            yield tokens[s:e], base + int(s)
        if not last and starts.size:
            carry, base = tokens[starts[-1]:], base + int(starts[-1])


def _source_texts(docs: Path, num_val: int, sp, transform: str | None, hasher) -> dict[str, list[str]]:
    """The canonical text of each source document that became a document of each split."""
    norm, out = normalizer(), {"val": [], "train": []}
    for n, (_, _, text) in enumerate(iter_documents(docs, hasher)):
        text = canonical(norm, text)
        if text and (transform or sp.encode(text)):
            out["val" if n < num_val else "train"].append(text)
    return out


class _Checker:
    def __init__(self, sp, tables, transform: str | None, report: TextReport):
        self.sp, self.tables, self.transform, self.report = sp, tables, transform, report

    def problem(self, kind: str, message: str) -> None:
        count = getattr(self.report, kind) + 1
        setattr(self.report, kind, count)
        if count <= SHOWN:
            self.report.problems.append(message)

    def document(self, split: str, index: int, ids: np.ndarray, source: str | None, counts: np.ndarray | None):
        where = f"document {index} of the {split} split"
        decoded = self.sp.decode(ids[1:].tolist())
        try:
            text = caseops.decode(decoded) if self.transform else decoded
        except caseops.CaseOpsError as e:
            self.problem("text_mismatches", f"{where}: its tokens do not undo the {self.transform} transform: {e}")
            return
        if source is not None and text != source:
            k = _first_difference(text, source)
            self.problem("text_mismatches", f"{where}: decoded text differs from the source document at character "
                                            f"{k}: {text[k:k + 20]!r} vs {source[k:k + 20]!r}")
        if counts is None:
            return
        want = transformed_counts(self.tables, ids, decoded) if self.transform else token_spans(self.tables, ids)
        if counts.size != want.size or not np.array_equal(counts, want) or int(counts.sum()) != len(text.encode()):
            k = _first_difference(counts.tolist(), want.tolist())
            self.problem("sidecar_mismatches", f"{where}: byte sidecar sums to {int(counts.sum())} bytes, the "
                                               f"original text has {len(text.encode('utf-8'))}; first differing "
                                               f"count at the document's token {k} ({int(counts[k]) if k < counts.size else '-'} "
                                               f"vs {int(want[k]) if k < want.size else '-'})")


def check_texts(data_dir: Path, sp, tables, manifest: dict | None, docs: str | None) -> TextReport:
    """Check every document's text and (val) sidecar counts; see the module docstring."""
    report = TextReport()
    transform = check_transform(manifest, sp, "tokenizer", data_dir / "manifest.json")
    if transform == FOREIGN:
        report.skipped = ("the tokenizer has private-use pieces of a transform pgolf does not implement; only the "
                          "sidecar's length is checked")
        return report
    report.transform = transform
    source = Path(docs) if docs else None
    if source is None and manifest and Path(manifest["docs"]["path"]).is_file():
        source = Path(manifest["docs"]["path"])
    hasher = hashlib.sha256()
    texts = _source_texts(source, (manifest or {}).get("num_val_docs", 0), sp, transform, hasher) if source else {}
    if source is not None:
        report.source = str(source)
        if manifest and hasher.hexdigest() != manifest["docs"]["sha256"]:
            report.problems.append(f"{source}: sha256 {hasher.hexdigest()[:16]}… differs from the manifest's "
                                   f"{manifest['docs']['sha256'][:16]}…; these are not the documents it was made from")
    checker = _Checker(sp, tables, transform, report)
    side = sorted(glob.glob(sidecar_pattern(str(data_dir))))
    sidecar = np.concatenate([read_shard(f) for f in side]).astype(np.int64) if side else None
    for split, pattern in (("val", val_pattern(str(data_dir))), ("train", train_pattern(str(data_dir)))):
        wanted = texts.get(split)
        n = -1
        for n, (ids, offset) in enumerate(_documents(sorted(glob.glob(pattern)))):
            counts = sidecar[offset:offset + ids.size] if split == "val" and sidecar is not None else None
            checker.document(split, n, ids, wanted[n] if wanted is not None and n < len(wanted) else None, counts)
        report.docs_checked += n + 1
        if wanted is not None and len(wanted) != n + 1:
            report.problems.append(f"{data_dir}: the {split} split has {n + 1} documents, the source gives "
                                   f"{len(wanted)}")
    return report


def verify_with_texts(data_dir: str | Path, tokenizer: str | None = None, docs: str | None = None,
                      progress: bool = False) -> tuple[Report, TextReport]:
    """pgolf.verify's checks, then the per-document text and sidecar checks; problems of both in report."""
    report = verify_dataset(data_dir, tokenizer, progress=progress)
    sp = load_sentencepiece(report.tokenizer)
    try:
        text = check_texts(Path(data_dir), sp, byte_tables(sp, sp.vocab_size()), dataset_manifest(data_dir), docs)
    except ShardError:  # an unreadable shard, already among the report's problems
        return report, TextReport(skipped="a shard cannot be read")
    report.problems += text.problems
    return report, text
