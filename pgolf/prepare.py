"""`pgolf data prepare`: raw documents (JSON lines with a "text" field) -> challenge shards + manifest.

Documents keep their file order: the first K go to val, the rest to train. K counts input documents,
so which documents are val depends on the file alone, not on the tokenizer. Each document becomes
[BOS] + ids with no EOS (pgolf.spm.encode_document); one with no tokens after normalization is
skipped and counted. Shards hold exactly shard_tokens tokens except each split's last, so a document
may continue into the next shard of its split, but val and train never share a shard.

Encoding runs in worker processes on chunks of documents whose results are consumed in input order,
so the output is the same for any number of workers. Everything is written into a temporary sibling
directory, manifest.json last, which is then renamed into place: a failed or interrupted run never
leaves a dataset that looks complete, and --overwrite replaces the old one only at the end.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pgolf import caseops
from pgolf.fileio import write_atomic
from pgolf.data import write_shard
from pgolf.download import MANIFEST_NAME
from pgolf.eval import byte_tables, load_sentencepiece
from pgolf.sidecar import NORMALIZATION, DocEncoder, SidecarError, canonical, normalizer, tokenizer_markers
from pgolf.spm import BOS_TOKEN, train_sentencepiece
from pgolf.verify import PREPARE_FORMAT, TOKENIZER_NAME, sha256_file

DEFAULT_SHARD_TOKENS = 10**8
DEFAULT_NUM_VAL_DOCS = 50_000
DEFAULT_VOCAB_SIZE = 1024
CHUNK_DOCS = 256
# what prepare writes; --overwrite refuses to delete a directory holding anything else
DATASET_FILE = re.compile(r"fineweb_(val|train|val_bytes)_\d+\.bin|manifest\.json|tokenizer\.(model|vocab)")


class DocumentError(ValueError):
    pass


def iter_documents(path: str | Path, hasher=None) -> Iterator[tuple[int, int, str]]:
    """(line number, file offset after the line, text) per JSON line; blank lines are skipped."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if hasher is not None:
                hasher.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DocumentError(f"{path}:{line_no}: invalid UTF-8 byte {raw[e.start:e.start + 1]!r} at file "
                                    f"offset {offset + e.start} (column {e.start + 1}); re-export the documents "
                                    "as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            yield line_no, offset, _line_text(path, line_no, line)


def _line_text(path, line_no: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DocumentError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            'one object like {"text": "..."}') from None
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        found = f"keys {sorted(obj)[:5]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise DocumentError(f'{path}:{line_no}: no string field "text" (found {found}); every line must hold '
                            'its document as {"text": "..."}')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" decodes but is not text
        raise DocumentError(f"{path}:{line_no}: text character {e.start} is an unpaired surrogate "
                            f"({text[e.start]!r}), which is not valid UTF-8; fix the escape in the source") from None
    return text


def check_output_dir(out: Path, overwrite: bool) -> None:
    """An existing non-empty --out needs --overwrite, and then must hold only files prepare writes."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a directory path")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"--out {out} already exists ({len(entries)} entries); pass --overwrite to replace it "
                         "(the old dataset stays until the new one is complete) or choose another --out")
    foreign = [name for name in entries if not DATASET_FILE.fullmatch(name)]
    if foreign:
        raise ValueError(f"--out {out} holds {foreign[0]!r}, which prepare does not write; refusing to replace "
                         "the directory. Move that file away or choose another --out")


class ShardWriter:
    """One split's shards: exactly shard_tokens tokens each, the last one shorter."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[str] = []
        self.tokens = self.docs = 0

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.buffered += ids.size
        self.tokens += ids.size
        self.docs += 1
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.parts)
            self._write(flat[:self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self.parts, self.buffered = ([rest] if rest.size else []), rest.size

    def close(self) -> dict:
        if self.buffered:
            self._write(np.concatenate(self.parts))
            self.parts, self.buffered = [], 0
        return {"docs": self.docs, "tokens": self.tokens, "shards": self.shards}

    def _write(self, tokens: np.ndarray) -> None:
        name = f"fineweb_{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out / name, tokens)
        self.shards.append(name)


_worker: DocEncoder | None = None


def _init_worker(model_path: str, transform: str | None = None) -> None:
    global _worker
    sp = load_sentencepiece(model_path)
    _worker = DocEncoder(sp, byte_tables(sp, sp.vocab_size()), transform)


def _encode_chunk(texts: list[str], first: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each text's [BOS] + ids and per-token original byte counts (pgolf.sidecar), flattened."""
    docs = []
    for k, text in enumerate(texts):
        try:
            docs.append(_worker.encode(text))
        except (SidecarError, caseops.CaseOpsError) as e:
            raise SidecarError(f"document {first + k} (0-based, in file order): {e}") from None
    return (np.concatenate([d[0] for d in docs]), np.array([d[0].size for d in docs], dtype=np.int64),
            np.concatenate([d[1] for d in docs]).astype(np.int64))


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unpack(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    flat, lengths, counts = result
    cuts = np.cumsum(lengths)[:-1]
    return list(zip(np.split(flat, cuts), np.split(counts, cuts)))


def encode_in_order(texts: Iterable[str], model_path: str | Path, workers: int,
                    transform: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each text's ([BOS] + ids, byte counts), in input order. At most 2 chunks per worker are in flight,
    so memory stays bounded however large the input is (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        _init_worker(str(model_path), transform)
        for n, chunk in enumerate(_chunks(texts, CHUNK_DOCS)):
            yield from _unpack(_encode_chunk(chunk, n * CHUNK_DOCS))
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(model_path), transform)) as pool:
        pending: deque = deque()
        for n, chunk in enumerate(_chunks(texts, CHUNK_DOCS)):
            pending.append(pool.apply_async(_encode_chunk, (chunk, n * CHUNK_DOCS)))
            if len(pending) >= 2 * workers:
                yield from _unpack(pending.popleft().get())
        while pending:
            yield from _unpack(pending.popleft().get())


def _training_texts(docs: Path, num_val_docs: int, limit: int | None, transform: str | None) -> list[str]:
    texts = list(islice((t for _, _, t in iter_documents(docs)), num_val_docs,
                        None if limit is None else num_val_docs + limit))
    if transform:
        norm = normalizer()
        texts = [caseops.encode(canonical(norm, t)) for t in texts]
    return texts


def _setup_tokenizer(staging: Path, docs: Path, tokenizer: str | None, vocab_size: int | None,
                     num_val_docs: int, tokenizer_train_docs: int, log: Callable[[str], None],
                     transform: str | None = None) -> dict:
    """Copy the given model, or train one on the train documents only (never on val text); with a
    transform, on the transformed text, with the transform's markers reserved as pieces."""
    target = staging / TOKENIZER_NAME
    if tokenizer:
        sp = load_sentencepiece(tokenizer)
        if vocab_size and sp.vocab_size() != vocab_size:
            raise ValueError(f"--tokenizer {tokenizer} has vocab size {sp.vocab_size()} but --vocab-size is "
                             f"{vocab_size}; drop --vocab-size or pass the model trained for it")
        shutil.copyfile(tokenizer, target)
        if Path(tokenizer).with_suffix(".vocab").is_file():
            shutil.copyfile(Path(tokenizer).with_suffix(".vocab"), target.with_suffix(".vocab"))
        source, trained_docs = str(tokenizer), 0
    else:
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        limit = tokenizer_train_docs if tokenizer_train_docs > 0 else None
        texts = _training_texts(docs, num_val_docs, limit, transform)
        if not texts:
            raise ValueError(f"{docs}: no train documents after the first {num_val_docs} (val) to train a "
                             "tokenizer on; lower --num-val-docs or pass --tokenizer MODEL")
        log(f"training a {vocab_size}-token BPE tokenizer on {len(texts):,} train documents")
        try:
            train_sentencepiece(texts, vocab_size, target, reserved=caseops.CASEOPS_MARKERS if transform else ())
        except RuntimeError as e:  # SentencePiece's own complaints, e.g. a vocab smaller than the characters
            raise ValueError(f"--vocab-size {vocab_size}: SentencePiece cannot train on {docs} "
                             f"({str(e).strip().splitlines()[-1]}); choose another --vocab-size") from None
        sp = load_sentencepiece(target)
        source, trained_docs = "trained", len(texts)
    if sp.bos_id() != BOS_TOKEN or sp.vocab_size() > 2**16:
        raise ValueError(f"{tokenizer or target}: bos_id {sp.bos_id()}, vocab size {sp.vocab_size()}; shards need "
                         f"BOS id {BOS_TOKEN} and at most 65536 ids (train with the challenge settings)")
    markers = tokenizer_markers(sp)
    if bool(transform) != bool(markers) or (transform and len(markers) != len(caseops.CASEOPS_MARKERS)):
        raise ValueError(f"{tokenizer or target}: has {len(markers)} of the {len(caseops.CASEOPS_MARKERS)} CaseOps marker "
                         f"pieces, but the dataset is {'CaseOps' if transform else 'untransformed'}; "
                         + ("pass a tokenizer trained with --caseops" if transform else "add --caseops"))
    return {"model_path": TOKENIZER_NAME, "sha256": sha256_file(target), "vocab_size": sp.vocab_size(),
            "bos_id": BOS_TOKEN, "source": source, "trained_on_docs": trained_docs}


def _progress_bar(total: int, enabled: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=not enabled, leave=False)


def _encode_splits(docs: Path, staging: Path, num_val_docs: int, shard_tokens: int, workers: int,
                   progress: bool | None, transform: str | None = None, byte_sidecar: bool = False) -> tuple[dict, dict]:
    """Write both splits' shards (and the val byte sidecar, aligned shard for shard); return the per-split
    stats, with each split's original UTF-8 bytes, and the input's description."""
    hasher = hashlib.sha256()
    bar = _progress_bar(docs.stat().st_size, progress)

    def texts() -> Iterator[str]:
        for _, end, text in iter_documents(docs, hasher):
            bar.update(end - bar.n)
            yield text

    writers = {"val": ShardWriter(staging, "val", shard_tokens), "train": ShardWriter(staging, "train", shard_tokens)}
    sidecar = ShardWriter(staging, "val_bytes", shard_tokens) if byte_sidecar else None
    skipped, nbytes = {"val": 0, "train": 0}, {"val": 0, "train": 0}
    count = 0
    with bar:
        for count, (ids, counts) in enumerate(encode_in_order(texts(), staging / TOKENIZER_NAME, workers,
                                                              transform), 1):
            split = "val" if count <= num_val_docs else "train"
            if ids.size == 1:  # BOS alone: nothing left after normalization
                skipped[split] += 1
                continue
            assert ids[0] == BOS_TOKEN and counts[0] == 0  # every document starts with its BOS, worth 0 bytes
            writers[split].add(ids)
            nbytes[split] += int(counts.sum())
            if split == "val" and sidecar is not None:
                sidecar.add(counts.astype(np.uint16))
    if count == 0:
        raise ValueError(f"{docs}: no documents (every line is blank)")
    if count < num_val_docs:
        raise ValueError(f"{docs}: {count} documents, fewer than --num-val-docs {num_val_docs}; a short val split "
                         "would silently change the metric, so lower --num-val-docs")
    if num_val_docs and not writers["val"].docs:
        raise ValueError(f"{docs}: all {num_val_docs} val documents are empty after normalization; a val split "
                         "needs text: check the input's \"text\" fields")
    splits = {name: {**w.close(), "skipped_empty": skipped[name], "bytes": nbytes[name]}
              for name, w in writers.items()}
    if sidecar is not None:
        sidecar.close()
    return splits, {"path": str(docs), "sha256": hasher.hexdigest(), "documents": count}


def _install(staging: Path, out: Path) -> None:
    """Swap the finished dataset into place; the old one (if any) is removed only afterwards."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old)


def prepare_dataset(docs: str | Path, out: str | Path, *, tokenizer: str | None = None, vocab_size: int | None = None,
                    num_val_docs: int = DEFAULT_NUM_VAL_DOCS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                    workers: int | None = None, overwrite: bool = False, byte_sidecar: bool = False,
                    tokenizer_train_docs: int = 0, progress: bool | None = None, transform: str | None = None,
                    log: Callable[[str], None] | None = print) -> dict:
    """Tokenize docs into out/ (shards, tokenizer.model, manifest.json); return the manifest.
    transform="caseops" applies pgolf.caseops (and always writes the val byte sidecar)."""
    docs, out, log = Path(docs), Path(out), log or (lambda message: None)
    if not docs.is_file():
        raise ValueError(f"--docs {docs}: no such file")
    if num_val_docs < 0 or shard_tokens < 1:
        raise ValueError(f"--num-val-docs {num_val_docs} must be >= 0 and --shard-tokens {shard_tokens} >= 1")
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the dataset private to this user
    try:
        byte_sidecar = byte_sidecar or bool(transform)  # a transform's bytes exist only in its sidecar
        tok = _setup_tokenizer(staging, docs, tokenizer, vocab_size, num_val_docs, tokenizer_train_docs, log,
                               transform)
        workers = max(1, workers or os.cpu_count() or 1)
        splits, source = _encode_splits(docs, staging, num_val_docs, shard_tokens, workers, progress, transform,
                                        byte_sidecar)
        manifest = {"format": PREPARE_FORMAT, "docs": source, "num_val_docs": num_val_docs,
                    "shard_tokens": shard_tokens, "append_eos": False, "byte_sidecar": byte_sidecar,
                    "normalization": NORMALIZATION, "transform": caseops.describe() if transform else None,
                    "tokenizer": tok, "splits": splits}
        write_atomic(staging / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
