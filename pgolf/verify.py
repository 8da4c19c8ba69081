"""`pgolf data verify`: check a dataset directory the way training and the metric will read it.

Checks every shard's header and size (pgolf.data.read_shard), every token below the tokenizer's vocab
size, each split's stream starting with BOS, the tokenizer against the manifest (sha256, vocab size),
the manifest's counts against the shards, and byte sidecars being as long as their shards. Then the
byte accounting: for every document, the bytes the metric's tables count over its targets
(pgolf.eval.ByteTables.count, the previous token starting at the BOS) must equal the UTF-8 length of
the tokenizer's decoding of the document; and encoding that decoded text must give the document's ids
back, which catches a wrong tokenizer even without a manifest. A document may continue into the next
shard of its split. A split that is a prefix of a longer export may end inside a document, even inside
a multi-byte character (trailing byte tokens carry one raw byte each, which the tables count but
decoding shows as U+FFFD); that last document gets a note instead of a failure.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.data import ShardError, read_shard, sidecar_pattern, train_pattern, val_pattern, write_shard
from pgolf.download import MANIFEST_NAME, dataset_entry, tokenizer_entry
from pgolf.eval import ByteTables, byte_tables, load_sentencepiece
from pgolf.spm import BOS_TOKEN

PREPARE_FORMAT = "pgolf-prepare/1"
TOKENIZER_NAME = "tokenizer.model"
DECODE_BATCH_TOKENS = 1 << 20  # bounds the Python lists handed to the decoder
COUNT_CHUNK = 1 << 22


class DataCheckError(ValueError):
    pass


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_byte_counts(tables: ByteTables, tokens: np.ndarray, prev: int | None = None) -> np.ndarray:
    """Bytes the metric counts for each token as a target, given the token before it. The first token's
    predecessor is `prev`; without one it starts the stream, is never a target, and counts 0."""
    out = np.zeros(tokens.size, dtype=np.int32)
    for lo in range(1, tokens.size, COUNT_CHUNK):  # chunks keep int64 index copies small on 10^8-token shards
        hi = min(tokens.size, lo + COUNT_CHUNK)
        t = torch.from_numpy(tokens[lo - 1:hi].astype(np.int64))
        out[lo:hi] = tables.count(t[:-1], t[1:]).numpy()
    if prev is not None and tokens.size:
        out[0] = int(tables.count(torch.tensor([prev]), torch.tensor([int(tokens[0])]))[0])
    return out


def write_byte_sidecars(data_dir: str | Path, tables: ByteTables) -> list[Path]:
    """fineweb_val_bytes_NNNNNN.bin beside each val shard: the tables' count for every token."""
    written, prev = [], None
    for shard in sorted(glob.glob(val_pattern(str(data_dir)))):
        tokens = read_shard(shard)
        path = Path(shard).with_name(Path(shard).name.replace("fineweb_val_", "fineweb_val_bytes_"))
        write_shard(path, token_byte_counts(tables, tokens, prev))
        prev = int(tokens[-1]) if tokens.size else prev
        written.append(path)
    return written


@dataclass
class ShardRow:
    split: str
    name: str
    tokens: int
    docs: int  # documents starting in this shard
    bytes: int  # the tables' bytes of this shard's tokens as targets
    sidecar_bytes: int | None = None


@dataclass
class Expected:
    """What a manifest says: tokenizer and, per split, docs/tokens/file counts (and names when known)."""
    path: Path
    tokenizer: Path | None
    sha256: str | None
    vocab_size: int | None
    splits: dict = field(default_factory=dict)


@dataclass
class Report:
    data_dir: Path
    tokenizer: Path
    vocab_size: int
    manifest: Path | None
    rows: list[ShardRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    docs_checked: int = 0
    mismatches: int = 0  # documents whose table bytes differ from their decoded UTF-8 bytes
    roundtrip_mismatches: int = 0  # documents whose decoded text does not encode back to their ids

    @property
    def ok(self) -> bool:
        return not self.problems

    def totals(self, split: str) -> ShardRow:
        rows = [r for r in self.rows if r.split == split]
        side = [r.sidecar_bytes for r in rows if r.sidecar_bytes is not None]
        return ShardRow(split, "total", sum(r.tokens for r in rows), sum(r.docs for r in rows),
                        sum(r.bytes for r in rows), sum(side) if side else None)


def read_expected(data_dir: Path) -> Expected | None:
    """The dataset's own manifest (pgolf data prepare), else the challenge manifest two levels up."""
    own, root = data_dir / MANIFEST_NAME, data_dir.parent.parent
    path = own if own.is_file() else root / MANIFEST_NAME if data_dir.parent.name == "datasets" else None
    if path is None or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataCheckError(f"{path}: not a JSON manifest ({e}); restore it or delete it") from None
    if manifest.get("format") == PREPARE_FORMAT:
        tok = manifest["tokenizer"]
        return Expected(path, path.parent / tok["model_path"], tok.get("sha256"), tok.get("vocab_size"),
                        {s: {**v, "files": len(v["shards"]), "complete": True} for s, v in manifest["splits"].items()})
    dataset = dataset_entry(manifest, data_dir.name, str(path))
    tok = tokenizer_entry(manifest, dataset, str(path))
    stats = dataset.get("stats") or {}
    splits = {s: {"docs": stats.get(f"docs_{s}"), "tokens": stats.get(f"tokens_{s}"), "files": stats.get(f"files_{s}")}
              for s in ("val", "train")}
    model = tok.get("model_path") or tok.get("path")
    return Expected(path, path.parent / model if model else None, None, tok.get("vocab_size"), splits)


def resolve_tokenizer(data_dir: Path, given: str | None, expected: Expected | None) -> Path:
    if given:
        return Path(given)
    if expected is not None and expected.tokenizer is not None:
        if not expected.tokenizer.is_file():
            raise DataCheckError(f"{expected.path} names tokenizer {expected.tokenizer}, which does not exist; "
                                 "pass --tokenizer MODEL")
        return expected.tokenizer
    if (data_dir / TOKENIZER_NAME).is_file():
        return data_dir / TOKENIZER_NAME
    raise DataCheckError(f"{data_dir}: no tokenizer to check against (no manifest naming one, no {TOKENIZER_NAME}); "
                         "pass --tokenizer MODEL")


def check_tokenizer(path: Path, sp, expected: Expected | None) -> None:
    """A tokenizer that does not fit the dataset makes every later check meaningless: stop here."""
    if expected is None:
        return
    if expected.sha256 and sha256_file(path) != expected.sha256:
        raise DataCheckError(f"tokenizer {path} has sha256 {sha256_file(path)[:16]}…, but {expected.path} records "
                             f"{expected.sha256[:16]}…; the dataset was made with another tokenizer: pass that one "
                             "with --tokenizer, or prepare the dataset again")
    if expected.vocab_size and sp.vocab_size() != expected.vocab_size:
        raise DataCheckError(f"tokenizer {path} has vocab size {sp.vocab_size()}, but {expected.path} records "
                             f"{expected.vocab_size}; pass the dataset's tokenizer with --tokenizer")


def byte_values(sp) -> np.ndarray:
    """The raw byte of each byte-fallback piece (<0xNN>), -1 for every other piece."""
    values = np.full(max(sp.vocab_size(), 1), -1, dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            values[i] = int(sp.id_to_piece(i)[1:-1], 16)
    return values


def partial_char_tail(ids: np.ndarray, byte_value: np.ndarray) -> int:
    """How many trailing byte tokens of a document (ids[0] is its BOS) form an incomplete UTF-8 character."""
    run = 0
    while run < ids.size - 1 and byte_value[ids[ids.size - 1 - run]] >= 0:
        run += 1
    if not run:
        return 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(bytes(byte_value[ids[ids.size - run:]].astype(np.uint8)), final=False)
    except UnicodeDecodeError:
        return 0
    return len(decoder.getstate()[0])


class _SplitChecker:
    """Walks one split's shards as one stream, checking each document once it is complete."""

    def __init__(self, split: str, sp, tables: ByteTables, report: Report):
        self.split, self.sp, self.tables, self.report = split, sp, tables, report
        self.byte_value = byte_values(sp)
        self.docs_seen = 0

    def run(self, files: list[str]) -> None:
        carry, carry_counts, origin = np.zeros(0, np.uint16), np.zeros(0, np.int32), ("", 0)
        for k, name in enumerate(files):
            try:
                tokens = read_shard(name, self.sp.vocab_size())
            except ShardError as e:
                self.report.problems.append(str(e))
                return
            if k == 0 and (tokens.size == 0 or tokens[0] != BOS_TOKEN):
                first = int(tokens[0]) if tokens.size else "missing"
                self.report.problems.append(f"{name}: token offset 0 is {first}, not BOS ({BOS_TOKEN}); every split "
                                            "must start with a document's BOS")
                return
            counts = token_byte_counts(self.tables, tokens, int(carry[-1]) if carry.size else None)
            docs = int(np.count_nonzero(tokens == BOS_TOKEN))
            self.report.rows.append(ShardRow(self.split, Path(name).name, int(tokens.size), docs,
                                             int(counts.sum(dtype=np.int64))))
            stream, stream_counts = np.concatenate([carry, tokens]), np.concatenate([carry_counts, counts])
            starts = np.flatnonzero(stream == BOS_TOKEN)
            ends = np.append(starts[1:], stream.size)
            final = k == len(files) - 1
            done = len(starts) if final else len(starts) - 1  # the last document may go on in the next shard

            def locate(pos: int, carried=carry.size, origin=origin, name=name) -> tuple[str, int]:
                return (origin[0], origin[1] + pos) if pos < carried else (name, pos - carried)

            self._check_documents(stream, stream_counts, starts[:done], ends[:done], final, locate)
            tail = int(starts[-1])
            carry, carry_counts, origin = stream[tail:], stream_counts[tail:], locate(tail)

    def _check_documents(self, stream, stream_counts, starts, ends, final: bool, locate) -> None:
        cumulative = np.concatenate([[0], np.cumsum(stream_counts, dtype=np.int64)])
        table_bytes = cumulative[ends] - cumulative[starts]
        i = 0
        while i < len(starts):
            j, size = i + 1, int(ends[i] - starts[i])
            while j < len(starts) and size + int(ends[j] - starts[j]) <= DECODE_BATCH_TOKENS:
                size += int(ends[j] - starts[j])
                j += 1
            docs = [stream[s + 1:e] for s, e in zip(starts[i:j], ends[i:j])]
            texts = self.sp.decode([d.tolist() for d in docs])
            for d, text, ids, again in zip(range(i, j), texts, docs, self.sp.encode(texts)):
                last, where = final and d == len(starts) - 1, locate(int(starts[d]))
                text_bytes = len(text.encode("utf-8"))
                if text_bytes != table_bytes[d]:
                    self._byte_mismatch(stream[starts[d]:ends[d]], int(table_bytes[d]), text_bytes, last, where,
                                        self.docs_seen + d)
                if len(again) != ids.size or not np.array_equal(again, ids):
                    self._roundtrip_mismatch(ids, again, last, where, self.docs_seen + d)
            i = j
        self.report.docs_checked += len(starts)
        self.docs_seen += len(starts)

    def _byte_mismatch(self, doc: np.ndarray, table_bytes: int, text_bytes: int, last: bool, where, index: int) -> None:
        cut = partial_char_tail(doc, self.byte_value) if last else 0
        if cut and len(self.sp.decode(doc[1:doc.size - cut].tolist()).encode("utf-8")) + cut == table_bytes:
            self.report.notes.append(f"{where[0]}: the {self.split} split's last document (token offset {where[1]}) "
                                     "ends inside a multi-byte character, as a prefix of a longer export can; its "
                                     f"{cut} trailing byte token(s) count 1 byte each, the rest matches the decoded "
                                     "text")
            return
        self.report.mismatches += 1
        if self.report.mismatches == 1:
            self.report.problems.append(
                f"{where[0]}: document {index} of the {self.split} split, at token offset {where[1]}: the metric's "
                f"tables count {table_bytes} bytes but the decoded text has {text_bytes} UTF-8 bytes; val_bpb "
                "would be wrong with this tokenizer (check it is the one the shards were made with)")

    def _roundtrip_mismatch(self, ids: np.ndarray, again: list[int], last: bool, where, index: int) -> None:
        """Decoding then encoding gives the ids back under the tokenizer that made them, rarely under another."""
        if last:  # a split cut inside a document (a prefix export) need not re-encode the same way
            self.report.notes.append(f"{where[0]}: the {self.split} split's last document (token offset {where[1]}) "
                                     "does not re-encode to the same ids, as a document cut by a prefix export can")
            return
        self.report.roundtrip_mismatches += 1
        if self.report.roundtrip_mismatches == 1:
            k = next((n for n, (a, b) in enumerate(zip(ids.tolist(), again)) if a != b), min(ids.size, len(again)))
            self.report.problems.append(
                f"{where[0]}: document {index} of the {self.split} split, at token offset {where[1]}: re-encoding its "
                f"decoded text gives other ids (from the document's token {k + 1}); the shards were made with "
                "another tokenizer: pass that one with --tokenizer")


def _check_sidecars(data_dir: Path, val_files: list[str], report: Report) -> None:
    sidecars = sorted(glob.glob(sidecar_pattern(str(data_dir))))
    if not sidecars:
        return
    if len(sidecars) != len(val_files):
        report.problems.append(f"{data_dir}: {len(sidecars)} byte sidecar files for {len(val_files)} val shards; "
                               "each fineweb_val_NNNNNN.bin needs its fineweb_val_bytes_NNNNNN.bin")
        return
    rows = {r.name: r for r in report.rows if r.split == "val"}
    for sidecar, shard in zip(sidecars, val_files):
        try:
            counts = read_shard(sidecar)
        except ShardError as e:
            report.problems.append(str(e))
            continue
        row = rows.get(Path(shard).name)
        if row is None:
            continue
        if counts.size != row.tokens:
            report.problems.append(f"{sidecar}: {counts.size} byte counts for the {row.tokens} tokens of {row.name} "
                                   f"(they diverge at token offset {min(counts.size, row.tokens)}); a sidecar "
                                   "needs one count per token: regenerate it with the shard's tokenizer")
        else:
            row.sidecar_bytes = int(counts.astype(np.int64).sum())


def _check_expected(expected: Expected, files: dict[str, list[str]], report: Report) -> None:
    for split, want in expected.splits.items():
        found = report.totals(split)
        names = [Path(f).name for f in files.get(split, [])]
        where = f"{expected.path} ({split})"
        if want.get("shards") is not None and names != want["shards"]:
            report.problems.append(f"{where}: lists shards {want['shards'][:3]}…, found {names[:3]}… in "
                                   f"{report.data_dir}; a shard is missing or extra")
            continue
        if want.get("files") is None:
            continue
        if len(names) > want["files"] or (split == "val" and len(names) < want["files"]):
            report.problems.append(f"{where}: lists {want['files']} shards, found {len(names)}; "
                                   + ("the val split must be complete (download every val shard)" if split == "val"
                                      else "extra shards do not belong to this dataset"))
            continue
        if len(names) == want["files"]:
            for key, value in (("tokens", found.tokens), ("docs", found.docs)):
                if want.get(key) is not None and value != want[key]:
                    report.problems.append(f"{where}: records {want[key]:,} {key}, the shards hold {value:,}")


def verify_dataset(data_dir: str | Path, tokenizer: str | None = None, progress: bool = False) -> Report:
    """Check data_dir; fatal mismatches raise DataCheckError, everything else lands in report.problems."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataCheckError(f"{data_dir}: no such dataset directory")
    expected = read_expected(data_dir)
    model_path = resolve_tokenizer(data_dir, tokenizer, expected)
    sp = load_sentencepiece(model_path)
    check_tokenizer(model_path, sp, expected)
    files = {"val": sorted(glob.glob(val_pattern(str(data_dir)))),
             "train": sorted(glob.glob(train_pattern(str(data_dir))))}
    if not files["val"] and not files["train"]:
        raise DataCheckError(f"{data_dir}: no fineweb_val_*.bin or fineweb_train_*.bin shards")
    report = Report(data_dir, model_path, sp.vocab_size(), expected.path if expected else None)
    tables = byte_tables(sp, sp.vocab_size())
    for split in ("val", "train"):
        names = files[split]
        if progress:
            from tqdm import tqdm
            names = tqdm(names, desc=f"verify {split}", unit="shard", leave=False)
        _SplitChecker(split, sp, tables, report).run(list(names))
    _check_sidecars(data_dir, files["val"], report)
    if expected is not None:
        _check_expected(expected, files, report)
    if report.mismatches > 1:
        report.problems.append(f"{report.mismatches:,} documents in all have byte-count mismatches")
    if report.roundtrip_mismatches > 1:
        report.problems.append(f"{report.roundtrip_mismatches:,} documents in all do not re-encode to their ids")
    return report


def format_report(report: Report, extra: list[str] = ()) -> str:
    sidecars = any(r.sidecar_bytes is not None for r in report.rows)
    lines = [f"dataset:   {report.data_dir}", f"tokenizer: {report.tokenizer} (vocab {report.vocab_size})",
             f"manifest:  {report.manifest or 'none'}",
             f"{'split':<6} {'shard':<28} {'tokens':>13} {'docs':>9} {'bytes':>14}"
             + (" sidecar bytes" if sidecars else "")]
    for split in ("val", "train"):
        rows = [r for r in report.rows if r.split == split]
        for row in rows + ([report.totals(split)] if rows else []):
            side = "" if row.sidecar_bytes is None else f" {row.sidecar_bytes:>13,}"
            lines.append(f"{row.split:<6} {row.name:<28} {row.tokens:>13,} {row.docs:>9,} {row.bytes:>14,}{side}")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"byte accounting: {report.docs_checked:,} documents checked, {report.mismatches:,} mismatches")
    lines.append(f"tokenizer round trip: {report.roundtrip_mismatches:,} documents re-encode to other ids")
    lines += extra
    lines += ["OK"] if report.ok else [f"FAILED: {p}" for p in report.problems]
    return "\n".join(lines)
