"""Documents to token ids and per-token original byte counts, with or without a text transform, and the
checks that keep a transformed dataset from being scored on the wrong bytes.

The text a document is scored on is its *canonical* text: the tokenizer's normalization (nmt_nfkc,
extra whitespace removed, no dummy prefix) of the raw text, which is what an untransformed tokenizer's
decode gives back. With CaseOps (pgolf.caseops) the tokens encode caseops.encode(canonical), and the
byte sidecar gives each token the canonical text's UTF-8 bytes it covers:

- a token covers the bytes of the transformed text that the metric's tables give it
  (pgolf.eval.ByteTables, the one accounting; BOS covers none);
- each transformed character stands for caseops.original_byte_lengths of it: markers for 0 bytes, a
  lowered letter for its capital's bytes, anything else for itself;
- a character whose original length equals its transformed length gives one original byte per
  transformed byte (so byte-fallback tokens count 1 each, as in the tables); one whose lengths differ
  (markers, and the few letters whose capital has another UTF-8 length) puts all of its original
  bytes on its last transformed byte, i.e. on the token that completes it.

So the sidecar sums to the canonical text's UTF-8 length exactly, markers count 0, and without a
transform the sidecar equals the tables' counts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pgolf import caseops
from pgolf.caseops import CASEOPS_MARKERS, TRANSFORM_NAME, TRANSFORM_VERSION
from pgolf.spm import BOS_TOKEN

NORMALIZATION = "nmt_nfkc"
FOREIGN = "unknown"  # a tokenizer with private-use pieces that are not pgolf's CaseOps markers (another transform)


class SidecarError(ValueError):
    pass


def normalizer():
    """The challenge tokenizer's normalization, as a standalone SentencePiece normalizer."""
    import sentencepiece as spm

    return spm.SentencePieceNormalizer(rule_name=NORMALIZATION, add_dummy_prefix=False)


def canonical(norm, text: str) -> str:
    """The text an untransformed tokenizer's decode would give back (its spaces are "\u2581" inside)."""
    return norm.normalize(text).replace("\u2581", " ")


def token_spans(tables, ids: np.ndarray) -> np.ndarray:
    """Bytes of the decoded text each token covers: the tables' counts, prev starting at the BOS."""
    out = np.zeros(ids.size, dtype=np.int64)
    if ids.size > 1:
        t = torch.from_numpy(ids.astype(np.int64))
        out[1:] = tables.count(t[:-1], t[1:]).numpy()
    return out


def transformed_counts(tables, ids: np.ndarray, text: str) -> np.ndarray:
    """Per token of [BOS] + ids, the original bytes it covers, given the transformed text they decode to."""
    data = text.encode("utf-8")
    spans = token_spans(tables, ids)
    if int(spans.sum()) != len(data):
        raise SidecarError(f"the tokens cover {int(spans.sum())} bytes but their text has {len(data)}")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    char_bytes = 1 + sum((codes > limit).astype(np.int64) for limit in (0x7F, 0x7FF, 0xFFFF))
    last_byte = np.cumsum(char_bytes) - 1
    weights = np.ones(len(data), dtype=np.int64)
    for index, original in caseops.length_changes(text):
        weights[last_byte[index] - char_bytes[index] + 1:last_byte[index]] = 0
        weights[last_byte[index]] = original
    cumulative = np.concatenate([[0], np.cumsum(weights)])
    ends = np.cumsum(spans)
    return cumulative[ends] - cumulative[ends - spans]


class DocEncoder:
    """One document -> ([BOS] + ids, per-token original byte counts), under the dataset's transform."""

    def __init__(self, sp, tables, transform: str | None):
        if transform not in (None, TRANSFORM_NAME):
            raise ValueError(f"unknown text transform {transform!r}; known: {TRANSFORM_NAME}")
        self.sp, self.tables, self.transform = sp, tables, transform
        self.norm = normalizer() if transform else None

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self.transform is None:
            ids = np.asarray([BOS_TOKEN, *self.sp.encode(text)], dtype=np.uint16)
            return ids, token_spans(self.tables, ids)
        transformed = caseops.encode(canonical(self.norm, text))
        ids = np.asarray([BOS_TOKEN, *self.sp.encode(transformed)], dtype=np.uint16)
        decoded = self.sp.decode(ids[1:].tolist())
        if decoded != transformed:
            k = next((i for i, (a, b) in enumerate(zip(decoded, transformed)) if a != b), min(len(decoded),
                                                                                          len(transformed)))
            raise SidecarError(f"the tokenizer does not give the transformed text back (from character {k}: "
                               f"{transformed[k:k + 12]!r} became {decoded[k:k + 12]!r})")
        return ids, transformed_counts(self.tables, ids, transformed)


def tokenizer_markers(sp) -> list[str]:
    """The CaseOps markers the tokenizer has as pieces of their own."""
    found = []
    for marker in CASEOPS_MARKERS:
        i = sp.piece_to_id(marker)
        if i != sp.unk_id() and sp.id_to_piece(i) == marker:
            found.append(marker)
    return found


def private_use_pieces(sp) -> int:
    """Pieces that are one private-use character: a text transform's markers (ours or another's)."""
    return sum(1 for i in range(sp.vocab_size()) if len(p := sp.id_to_piece(i)) == 1 and 0xE000 <= ord(p) <= 0xF8FF)


def dataset_manifest(data_path: str | Path) -> dict | None:
    """DATA_PATH/manifest.json when `pgolf data prepare` wrote it, else None."""
    path = Path(data_path) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if str(manifest.get("format", "")).startswith("pgolf-prepare/") else None


def check_transform(manifest: dict | None, sp, tokenizer_path, where) -> str | None:
    """The dataset's transform name, after checking that the tokenizer was made for it."""
    transform = (manifest or {}).get("transform")
    markers = tokenizer_markers(sp)
    if transform:
        name, version = transform.get("name"), transform.get("version")
        if name != TRANSFORM_NAME or version != TRANSFORM_VERSION:
            raise SidecarError(f"{where} records text transform {name} v{version}, but this pgolf implements "
                               f"{TRANSFORM_NAME} v{TRANSFORM_VERSION}; prepare the dataset again")
        if len(markers) != len(CASEOPS_MARKERS):
            raise SidecarError(f"{where} records the {name} transform, but tokenizer {tokenizer_path} has "
                               f"{len(markers)} of its {len(CASEOPS_MARKERS)} marker pieces; use the tokenizer "
                               "the dataset was prepared with (TOKENIZER_PATH)")
        return name
    if manifest is not None and markers:
        raise SidecarError(f"tokenizer {tokenizer_path} reserves CaseOps marker pieces, but {where} records no "
                           "text transform; use the tokenizer the dataset was prepared with (TOKENIZER_PATH)")
    if len(markers) == len(CASEOPS_MARKERS):
        return TRANSFORM_NAME
    return FOREIGN if private_use_pieces(sp) else None


def check_sidecar(data_path: str, sp, tokenizer_path, tokens: np.ndarray, sidecar: np.ndarray | None) -> None:
    """Refuse to score a dataset whose byte counts cannot be right: a transform's tokenizer that does not
    match, a transform without a sidecar, a sidecar whose total differs from the manifest's val bytes,
    or bytes on a BOS. tokens/sidecar: the whole val split, aligned."""
    manifest = dataset_manifest(data_path)
    where = Path(data_path) / "manifest.json"
    transform = check_transform(manifest, sp, tokenizer_path, where)
    if transform and sidecar is None:
        raise SidecarError(f"{data_path}: a {transform} dataset needs its byte sidecar fineweb_val_bytes_*.bin "
                           "(the tables would count the transformed text); prepare it with pgolf data prepare")
    if sidecar is None:
        return
    want = ((manifest or {}).get("splits") or {}).get("val", {}).get("bytes")
    total = int(sidecar.astype(np.int64).sum())
    if want is not None and total != want:
        raise SidecarError(f"{data_path}: the byte sidecar sums to {total:,} bytes but {where} records {want:,} "
                           "val bytes; the sidecar is corrupt: prepare the dataset again (pgolf data verify "
                           "names the document)")
    bad = np.flatnonzero((tokens == BOS_TOKEN) & (sidecar != 0))
    if bad.size:
        raise SidecarError(f"{data_path}: the byte sidecar gives {int(sidecar[bad[0]])} bytes to the BOS at val "
                           f"offset {int(bad[0])}, which covers none; prepare the dataset again")
