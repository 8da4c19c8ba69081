import math

import numpy as np
import torch

from pgolf.data import read_shard
from pgolf.eval import byte_tables, evaluate, load_sentencepiece

PIECES = ["<pad>", "<s>", "</s>", "<unk>", "<0x41>", "\u2581the", "cat", "\u2581\u00e9", "<unused>"]


class FakeSP:
    """A 9-piece vocabulary with each kind of piece the byte rules distinguish."""

    def vocab_size(self):
        return len(PIECES)

    def is_control(self, i):
        return i in (0, 1, 2)

    def is_unknown(self, i):
        return i == 3

    def is_unused(self, i):
        return i == 8

    def is_byte(self, i):
        return i == 4

    def id_to_piece(self, i):
        return PIECES[i]


def test_byte_tables_rules():
    t = byte_tables(FakeSP(), vocab_size=12)
    assert t.base_bytes.tolist() == [0, 0, 0, 0, 1, 3, 3, 2, 0, 0, 0, 0]
    assert t.has_leading_space.tolist()[:9] == [False] * 5 + [True, False, True, False]
    assert t.is_boundary.tolist() == [True] * 4 + [False] * 4 + [True] * 4


class UniformModel(torch.nn.Module):
    """Zero logits: every target costs ln(V) nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def hidden(self, x):
        return torch.zeros(*x.shape, 1)

    def logits(self, h):
        return torch.zeros(*h.shape[:-1], self.vocab)


def test_hand_computed_bpb():
    # BOS the cat é A BOS the  ->  targets: the(3, after boundary) cat(3) ▁é(2+1) A(1) BOS(0) the(3, after BOS)
    tokens = np.array([1, 5, 6, 7, 4, 1, 5])
    tables = byte_tables(FakeSP(), 9)
    assert tables.count(torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])).tolist() == [3, 3, 3, 1, 0, 3]
    r = evaluate(UniformModel(9), tokens, tables, seq_len=6, stride=6, batch_seqs=4)
    assert (r.targets, r.bytes) == (6, 13)
    assert math.isclose(r.val_loss, math.log(9), rel_tol=1e-7)  # fp32 cross-entropy
    assert math.isclose(r.val_bpb, 6 * math.log(9) / (math.log(2) * 13), rel_tol=1e-7)


def test_byte_sidecar_replaces_the_tables():
    tokens = np.array([1, 5, 6, 7, 4, 1, 5])
    sidecar = np.array([0, 4, 3, 2, 1, 0, 5])  # e.g. original bytes before a case-folding transform
    r = evaluate(UniformModel(9), tokens, byte_tables(FakeSP(), 9), seq_len=3, stride=2, batch_seqs=2,
                 byte_counts=sidecar)
    assert r.bytes == sidecar[1:].sum() == 15 and r.targets == 6


def test_table_bytes_equal_utf8_length_of_decoded_documents(tiny_data):
    data_dir, meta = tiny_data
    sp = load_sentencepiece(data_dir / "tokenizer.model")
    tables = byte_tables(sp, 512)
    tokens = read_shard(data_dir / "fineweb_val_000000.bin")
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    total = 0
    for a, b in zip(starts[:-1], starts[1:]):
        doc = torch.from_numpy(tokens[a:b].astype(np.int64))
        counted = int(tables.count(doc[:-1], doc[1:]).sum())
        assert counted == len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        total += counted
    assert total == meta["val_bytes"]  # the UTF-8 bytes of the generated documents
