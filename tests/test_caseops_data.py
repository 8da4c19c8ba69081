"""CaseOps datasets: prepare -> shards with BOS per document + exact byte sidecar -> verify -> training's checks."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pgolf import caseops
from pgolf.cli import main
from pgolf.data import read_shard, write_shard
from pgolf.eval import load_validation
from pgolf.prepare import prepare_dataset
from pgolf.sidecar import SidecarError, canonical, normalizer
from pgolf.verify_text import verify_with_texts

from tests.data_helpers import word_docs, write_jsonl

SPECIAL = ["The NASA iPhone, McDonald's ÉCOLE", "İstanbul STRAßE ΟΔΟΣ ǅ", f"marker {caseops.TITLE}{caseops.ESC} kept",
           "Москва МОСКВА 東京 \U0001f600", "  spaced\n\nOut  ", "A"]


def _cased_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for doc in word_docs(n, seed=seed, words=(20, 60)):
        words = [w.upper() if rng.random() < 0.1 else w.title() if rng.random() < 0.3 else w for w in doc.split(" ")]
        out.append(" ".join(words) + ".")
    return out


VAL = SPECIAL + _cased_docs(6, seed=3)
TRAIN = _cased_docs(150, seed=4)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops")
    docs = write_jsonl(root / "docs.jsonl", VAL + TRAIN)
    made = {}
    for name, transform in (("plain", None), ("caseops", "caseops")):
        made[name] = prepare_dataset(docs, root / name, vocab_size=400, num_val_docs=len(VAL), workers=1,
                                     byte_sidecar=True, transform=transform, log=None)
    return root


def _original_bytes(texts):
    norm = normalizer()
    return sum(len(canonical(norm, t).encode("utf-8")) for t in texts)


def test_sidecar_sums_to_the_original_bytes_and_bos_starts_every_document(datasets):
    m = json.loads((datasets / "caseops/manifest.json").read_text())
    assert m["transform"]["name"] == "caseops" and m["transform"]["version"] == caseops.TRANSFORM_VERSION
    tokens = read_shard(datasets / "caseops/fineweb_val_000000.bin")
    sidecar = read_shard(datasets / "caseops/fineweb_val_bytes_000000.bin").astype(np.int64)
    assert tokens.size == sidecar.size == m["splits"]["val"]["tokens"]
    want = _original_bytes(VAL)
    assert int(sidecar.sum()) == m["splits"]["val"]["bytes"] == want
    starts = np.flatnonzero(tokens == 1)
    assert starts.size == len(VAL) and starts[0] == 0 and np.all(sidecar[starts] == 0)
    train = read_shard(datasets / "caseops/fineweb_train_000000.bin")
    assert train[0] == 1 and int(np.count_nonzero(train == 1)) == len(TRAIN)
    # markers are pieces of their own and cover no bytes; an escaped literal (after ESC) covers its 3 bytes
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(datasets / "caseops/tokenizer.model"))
    marker_ids = [sp.piece_to_id(mk) for mk in caseops.CASEOPS_MARKERS]
    assert all(sp.id_to_piece(i) == mk for i, mk in zip(marker_ids, caseops.CASEOPS_MARKERS))
    at_markers = np.isin(tokens, marker_ids)
    literal = np.zeros_like(at_markers)
    literal[1:] = at_markers[1:] & (tokens[:-1] == marker_ids[3])
    assert at_markers.sum() > 20 and literal.sum() == 2
    assert np.all(sidecar[at_markers & ~literal] == 0) and np.all(sidecar[literal] == 3)


def test_val_bytes_equal_across_tokenizers_and_per_document(datasets):
    plain = json.loads((datasets / "plain/manifest.json").read_text())["splits"]["val"]["bytes"]
    cased = json.loads((datasets / "caseops/manifest.json").read_text())["splits"]["val"]["bytes"]
    assert plain == cased == _original_bytes(VAL)
    lines = []
    for name in ("plain", "caseops"):
        tokens, tables, sidecar = load_validation(str(datasets / name), str(datasets / name / "tokenizer.model"),
                                                  400, 0, lines.append)
        assert int(sidecar[1:].astype(np.int64).sum()) == plain  # the targets' bytes: what bpb divides by
    assert sum("byte_sidecar:enabled" in line for line in lines) == 2


def test_verify_passes_with_zero_mismatches(datasets, capsys):
    for name in ("plain", "caseops"):
        report, text = verify_with_texts(datasets / name)
        assert report.ok, report.problems
        assert text.docs_checked == len(VAL) + len(TRAIN) and text.source.endswith("docs.jsonl")
        assert text.text_mismatches == 0 and text.sidecar_mismatches == 0
    assert main(["data", "verify", str(datasets / "caseops")]) == 0
    out = capsys.readouterr().out
    assert f"text round trip: {len(VAL) + len(TRAIN):,} documents against" in out and out.rstrip().endswith("OK")


def _copy(datasets, tmp_path, name="caseops"):
    import shutil
    return shutil.copytree(datasets / name, tmp_path / name)


def test_off_by_one_sidecar_is_caught_by_verify_and_refused_by_training(datasets, tmp_path):
    copy = _copy(datasets, tmp_path)
    path = copy / "fineweb_val_bytes_000000.bin"
    counts = read_shard(path).copy()
    tokens = read_shard(copy / "fineweb_val_000000.bin")
    doc2 = int(np.flatnonzero(tokens == 1)[2])
    counts[doc2 + 3] += 1  # one byte too many on the third document's third token
    write_shard(path, counts)
    report, text = verify_with_texts(copy)
    assert not report.ok and text.sidecar_mismatches == 1
    assert any("document 2 of the val split: byte sidecar sums to" in p and "token 3" in p for p in report.problems)
    with pytest.raises(SidecarError, match="sums to .* but .* records .* val bytes"):
        load_validation(str(copy), str(copy / "tokenizer.model"), 400, 0, lambda line: None)


def test_corrupted_tokens_are_reported_with_document_and_character(datasets, tmp_path):
    copy = _copy(datasets, tmp_path)
    path = copy / "fineweb_val_000000.bin"
    tokens = read_shard(path).copy()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(copy / "tokenizer.model"))
    title, allcaps = sp.piece_to_id(caseops.TITLE), sp.piece_to_id(caseops.ALLCAPS)
    doc0_end = int(np.flatnonzero(tokens == 1)[1])
    first = int(np.flatnonzero(tokens[:doc0_end] == title)[0])  # "The" -> TITLE the
    tokens[first] = allcaps  # now decodes to "THE"
    write_shard(path, tokens)
    report, text = verify_with_texts(copy)
    assert text.text_mismatches == 1
    assert any("document 0 of the val split: decoded text differs from the source document at character 1: 'HE NASA"
               in p for p in report.problems), report.problems


def test_training_refuses_a_tokenizer_that_does_not_match_the_transform(datasets):
    quiet = lambda line: None  # noqa: E731
    with pytest.raises(SidecarError, match="records the caseops transform, but tokenizer .* has 0 of its 4 marker"):
        load_validation(str(datasets / "caseops"), str(datasets / "plain/tokenizer.model"), 400, 0, quiet)
    with pytest.raises(SidecarError, match="reserves CaseOps marker pieces, but .* records no text transform"):
        load_validation(str(datasets / "plain"), str(datasets / "caseops/tokenizer.model"), 400, 0, quiet)


def test_training_refuses_a_caseops_dataset_without_its_sidecar(datasets, tmp_path):
    copy = _copy(datasets, tmp_path)
    (copy / "fineweb_val_bytes_000000.bin").unlink()
    with pytest.raises(SidecarError, match="needs its byte sidecar"):
        load_validation(str(copy), str(copy / "tokenizer.model"), 400, 0, lambda line: None)


def test_bad_inputs_fail_cleanly_and_leave_nothing(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", VAL[:2] + TRAIN[:20])
    with pytest.raises(ValueError, match="supports only .* pieces, not the 8192 asked for; lower --vocab-size"):
        prepare_dataset(docs, tmp_path / "out", vocab_size=8192, num_val_docs=2, workers=1, transform="caseops",
                        log=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid UTF-8 byte b'\\xe9'"):
        prepare_dataset(bad, tmp_path / "out", vocab_size=300, num_val_docs=1, workers=1, transform="caseops",
                        log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs.jsonl"]


def test_download_of_the_published_caseops_variant_fetches_its_sidecar(datasets, tmp_path):
    from pgolf.download import DEFAULT_REPO_ID, LocalHub, download, repo_for

    variant = "sp8192_lossless_caps_caseops_v1_reserved"
    assert repo_for(variant, None) == "romeerp/parameter-golf-caseops-v1" and repo_for("sp8192", None) != DEFAULT_REPO_ID
    assert repo_for("sp1024", None) == DEFAULT_REPO_ID and repo_for(variant, "me/mirror") == "me/mirror"
    root = tmp_path / "hub/datasets"  # a fake hub in the challenge layout, made from the CaseOps dataset
    folder = root / f"datasets/fineweb10B_{variant}"
    folder.mkdir(parents=True)
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "fineweb_train_000000.bin"):
        (folder / name).write_bytes((datasets / "caseops" / name).read_bytes())
    (root / "tokenizers").mkdir()
    (root / "tokenizers/caseops.model").write_bytes((datasets / "caseops/tokenizer.model").read_bytes())
    stats = {"files_val": 1, "files_train": 1, "docs_val": len(VAL), "docs_train": len(TRAIN)}
    (root / "manifest.json").write_text(json.dumps({
        "tokenizers": [{"name": "caseops", "vocab_size": 400, "model_path": "tokenizers/caseops.model"}],
        "datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "caseops", "stats": stats}]}))
    summary = download(variant, 1, tmp_path / "data", LocalHub(tmp_path / "hub"), log=lambda line: None)
    data = tmp_path / "data" / f"datasets/fineweb10B_{variant}"
    assert summary["fetched"] == 4 and (data / "fineweb_val_bytes_000000.bin").is_file()
    tokens, tables, sidecar = load_validation(str(data), summary["tokenizer_path"], 400, 0, lambda line: None)
    assert int(sidecar.astype(np.int64).sum()) == _original_bytes(VAL)
    report, text = verify_with_texts(data)  # no pgolf manifest: the tokenizer's markers say CaseOps
    assert report.ok and text.docs_checked == len(VAL) + len(TRAIN) and text.sidecar_mismatches == 0
    (data / "fineweb_val_bytes_000000.bin").unlink()  # a marker tokenizer without its sidecar is refused
    with pytest.raises(SidecarError, match="needs its byte sidecar"):
        load_validation(str(data), summary["tokenizer_path"], 400, 0, lambda line: None)


def test_two_workers_and_small_shards_give_the_same_dataset(datasets, tmp_path):
    """Encoding in 2 processes, and documents continuing across shards, change nothing; verify agrees."""
    docs = datasets / "docs.jsonl"
    out = prepare_dataset(docs, tmp_path / "two", tokenizer=str(datasets / "caseops/tokenizer.model"),
                          num_val_docs=len(VAL), workers=2, shard_tokens=97, transform="caseops", log=None)
    assert len(out["splits"]["val"]["shards"]) > 5
    for split in ("val", "val_bytes", "train"):
        joined = np.concatenate([read_shard(f) for f in sorted((tmp_path / "two").glob(f"fineweb_{split}_0*.bin"))])
        assert np.array_equal(joined, read_shard(datasets / f"caseops/fineweb_{split}_000000.bin")), split
    report, text = verify_with_texts(tmp_path / "two")
    assert report.ok, report.problems
    assert text.docs_checked == len(VAL) + len(TRAIN) and text.text_mismatches == text.sidecar_mismatches == 0


def test_an_all_empty_val_split_is_an_error_and_leaves_nothing(datasets, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", ["", "  \n ", *TRAIN[:3]])
    with pytest.raises(ValueError, match="all 2 val documents are empty after normalization"):
        prepare_dataset(docs, tmp_path / "out", tokenizer=str(datasets / "caseops/tokenizer.model"), num_val_docs=2,
                        workers=1, transform="caseops", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_a_missing_bos_is_reported(datasets, tmp_path):
    copy = _copy(datasets, tmp_path)
    tokens = read_shard(copy / "fineweb_val_000000.bin").copy()
    third = int(np.flatnonzero(tokens == 1)[3])
    write_shard(copy / "fineweb_val_000000.bin", np.delete(tokens, third))  # documents 2 and 3 run together
    counts = read_shard(copy / "fineweb_val_bytes_000000.bin")
    write_shard(copy / "fineweb_val_bytes_000000.bin", np.delete(counts, third))
    report, text = verify_with_texts(copy)
    assert any(p.endswith(f"the val split has {len(VAL) - 1} documents, the source gives {len(VAL)}")
               for p in report.problems), report.problems
    assert any(p.startswith("document 2 of the val split: ") for p in report.problems)
