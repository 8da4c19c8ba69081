"""The artifact: quantized weights + model config, compressed, written atomically; and its size.

Submission size = compressed model bytes + code bytes, against the decimal limit 16,000,000.
Code bytes are the bytes of the single file that ships: the running file itself when this code
runs packed as train_gpt.py, otherwise the packed form the package would emit.
"""
from __future__ import annotations

import io
import sys
import zlib
from pathlib import Path

import torch

from pgolf.quant import dequantize_state, quantize_state

SIZE_LIMIT = 16_000_000
ARTIFACT_VERSION = 1
CODECS = {"int8_zlib": "zlib-9", "int6_zstd": "zstd-22"}
ARTIFACT_NAMES = {"int8_zlib": "final_model.int8.ptz", "int6_zstd": "final_model.int6.ptz"}
ROUNDTRIP_LOG_NAMES = {"int8_zlib": "final_int8_zlib_roundtrip", "int6_zstd": "final_int6_roundtrip"}
SIZE_LABELS = {"int8_zlib": "int8+zlib", "int6_zstd": "int6+zstd"}
MAGIC = b"PGOLF1"


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise RuntimeError("the int6_zstd format needs the `zstandard` package (pip install zstandard); "
                           "refusing to fall back to zlib, which would change the artifact size") from None
    return zstandard


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zlib-9":
        return zlib.compress(data, 9)
    if codec == "zstd-22":
        return _zstd().ZstdCompressor(level=22).compress(data)
    raise ValueError(f"unknown codec {codec!r}")


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "zlib-9":
        return zlib.decompress(data)
    if codec == "zstd-22":
        return _zstd().ZstdDecompressor().decompress(data)
    raise ValueError(f"unknown codec {codec!r}")


def serialize(state: dict[str, torch.Tensor], model_config: dict, fmt: str, control: list[str],
              fp16_keep: list[str]) -> tuple[bytes, int]:
    """-> (file bytes, uncompressed payload bytes). File = MAGIC + codec name + NUL + compressed blob."""
    obj = {"format": fmt, "version": ARTIFACT_VERSION, "model_config": model_config,
           "tensors": quantize_state(state, fmt, control, fp16_keep)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    codec = CODECS[fmt]
    return MAGIC + codec.encode() + b"\0" + compress(payload, codec), len(payload)


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """-> (dequantized state dict, model config, format). Clear errors for foreign or newer files."""
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path}: not a pgolf artifact (bad magic); was it written by another script?")
    codec, sep, blob = raw[len(MAGIC):].partition(b"\0")
    if not sep or codec.decode(errors="replace") not in CODECS.values():
        raise ValueError(f"{path}: unknown codec {codec[:20]!r}")
    if codec == b"zstd-22":
        _zstd()  # a missing package is an install problem, not a damaged file
    try:
        obj = torch.load(io.BytesIO(decompress(blob, codec.decode())), map_location="cpu", weights_only=True)
    except Exception as e:  # zlib/zstd/unpickling errors of a damaged file
        raise ValueError(f"{path}: cannot read the artifact ({type(e).__name__}: {e}); the file is corrupt or "
                         "truncated, copy or export it again") from None
    if obj.get("version") != ARTIFACT_VERSION or obj.get("format") not in CODECS:
        raise ValueError(f"{path}: artifact format {obj.get('format')!r} v{obj.get('version')} is not supported "
                         f"(this pgolf reads v{ARTIFACT_VERSION} of {', '.join(CODECS)})")
    return dequantize_state(obj["tensors"]), obj["model_config"], obj["format"]


# Set by the packer in the single-file train_gpt.py: there the running file is what ships.
PACKED_SINGLE_FILE = False


def code_bytes(defaults: dict) -> tuple[int, str]:
    """(bytes, what was measured) of the code that counts against the limit: the running file when
    packed, else the train_gpt.py that `pgolf pack` would write with these defaults."""
    if PACKED_SINGLE_FILE:
        main_file = Path(sys.modules["__main__"].__file__)
        return len(main_file.read_bytes()), main_file.name
    from pgolf.pack import packed_source

    return len(packed_source(defaults).encode("utf-8")), "packed train_gpt.py"


def budget_line(model_bytes: int, code: int) -> tuple[int, str]:
    """Total and a status word for the log: OK, or OVER BUDGET with the overshoot."""
    total = model_bytes + code
    if total <= SIZE_LIMIT:
        return total, f"OK headroom:{SIZE_LIMIT - total}"
    return total, f"OVER BUDGET by {total - SIZE_LIMIT} bytes (limit {SIZE_LIMIT})"
