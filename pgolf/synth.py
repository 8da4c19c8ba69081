"""An offline corpus with a known entropy rate, in the challenge layout (`pgolf data synth`).

Documents are sequences of words drawn i.i.d. from a fixed Zipf distribution over a seeded random
lexicon of lowercase words, separated by single spaces. A word carries H(W) bits and costs
len(w) + 1 bytes (its space), so the text's entropy rate is H(W) / (E[len] + 1) bits per byte,
up to the document-boundary correction computed below. A model's val_bpb can approach this floor
but not beat it, which makes the corpus a check that training actually learns.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pgolf.fileio import write_atomic
from pgolf.data import SYNTH_META, write_shard
from pgolf.spm import encode_document, train_sentencepiece

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


class ZipfWordSource:
    def __init__(self, seed: int, num_words: int = 1500, zipf_s: float = 1.1, doc_words: tuple[int, int] = (40, 200)):
        rng = np.random.default_rng(seed)
        words: set[str] = set()
        while len(words) < num_words:
            n = int(rng.integers(2, 9))
            words.add("".join(rng.choice(LETTERS, n)))
        self.words = sorted(words)
        rng.shuffle(self.words)
        p = 1.0 / np.arange(1, num_words + 1) ** zipf_s
        self.probs = p / p.sum()
        self.doc_words = doc_words
        self.rng = rng
        lengths = np.array([len(w) for w in self.words])
        self.word_bits = float(-(self.probs * np.log2(self.probs)).sum())
        self.mean_len = float((self.probs * lengths).sum())

    def entropy_bits_per_byte(self) -> float:
        """Word entropy per byte of text: a document of n words has n*H(W) bits in n*(E[len]+1) - 1 bytes."""
        n = (self.doc_words[0] + self.doc_words[1]) / 2
        return n * self.word_bits / (n * (self.mean_len + 1) - 1)

    def document(self) -> str:
        n = int(self.rng.integers(self.doc_words[0], self.doc_words[1] + 1))
        return " ".join(self.words[i] for i in self.rng.choice(len(self.words), n, p=self.probs))


def write_synthetic_dataset(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1024, train_docs: int = 12000,
                            val_docs: int = 400, tokenizer_docs: int = 2000) -> dict:
    """Write fineweb_{train,val}_000000.bin, tokenizer.model and synth.json; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = ZipfWordSource(seed)
    val = [source.document() for _ in range(val_docs)]
    train = [source.document() for _ in range(train_docs)]
    import sentencepiece as spm

    model_path = train_sentencepiece(train[:tokenizer_docs], vocab_size, out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    summary = {"seed": seed, "vocab_size": vocab_size, "entropy_bits_per_byte": source.entropy_bits_per_byte(),
               "word_entropy_bits": source.word_bits, "mean_word_bytes": source.mean_len,
               "tokenizer": str(model_path)}
    for split, docs in (("val", val), ("train", train)):
        tokens = np.concatenate([encode_document(sp, t) for t in docs])
        write_shard(out / f"fineweb_{split}_000000.bin", tokens)
        summary[f"{split}_docs"], summary[f"{split}_tokens"] = len(docs), int(tokens.size)
        summary[f"{split}_bytes"] = sum(len(t.encode()) for t in docs)
    write_atomic(out / SYNTH_META, json.dumps(summary, indent=1).encode())  # written last: marks completeness
    return summary


def ensure_synthetic_dataset(out_dir: str | Path, **kw) -> dict:
    """Reuse a complete corpus at out_dir (synth.json is written last), else make it."""
    meta = Path(out_dir) / SYNTH_META
    if meta.exists():
        found = json.loads(meta.read_text())
        if all(found.get(k) == v for k, v in kw.items() if k in ("seed", "vocab_size")):
            return found
    return write_synthetic_dataset(out_dir, **kw)
