"""`pgolf data prepare`: exact token ids, split/shard layout, determinism, manifest, and every bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

import pgolf.prepare as prepare_mod
from pgolf.cli import main
from pgolf.data import read_shard
from pgolf.prepare import DocumentError, prepare_dataset
from pgolf.verify import sha256_file

from tests.data_helpers import train_tokenizer, word_docs, write_jsonl

# Documents whose ids under the test tokenizer were computed once and checked by reasoning:
#  - "plqor nponz aggsg": lexicon words; pieces p|lqor|▁nponz|▁|ag|g|sg (learned merges);
#  - "é 2024!": é is C3 A9 -> byte-fallback ids 4+0xC3=199, 4+0xA9=173; "▁" alone is 273; split digits
#    2,0,2,4 -> 4+0x32=54, 52, 54, 56; "!" -> 4+0x21=37 (none of these characters is in the corpus);
#  - "   ": nothing left after normalization -> skipped, counted;
#  - "a\nb": nmt_nfkc turns the newline into a space -> a|▁|b.
KNOWN_TEXTS = ["plqor nponz aggsg", "é 2024!", "   ", "a\nb"]
KNOWN_VAL = [1, 275, 263, 269, 273, 272, 278, 270, 1, 199, 173, 273, 54, 52, 54, 56, 37]
KNOWN_TRAIN = [1, 282, 273, 290]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")


def test_known_input_gives_exact_ids(tmp_path, tokenizer):
    docs = write_jsonl(tmp_path / "docs.jsonl", KNOWN_TEXTS)
    manifest = prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=2, workers=1, log=None)
    val = read_shard(tmp_path / "out/fineweb_val_000000.bin")
    train = read_shard(tmp_path / "out/fineweb_train_000000.bin")
    assert val.tolist() == KNOWN_VAL
    assert train.tolist() == KNOWN_TRAIN
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    # the ids are the tokenizer's own encoding, and decode back to the (normalized) text
    assert KNOWN_VAL[1:8] == sp.encode(KNOWN_TEXTS[0]) and sp.decode(KNOWN_VAL[1:8]) == KNOWN_TEXTS[0]
    assert sp.decode(KNOWN_VAL[9:]) == KNOWN_TEXTS[1] and sp.decode(KNOWN_TRAIN[1:]) == "a b"
    # bytes: the UTF-8 length of the normalized text, 17 + 8 ("é" is 2 bytes) and 3 ("a b")
    assert manifest["splits"]["val"] == {"docs": 2, "tokens": 17, "shards": ["fineweb_val_000000.bin"],
                                         "skipped_empty": 0, "bytes": 25}
    assert manifest["splits"]["train"] == {"docs": 1, "tokens": 4, "shards": ["fineweb_train_000000.bin"],
                                           "skipped_empty": 1, "bytes": 3}
    assert manifest["transform"] is None and manifest["normalization"] == "nmt_nfkc"
    assert manifest["tokenizer"]["sha256"] == sha256_file(tokenizer) == sha256_file(tmp_path / "out/tokenizer.model")
    assert manifest["tokenizer"]["vocab_size"] == 300 and manifest["docs"]["documents"] == 4
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == manifest


def test_shards_are_full_and_splits_never_share(tmp_path, tokenizer):
    texts = word_docs(30, seed=11, words=(5, 20))
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    m = prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=12, shard_tokens=50,
                        workers=1, log=None)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    for split, part in (("val", texts[:12]), ("train", texts[12:])):
        expected = np.concatenate([[1] + sp.encode(t) for t in part])
        shards = [read_shard(tmp_path / "out" / name) for name in m["splits"][split]["shards"]]
        assert [s.size for s in shards[:-1]] == [50] * (len(shards) - 1) and 0 < shards[-1].size <= 50
        assert len(shards) == -(-expected.size // 50)
        assert np.array_equal(np.concatenate(shards), expected)  # val tokens only in val shards, in order
        assert m["splits"][split]["tokens"] == expected.size and m["splits"][split]["docs"] == len(part)


def test_output_is_the_same_for_any_worker_count(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_mod, "CHUNK_DOCS", 3)  # many chunks in flight across 2 processes
    docs = write_jsonl(tmp_path / "docs.jsonl", word_docs(40, seed=5, words=(3, 30)))
    out = {}
    for workers in (1, 2):
        prepare_dataset(docs, tmp_path / f"w{workers}", tokenizer=str(tokenizer), num_val_docs=7, shard_tokens=97,
                        workers=workers, log=None)
        out[workers] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"w{workers}").iterdir())}
    assert out[1] == out[2] and len([n for n in out[1] if n.endswith(".bin")]) > 4


def test_trained_tokenizer_never_sees_val_text(tmp_path):
    val = ["ζζζζ ωωωω " * 20] * 5  # characters that occur only in val documents
    docs = write_jsonl(tmp_path / "docs.jsonl", val + word_docs(60, seed=3))
    m = prepare_dataset(docs, tmp_path / "out", vocab_size=300, num_val_docs=5, workers=1, log=None)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out/tokenizer.model"))
    assert m["tokenizer"]["trained_on_docs"] == 60 and m["tokenizer"]["source"] == "trained"
    assert sp.piece_to_id("ζ") == sp.unk_id() and sp.piece_to_id("ω") == sp.unk_id()
    assert read_shard(tmp_path / "out/fineweb_val_000000.bin")[1] == 4 + 0xCE  # ζ = CE B6 via byte fallback
    capped = prepare_dataset(docs, tmp_path / "capped", vocab_size=300, num_val_docs=5, tokenizer_train_docs=20,
                             workers=1, log=None)
    assert capped["tokenizer"]["trained_on_docs"] == 20


@pytest.mark.parametrize("raw, fragment", [
    (b'{"text": "ok"}\n{"title": "no text here"}\n', 'docs.jsonl:2: no string field "text"'),
    (b'{"text": "ok"}\n{"text": 5}\n', 'docs.jsonl:2: no string field "text"'),
    (b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n',  # 15 + 1 + 13 bytes come before the bad one
     "docs.jsonl:3: invalid UTF-8 byte b'\\xe9' at file offset 29 (column 14)"),
    (b'{"text": "ok"}\n{"text": "x\\ud800"}\n', "docs.jsonl:2: text character 1 is an unpaired surrogate"),
    (b'{"text": "ok"}\n{"text": "unterminated\n', "docs.jsonl:2: not valid JSON"),
])
def test_bad_documents_name_file_and_line_and_leave_nothing(tmp_path, tokenizer, raw, fragment):
    (tmp_path / "docs.jsonl").write_bytes(raw)
    with pytest.raises(DocumentError) as err:
        prepare_dataset(tmp_path / "docs.jsonl", tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=1,
                        workers=1, log=None)
    assert fragment in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no out/, no partial dir


def test_existing_output_needs_overwrite_and_survives_a_failed_run(tmp_path, tokenizer, monkeypatch):
    docs = write_jsonl(tmp_path / "docs.jsonl", KNOWN_TEXTS)
    prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=2, workers=1, log=None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="already exists .* pass --overwrite"):
        prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=1, workers=1, log=None)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "write_atomic", crash)  # fails after the shards and sidecar, at the manifest
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=1, workers=1,
                        overwrite=True, byte_sidecar=True, log=None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    monkeypatch.undo()
    m = prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=1, workers=1,
                        overwrite=True, log=None)
    assert m["splits"]["val"]["docs"] == 1
    assert read_shard(tmp_path / "out/fineweb_val_000000.bin").tolist() == KNOWN_VAL[:8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]


def test_overwrite_refuses_a_directory_with_foreign_files(tmp_path, tokenizer):
    docs = write_jsonl(tmp_path / "docs.jsonl", KNOWN_TEXTS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt', which prepare does not write"):
        prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=2, workers=1,
                        overwrite=True, log=None)
    assert (tmp_path / "out/notes.txt").read_text() == "mine"


def test_tokenizer_and_split_mismatches(tmp_path, tokenizer):
    docs = write_jsonl(tmp_path / "docs.jsonl", KNOWN_TEXTS)
    with pytest.raises(ValueError, match="has vocab size 300 but --vocab-size is 1024"):
        prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), vocab_size=1024, num_val_docs=2, log=None)
    with pytest.raises(ValueError, match="4 documents, fewer than --num-val-docs 5"):
        prepare_dataset(docs, tmp_path / "out", tokenizer=str(tokenizer), num_val_docs=5, workers=1, log=None)
    with pytest.raises(ValueError, match="no train documents after the first 4"):
        prepare_dataset(docs, tmp_path / "out", vocab_size=300, num_val_docs=4, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_cli_prepare_prints_counts_and_exits_2_on_bad_input(tmp_path, tokenizer, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", KNOWN_TEXTS)
    out = tmp_path / "out"
    args = ["data", "prepare", "--docs", str(docs), "--out", str(out), "--tokenizer", str(tokenizer),
            "--num-val-docs", "2", "--workers", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "val: docs:2 tokens:17 bytes:25 shards:1 skipped_empty:0" in printed
    assert "train: docs:1 tokens:4 bytes:3 shards:1 skipped_empty:1" in printed
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
