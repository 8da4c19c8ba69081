"""SentencePiece with the challenge's settings: training a BPE tokenizer and encoding documents.

Settings (data/download_hf_docs_and_tokenize.py in the challenge repo): BPE, byte fallback, split
digits, nmt_nfkc normalisation, no dummy prefix, pad 0 / bos 1 / eos 2 / unk 3, character
coverage 0.999. Each document is encoded as [BOS] + tokens, with no EOS.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np

from pgolf.fileio import write_atomic

BOS_TOKEN = 1


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str | Path, threads: int = 2,
                        reserved: tuple[str, ...] = ()) -> Path:
    """Train a BPE model from document texts; writes model_path and its .vocab atomically.

    The model is trained into memory, so its bytes (and sha256) depend only on the texts and settings.
    `reserved` strings become user-defined pieces (a transform's markers): always in the vocabulary,
    never merged with their neighbours. A model that comes out smaller than vocab_size (the text has
    too few distinct merges) is an error, not a silently smaller vocabulary.
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"{model_path}: a SentencePiece model path must end in .model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t.replace("\x00", " ").strip() for t in texts), model_writer=blob,
        model_type="bpe", vocab_size=vocab_size, character_coverage=0.999, byte_fallback=True,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, num_threads=threads,
        minloglevel=2, **({"user_defined_symbols": list(reserved)} if reserved else {}),
    )
    sp = spm.SentencePieceProcessor(model_proto=blob.getvalue())
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"{model_path}: the training text supports only {sp.vocab_size()} pieces, not the "
                         f"{vocab_size} asked for; lower --vocab-size or train on more documents")
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    for path, data in ((model_path.with_suffix(".vocab"), vocab.encode()), (model_path, blob.getvalue())):
        write_atomic(path, data)
    return model_path


def encode_document(sp, text: str) -> np.ndarray:
    """[BOS] + ids as uint16 (no EOS)."""
    ids = sp.encode(text)
    return np.asarray([BOS_TOKEN, *ids], dtype=np.uint16)
