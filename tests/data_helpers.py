"""Tiny corpora and tokenizers that the data-tool tests make themselves (no ../shared, no network)."""
from __future__ import annotations

import json
from pathlib import Path

from pgolf.spm import train_sentencepiece
from pgolf.synth import ZipfWordSource

# The tokenizer's training corpus: 200 documents over a 60-word seeded lexicon (first words:
# plqor, nponz, aggsg, ...). Lowercase ASCII only, so digits, punctuation and accented letters
# are absent from the learned pieces and encode as byte-fallback ids (4 + byte value).
TOKENIZER_SEED, TOKENIZER_WORDS, TOKENIZER_DOCS, TOKENIZER_VOCAB = 7, 60, 200, 300


def word_docs(n: int, seed: int = TOKENIZER_SEED, words: tuple[int, int] = (40, 200)) -> list[str]:
    source = ZipfWordSource(seed, num_words=TOKENIZER_WORDS, doc_words=words)
    return [source.document() for _ in range(n)]


def train_tokenizer(path: Path) -> Path:
    return train_sentencepiece(word_docs(TOKENIZER_DOCS), TOKENIZER_VOCAB, path)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path
