"""Lossless coding of the quantized model: the codecs, and the per-group container.

Codecs (name = what a file records): zlib-9, zstd-22, brotli-11, lzma-9, and lrzip (ZPAQ, level 9)
when its binary is on PATH. A codec whose package or binary is missing is an error, never a
fallback: a fallback would silently change the artifact's size.

The per-group container (COMPRESSOR=pergroup) splits the artifact's tree of tensors by role:
attention q/o, attention k/v, MLP up, MLP down, embedding (the int8 level matrices of each), and
`small` (scales, fp16/fp32 tensors, LQER factors, gates, anything else), plus `perm` (row orders).
Tensors of one role are alike, so they compress better together. In a level matrix the rows of
the hot groups (embedding, q/o, MLP up) are first put in a greedy L1 nearest-neighbour order (the
permutation is stored), then the matrix is written column by column, so that a run of bytes
follows one input feature over similar rows. Wider dtypes are byte-transposed (all first bytes,
then all second bytes...). Each group gets the smallest of the candidate codecs, recorded in the
header with its sizes and a CRC32; a damaged group is reported by name.

Layout: b"PGRP" | u8 version | u32 header length | zlib(header JSON) | group blobs in header order.
"""
from __future__ import annotations

import json
import lzma
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SINGLE_STREAM = {"zstd": "zstd-22", "brotli": "brotli-11", "lzma": "lzma-9"}
GROUP_CODECS = ("zstd-22", "brotli-11", "lzma-9")
LRZIP = "lrzip"
PACK_MAGIC = b"PGRP"
PACK_VERSION = 1
ROLES = (("attn_qo", r"/blocks\.\d+\.attn\.(c_q|proj)\.weight/q$"), ("attn_kv", r"/blocks\.\d+\.attn\.(c_k|c_v)\.weight/q$"),
         ("mlp_up", r"/blocks\.\d+\.mlp\.fc\.weight/q$"), ("mlp_down", r"/blocks\.\d+\.mlp\.proj\.weight/q$"),
         ("embed", r"/tok_emb\.weight/q$"))
CODER_GROUPS = (*(r for r, _ in ROLES), "small", "perm")
SORTED_ROLES = ("embed", "attn_qo", "mlp_up")  # the record's hot groups


@dataclass
class CoderSettings:
    compressor: str = "auto"  # auto (the format's own: int8_zlib zlib-9, int6_zstd zstd-22) | zstd | brotli | lzma | pergroup
    pergroup_row_sort: bool = True  # pergroup: nearest-neighbour row order in the embedding, q/o and MLP-up groups

    def validate(self) -> None:
        if self.compressor not in ("auto", "pergroup", *SINGLE_STREAM):
            raise ValueError(f"COMPRESSOR={self.compressor!r}; allowed: auto, zstd, brotli, lzma, pergroup")


class CodecMissing(RuntimeError):
    pass


def _module(codec: str, module: str):
    try:
        return __import__(module)
    except ImportError:
        raise CodecMissing(f"the {codec} codec needs the `{module}` package (pip install {module}); refusing to "
                           "fall back to another codec, which would change the artifact size") from None


def lrzip_available() -> bool:
    return shutil.which(LRZIP) is not None


def _lrzip(data: bytes, compress: bool) -> bytes:
    if not lrzip_available():
        raise CodecMissing("the lrzip codec needs the `lrzip` binary on PATH (e.g. apt-get install lrzip); "
                           "refusing to fall back to another codec")
    with tempfile.TemporaryDirectory(prefix="pgolf_lrz_") as tmp:
        src = Path(tmp) / ("in.bin" if compress else "in.lrz")
        dst = Path(tmp) / "out"
        src.write_bytes(data)
        args = ["-z", "-L", "9"] if compress else ["-d"]
        # -N 0: lrzip runs at nice 19 by default, which starves it on a busy machine.
        subprocess.run([LRZIP, "-q", "-f", "-N", "0", *args, "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zlib-9":
        return zlib.compress(data, 9)
    if codec == "zstd-22":
        return _module(codec, "zstandard").ZstdCompressor(level=22).compress(data)
    if codec == "brotli-11":
        return _module(codec, "brotli").compress(data, quality=11)
    if codec == "lzma-9":
        return lzma.compress(data, preset=9)
    if codec == LRZIP:
        return _lrzip(data, compress=True)
    raise ValueError(f"unknown codec {codec!r}")


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "zlib-9":
        return zlib.decompress(data)
    if codec == "zstd-22":
        return _module(codec, "zstandard").ZstdDecompressor().decompress(data)
    if codec == "brotli-11":
        return _module(codec, "brotli").decompress(data)
    if codec == "lzma-9":
        return lzma.decompress(data)
    if codec == LRZIP:
        return _lrzip(data, compress=False)
    raise ValueError(f"unknown codec {codec!r}")


def require(codec: str) -> None:
    """Raise CodecMissing now if codec's package or binary is absent (before any work is done)."""
    if codec == LRZIP and not lrzip_available():
        _lrzip(b"", compress=True)
    module = {"zstd-22": "zstandard", "brotli-11": "brotli"}.get(codec)
    if module:
        _module(codec, module)


def group_codecs() -> tuple[str, ...]:
    return GROUP_CODECS + ((LRZIP,) if lrzip_available() else ())


def role_of(path: str, t: torch.Tensor) -> str:
    if t.dtype == torch.int8 and t.ndim == 2:
        for role, pattern in ROLES:
            if re.search(pattern, path):
                return role
    return "small"


def similarity_order(q: np.ndarray) -> np.ndarray:
    """Greedy L1 nearest-neighbour walk over the rows, from row 0: a row order with similar rows adjacent."""
    rows = q.astype(np.int16)
    n = rows.shape[0]
    remaining = np.arange(1, n)
    order = [0]
    cur = rows[0]
    for _ in range(n - 1):
        best = int(np.argmin(np.abs(rows[remaining] - cur).sum(axis=1)))
        order.append(int(remaining[best]))
        cur = rows[remaining[best]]
        remaining = np.delete(remaining, best)
    return np.asarray(order, dtype=np.int64)


def _byte_planes(a: np.ndarray) -> bytes:
    """Byte-transpose: all first bytes of the elements, then all second bytes, ..."""
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return raw.reshape(-1, a.dtype.itemsize).T.tobytes() if a.dtype.itemsize > 1 else raw.tobytes()


def _from_planes(raw: bytes, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, n)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().reshape(-1, t.element_size())


def _split(obj, path: str, leaves: list) -> object:
    """The tree with every tensor replaced by {"tensor": index}; the tensors appended to leaves."""
    if isinstance(obj, torch.Tensor):
        leaves.append((path, obj))
        return {"tensor": len(leaves) - 1}
    if isinstance(obj, dict):
        return {k: _split(v, f"{path}/{k}", leaves) for k, v in obj.items()}
    return obj


def _join(tree, tensors: list[torch.Tensor]):
    if isinstance(tree, dict):
        if set(tree) == {"tensor"}:
            return tensors[tree["tensor"]]
        return {k: _join(v, tensors) for k, v in tree.items()}
    return tree


def _encode(path: str, t: torch.Tensor, row_sort: bool) -> tuple[str, dict, bytes, np.ndarray | None]:
    """(group, tensor header, group bytes, row order or None) of one tensor."""
    role = role_of(path, t)
    meta = {"group": role, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if role == "small":
        return role, meta, _tensor_bytes(t).T.tobytes(), None
    q = t.numpy()
    order = similarity_order(q) if row_sort and role in SORTED_ROLES and q.shape[0] > 1 else None
    if order is not None:
        q = q[order]
        meta["row_order"] = True
    return role, meta, np.ascontiguousarray(q.T).tobytes(), order


def _decode(meta: dict, raw: bytes, order: np.ndarray | None) -> torch.Tensor:
    dtype = getattr(torch, meta["dtype"])
    shape = meta["shape"]
    if meta["group"] == "small":
        size = torch.empty((), dtype=dtype).element_size()
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(size, -1)
        flat = torch.from_numpy(planes.T.reshape(-1).copy())
        return flat.view(dtype).reshape(shape).clone()
    q = np.frombuffer(raw, dtype=np.int8).reshape(shape[1], shape[0]).T
    if order is not None:
        q = q[np.argsort(order)]
    return torch.from_numpy(np.ascontiguousarray(q))


def _best(raw: bytes, codecs: tuple[str, ...]) -> tuple[str, bytes, dict[str, int]]:
    sizes, best = {}, None
    for codec in codecs:
        out = compress(raw, codec)
        sizes[codec] = len(out)
        if best is None or len(out) < len(best[1]):
            best = (codec, out)
    return best[0], best[1], sizes


def pack(obj: dict, row_sort: bool = True, codecs: tuple[str, ...] | None = None) -> tuple[bytes, dict]:
    """-> (container bytes, stats {group: {codec, bytes, raw_bytes, tried: {codec: bytes}}, lrzip})."""
    codecs = codecs or group_codecs()
    for codec in codecs:
        require(codec)
    leaves: list = []
    tree = _split(obj, "", leaves)
    raws: dict[str, list[bytes]] = {g: [] for g in CODER_GROUPS}
    metas, perms = [], []
    for path, t in leaves:
        group, meta, raw, order = _encode(path, t, row_sort)
        metas.append(meta)
        raws[group].append(raw)
        if order is not None:
            perms.append(order.astype(np.uint16 if len(order) <= 65536 else np.uint32))
    raws["perm"] = [_byte_planes(p) for p in perms]
    header = {"version": PACK_VERSION, "tree": tree, "tensors": metas, "groups": []}
    blobs, stats = [], {}
    for group in CODER_GROUPS:
        raw = b"".join(raws[group])
        if not raw:
            continue
        codec, blob, tried = _best(raw, codecs)
        header["groups"].append({"name": group, "codec": codec, "bytes": len(blob), "raw_bytes": len(raw),
                                 "crc32": zlib.crc32(blob)})
        stats[group] = {"codec": codec, "bytes": len(blob), "raw_bytes": len(raw), "tried": tried}
        blobs.append(blob)
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    out = PACK_MAGIC + struct.pack("<BI", PACK_VERSION, len(head)) + head + b"".join(blobs)
    stats["header"] = {"bytes": len(head) + len(PACK_MAGIC) + 5}
    stats["lrzip"] = "used as a candidate" if LRZIP in codecs else "absent (no lrzip binary on PATH)"
    return out, stats


def _read_header(data: bytes) -> tuple[dict, int]:
    if not data.startswith(PACK_MAGIC) or len(data) < len(PACK_MAGIC) + 5:
        raise ValueError("not a per-group container (bad magic)")
    version, head_len = struct.unpack_from("<BI", data, len(PACK_MAGIC))
    if version != PACK_VERSION:
        raise ValueError(f"per-group container v{version} is not supported (this pgolf reads v{PACK_VERSION})")
    start = len(PACK_MAGIC) + 5
    try:
        header = json.loads(zlib.decompress(data[start:start + head_len]))
    except (zlib.error, ValueError) as e:
        raise ValueError(f"the per-group header is corrupt or truncated ({e})") from None
    return header, start + head_len


def _read_group(data: bytes, offset: int, g: dict) -> bytes:
    name, blob = g["name"], data[offset:offset + g["bytes"]]
    if len(blob) < g["bytes"]:
        raise ValueError(f"group {name!r} is truncated: {len(blob)} of {g['bytes']} bytes")
    if zlib.crc32(blob) != g["crc32"]:
        raise ValueError(f"group {name!r} is corrupt: its CRC32 does not match the header")
    try:
        raw = decompress(blob, g["codec"])
    except CodecMissing as e:
        raise CodecMissing(f"group {name!r}: {e}") from None
    except Exception as e:
        raise ValueError(f"group {name!r} does not decode with {g['codec']} ({type(e).__name__}: {e})") from None
    if len(raw) != g["raw_bytes"]:
        raise ValueError(f"group {name!r} decodes to {len(raw)} bytes, the header says {g['raw_bytes']}")
    return raw


def unpack(data: bytes) -> dict:
    """The tree pack() was given, bit for bit. Errors name the damaged group."""
    header, offset = _read_header(data)
    raw = {}
    for g in header["groups"]:
        raw[g["name"]] = _read_group(data, offset, g)
        offset += g["bytes"]
    if offset != len(data):
        raise ValueError(f"per-group container has {len(data) - offset} bytes after its last group")
    cursor = {g: 0 for g in CODER_GROUPS}
    perm_raw = raw.get("perm", b"")
    tensors = []
    for meta in header["tensors"]:
        group = meta["group"]
        shape = meta["shape"]
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
        chunk = raw[group][cursor[group]:cursor[group] + size]
        cursor[group] += size
        order = None
        if meta.get("row_order"):
            dtype = np.dtype(np.uint16 if shape[0] <= 65536 else np.uint32)
            n = shape[0] * dtype.itemsize
            order = _from_planes(perm_raw[cursor["perm"]:cursor["perm"] + n], dtype, [shape[0]]).astype(np.int64)
            cursor["perm"] += n
        tensors.append(_decode(meta, chunk, order))
    return _join(header["tree"], tensors)
