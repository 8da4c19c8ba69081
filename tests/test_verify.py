"""`pgolf data verify` and the byte sidecar: round trip into the loaders, exact byte accounting, failures."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch
from torch import nn

from pgolf.cli import main
from pgolf.data import DistributedTokenLoader, load_byte_sidecar, load_tokens, read_shard, val_pattern, write_shard
from pgolf.eval import byte_tables, evaluate
from pgolf.prepare import prepare_dataset
from pgolf.spm import train_sentencepiece
from pgolf.verify import DataCheckError, verify_dataset

from tests.data_helpers import train_tokenizer, word_docs, write_jsonl

NUM_VAL = 6
SPECIAL = ["café 2024: ünïcödé ✓", "日本語のテキスト", "  leading and   trailing  ", "tab\tand\nnewline"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared dataset whose documents span shards of 40 tokens, with a val byte sidecar."""
    root = tmp_path_factory.mktemp("prepared")
    tokenizer = train_tokenizer(root / "tok.model")
    texts = SPECIAL[:2] + word_docs(14, words=(5, 25))[:4] + SPECIAL[2:] + word_docs(14, words=(5, 25))[4:]
    docs = write_jsonl(root / "docs.jsonl", texts)
    prepare_dataset(docs, root / "data", tokenizer=str(tokenizer), num_val_docs=NUM_VAL, shard_tokens=40,
                    workers=1, byte_sidecar=True, log=None)
    return root / "data", texts


def copy_of(prepared, tmp_path):
    shutil.copytree(prepared[0], tmp_path / "data")
    return tmp_path / "data"


def test_prepare_verify_load_round_trip(prepared):
    data, texts = prepared
    manifest = json.loads((data / "manifest.json").read_text())
    report = verify_dataset(data)
    assert report.ok and report.mismatches == 0, report.problems
    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    for split, part in (("val", texts[:NUM_VAL]), ("train", texts[NUM_VAL:])):
        total = report.totals(split)
        assert (total.tokens, total.docs) == (manifest["splits"][split]["tokens"], manifest["splits"][split]["docs"])
        assert [r.name for r in report.rows if r.split == split] == manifest["splits"][split]["shards"]
        # the metric's bytes are the UTF-8 bytes of the normalized text (what the tokenizer decodes to)
        assert total.bytes == sum(len(sp.decode(sp.encode(t)).encode()) for t in part)
    assert report.docs_checked == len(texts) and len(report.rows) > 6  # documents cross shard boundaries
    val = load_tokens(val_pattern(str(data)), vocab_size=300)
    assert val.tolist() == [tok for t in texts[:NUM_VAL] for tok in [1] + sp.encode(t)]
    train = np.concatenate([[1] + sp.encode(t) for t in texts[NUM_VAL:]])
    loader = DistributedTokenLoader(str(data / "fineweb_train_*.bin"), 0, 1, torch.device("cpu"), vocab_size=300)
    x, y = loader.next_batch(global_tokens=96, seq_len=32, grad_accum_steps=1)  # spans 3 train shards
    assert x.flatten().tolist() == train[:96].tolist() and y.flatten().tolist() == train[1:97].tolist()


class TinyLM(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def hidden(self, x):
        return self.emb(x)

    def logits(self, h):
        return self.head(h)


def test_metric_uses_the_sidecar(prepared):
    data, _ = prepared
    tokens = load_tokens(val_pattern(str(data)))
    sidecar = load_byte_sidecar(str(data), tokens.size)
    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    tables = byte_tables(sp, 300)
    model = TinyLM(300)
    kw = dict(seq_len=16, stride=16, batch_seqs=4)
    with_sidecar = evaluate(model, tokens, None, byte_counts=sidecar, **kw)
    with_tables = evaluate(model, tokens, tables, **kw)
    assert with_sidecar.bytes == int(sidecar.sum()) == with_tables.bytes == verify_dataset(data).totals("val").bytes
    assert with_sidecar.val_loss == with_tables.val_loss and with_sidecar.val_bpb == with_tables.val_bpb
    doubled = evaluate(model, tokens, None, byte_counts=sidecar * 2, **kw)  # the sidecar, not the tables, counts
    assert doubled.bytes == 2 * with_tables.bytes and doubled.val_bpb == pytest.approx(with_tables.val_bpb / 2)


def test_sidecar_length_mismatch_fails(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    report = verify_dataset(data)
    assert report.ok and report.totals("val").sidecar_bytes == report.totals("val").bytes
    sidecar = data / "fineweb_val_bytes_000001.bin"
    counts = read_shard(sidecar)
    write_shard(sidecar, counts[:-1])
    report = verify_dataset(data)
    assert not report.ok
    assert report.problems[0].startswith(f"{sidecar}: {counts.size - 1} byte counts for the {counts.size} tokens "
                                         f"of fineweb_val_000001.bin (they diverge at token offset {counts.size - 1})")


def test_truncated_shard_fails_naming_it(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    shard = data / "fineweb_train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    report = verify_dataset(data)
    assert not report.ok and report.problems[0].startswith(f"{shard}: header says 40 tokens (1104 bytes) but the "
                                                           "file has 1101 bytes")


def test_token_errors_name_file_and_offset(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    shard = data / "fineweb_train_000001.bin"
    tokens = read_shard(shard)
    bad = tokens.copy()
    bad[7] = 300  # one past the vocab
    write_shard(shard, bad)
    assert verify_dataset(data).problems[0] == (f"{shard}: token 300 at offset 7 is >= vocab size 300; the shard "
                                               "was made with another tokenizer (set VOCAB_SIZE/TOKENIZER_PATH)")
    first = data / "fineweb_train_000000.bin"
    start = read_shard(first)
    write_shard(shard, tokens)
    write_shard(first, start[1:])
    assert verify_dataset(data).problems[0].startswith(f"{first}: token offset 0 is {start[1]}, not BOS (1)")


def test_byte_mismatch_names_document_file_and_offset(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    shard = data / "fineweb_val_000001.bin"
    tokens = read_shard(shard)
    doc_start = int(np.flatnonzero(tokens == 1)[0])
    bad = tokens.copy()
    bad[doc_start + 2] = 3  # UNK: the tables count 0 bytes, decoding shows " ⁇ "
    write_shard(shard, bad)
    report = verify_dataset(data)
    assert report.mismatches == 1
    assert report.problems[0].startswith(f"{shard}: document ")
    assert f"at token offset {doc_start}: the metric's tables count" in report.problems[0]


def test_document_continuing_into_the_next_shard_is_checked_whole(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    names = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]
    shards = [read_shard(data / n) for n in names]
    k = next(i for i in range(1, len(shards)) if shards[i][0] != 1)  # this shard opens mid-document
    stream = np.concatenate(shards)
    begin = int(np.flatnonzero(stream[:sum(s.size for s in shards[:k])] == 1)[-1])  # where that document starts
    owner = int(np.searchsorted(np.cumsum([s.size for s in shards]), begin, side="right"))
    bad = shards[k].copy()
    bad[0] = 3  # UNK in the continuation, before the shard's first BOS
    write_shard(data / names[k], bad)
    report = verify_dataset(data)
    assert report.mismatches == 1
    offset = begin - sum(s.size for s in shards[:owner])
    assert report.problems[0].startswith(f"{data / names[owner]}: document ")
    assert f"token offset {offset}:" in report.problems[0]


def test_split_ending_inside_a_character_is_exact_not_a_mismatch(tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tok.model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    doc = [1] + sp.encode("ab é")  # ... ▁ <0xC3> <0xA9>
    (tmp_path / "d").mkdir()
    shutil.copy(tokenizer, tmp_path / "d/tokenizer.model")
    write_shard(tmp_path / "d/fineweb_val_000000.bin", doc + doc[:-1])  # the second copy stops after 0xC3
    report = verify_dataset(tmp_path / "d")
    assert report.ok and report.mismatches == 0 and "ends inside a multi-byte character" in report.notes[0]
    assert report.totals("val").bytes == 2 * len("ab é".encode()) - 1
    write_shard(tmp_path / "d/fineweb_val_000000.bin", doc[:-1] + doc)  # the same cut inside the split is an error
    assert verify_dataset(tmp_path / "d").mismatches == 1


def test_tokenizer_must_match_the_manifest(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    other = train_sentencepiece(word_docs(200, seed=8), 300, tmp_path / "other.model")  # same size, other pieces
    with pytest.raises(DataCheckError, match=r"has sha256 .* but .*manifest.json records .*another tokenizer"):
        verify_dataset(data, tokenizer=str(other))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").unlink()  # without a manifest, the round trip still catches the wrong tokenizer
    report = verify_dataset(data, tokenizer=str(other))
    wrong = spm.SentencePieceProcessor(model_file=str(other))
    texts = prepared[1][:NUM_VAL - 1] + prepared[1][NUM_VAL:-1]  # each split's last document only gets a note
    ids = [spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model")).encode(t) for t in texts]
    differ = sum(wrong.encode(wrong.decode(i)) != i for i in ids)
    assert report.mismatches == 0 and report.roundtrip_mismatches == differ == 10  # 10 of the 16 documents checked
    assert "re-encoding its decoded text gives other ids" in report.problems[0]
    # documents 0 and 1 (byte-fallback and single-letter text) re-encode alike; document 2 starts at val
    # token 28 + 25 = 53, i.e. offset 13 of the second 40-token shard
    assert report.problems[0].startswith(f"{data / 'fineweb_val_000001.bin'}: document 2 of the val split, at token "
                                         "offset 13: re-encoding")
    assert verify_dataset(data).roundtrip_mismatches == 0
    manifest["tokenizer"]["sha256"], manifest["tokenizer"]["vocab_size"] = None, 1024
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataCheckError, match="has vocab size 300, but .* records 1024"):
        verify_dataset(data)


def test_manifest_counts_must_match_the_shards(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    (data / "fineweb_val_000002.bin").unlink()
    (data / "fineweb_val_bytes_000002.bin").unlink()
    problems = verify_dataset(data).problems
    assert problems[0].startswith(f"{data / 'manifest.json'} (val): lists shards ['fineweb_val_000000.bin'")


def test_cli_verify_exit_codes(prepared, tmp_path, capsys):
    data = copy_of(prepared, tmp_path)
    assert main(["data", "verify", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK") and "byte accounting: 18 documents checked, 0 mismatches" in out
    shard = data / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert main(["data", "verify", str(data)]) == 1
    assert f"FAILED: {shard}: header says" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "missing")]) == 2
    assert "no such dataset directory" in capsys.readouterr().err
