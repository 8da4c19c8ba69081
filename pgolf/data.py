"""Challenge token shards and the training/validation token streams.

Shard format: 256 little-endian int32 header words (magic 20240520, version 1, token count),
then that many little-endian uint16 tokens. Training reads shards in sorted order and wraps;
each optimizer step takes one contiguous chunk and slices it per rank, exactly as the reference
loader does, so 1 and 8 processes consume the same tokens per step.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for annotations only: the loader imports torch when it makes a batch
    import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
SYNTH_META = "synth.json"  # beside the shards of a synthetic corpus (`pgolf data synth`), written last


class ShardError(ValueError):
    pass


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: magic/version {header[0]}/{header[1]}, expected {SHARD_MAGIC}/{SHARD_VERSION}; "
                         "not a challenge token shard")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ShardError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes; "
                         "the shard is truncated or corrupt, re-download or re-prepare it")
    return count


def check_token_range(path, tokens: np.ndarray, vocab_size: int | None, offset: int = 0) -> None:
    """Reject ids >= vocab_size in tokens (found at `offset` of the shard `path`)."""
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.flatnonzero(tokens >= vocab_size)[0])
        raise ShardError(f"{path}: token {int(tokens[bad])} at offset {offset + bad} is >= vocab size "
                         f"{vocab_size}; the shard was made with another tokenizer (set VOCAB_SIZE/TOKENIZER_PATH)")


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Return the shard's tokens as uint16; with vocab_size, reject out-of-range ids."""
    count = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    check_token_range(path, tokens, vocab_size)
    return tokens


def write_shard(path: str | Path, tokens) -> None:
    """Write tokens atomically (temp file + rename), so a crash never leaves a complete-looking shard."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def shard_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise ShardError(f"no files match {pattern}; check DATA_PATH (or run `pgolf data download`/`pgolf data synth`)")
    return files


class TokenStream:
    """Shards in sorted order, read sequentially, wrapping forever. With vocab_size, the ids are checked
    as they are taken (a few thousand per batch), not by scanning each whole shard when it is loaded:
    that scan ran on every rank inside the timed loop."""

    def __init__(self, pattern: str, vocab_size: int | None = None):
        self.files = shard_files(pattern)
        self.vocab_size = vocab_size
        self.file_idx = 0
        self.tokens = read_shard(self.files[0])
        self.pos = 0

    def _advance(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = read_shard(self.files[self.file_idx])
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        chunks, left = [], n
        while left > 0:
            if self.pos >= self.tokens.size:
                self._advance()
                continue
            k = min(left, self.tokens.size - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            check_token_range(self.files[self.file_idx], chunks[-1], self.vocab_size, self.pos)
            self.pos += k
            left -= k
        return np.concatenate(chunks)


class DistributedTokenLoader:
    """Per step: one chunk of (local+1)*world tokens; rank r takes its contiguous slice."""

    def __init__(self, pattern: str, rank: int, world_size: int, device: torch.device, vocab_size: int | None = None):
        self.pattern, self.rank, self.world_size, self.device = pattern, rank, world_size, device
        self.stream = TokenStream(pattern, vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # here, not at the top: the data tools (download, synth, prepare) start without it

        local = global_tokens // (self.world_size * grad_accum_steps)
        span = local + 1
        chunk = self.stream.take(span * self.world_size)
        mine = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        x = mine[:-1].reshape(-1, seq_len)
        y = mine[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_tokens(pattern: str, vocab_size: int | None = None, max_tokens: int = 0) -> np.ndarray:
    """Concatenate every matching shard in sorted order (the whole validation split by default)."""
    tokens = np.concatenate([read_shard(f, vocab_size) for f in shard_files(pattern)])
    return tokens[:max_tokens] if max_tokens > 0 else tokens


def load_byte_sidecar(data_path: str, num_tokens: int, max_tokens: int = 0) -> np.ndarray | None:
    """Per-token original byte counts (fineweb_val_bytes_*.bin), when the dataset ships them."""
    pattern = sidecar_pattern(data_path)
    if not glob.glob(pattern):
        return None
    counts = load_tokens(pattern, max_tokens=max_tokens)
    if counts.size != num_tokens:
        raise ShardError(f"{pattern}: byte sidecar has {counts.size} entries but the val split has {num_tokens} "
                         "tokens; regenerate the sidecar with the same tokenizer")
    return counts


def train_pattern(data_path: str) -> str:
    return os.path.join(data_path, "fineweb_train_*.bin")


def val_pattern(data_path: str) -> str:
    return os.path.join(data_path, "fineweb_val_[0-9]*.bin")


def sidecar_pattern(data_path: str) -> str:
    return os.path.join(data_path, "fineweb_val_bytes_*.bin")


def synthetic_entropy(data_path: str) -> float | None:
    """The entropy rate (bits per byte, the val_bpb floor) of a synthetic corpus; None for other data."""
    meta = Path(data_path) / SYNTH_META
    if not meta.is_file():
        return None
    try:
        return float(json.loads(meta.read_text())["entropy_bits_per_byte"])
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"{meta}: no entropy_bits_per_byte in it; remake the corpus with `pgolf data synth`") from None
