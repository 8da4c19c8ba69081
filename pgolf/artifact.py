"""The artifact: quantized weights + model config, compressed, written atomically; and its size.

Submission size = compressed model bytes + code bytes, against the decimal limit 16,000,000.
Code bytes are the bytes of the single file that ships: the running file itself when this code
runs packed as train_gpt.py, otherwise the packed form the package would emit.

File formats (both are read; `load_artifact` tells them apart by the magic):
- v1 (`serialize`): b"PGOLF1" + codec + NUL + codec(torch.save({format, version 1, model_config,
  tensors})), codec zlib-9 (int8_zlib) or zstd-22 (int6_zstd), tensors as quant.quantize_state.
- v2 (`export_artifact`): b"PGOLF2" + codec + NUL + body. The tensors are stored by the mixed plan
  (pgolf.mixed: bits per group, RTN or GPTQ, SD-clip, LQER); the object also records the
  quantization settings. codec zlib-9 / zstd-22 / brotli-11 / lzma-9: body = codec(torch.save(obj));
  codec "pergroup": body = the per-group container of pgolf.coder.
"""
from __future__ import annotations

import io
import itertools
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch

from pgolf.coder import (SINGLE_STREAM, CodecMissing, CoderSettings, compress, decompress, pack, require,
                         unpack)
from pgolf.gptq import GPTQSettings, collect_hessians
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings, dequantize_mixed, quantize_mixed
from pgolf.quant import dequantize_state, int6_weight_names, quantize_state

SIZE_LIMIT = 16_000_000
ARTIFACT_VERSION = 1
ARTIFACT_VERSION_V2 = 2
CODECS = {"int8_zlib": "zlib-9", "int6_zstd": "zstd-22"}
ARTIFACT_NAMES = {"int8_zlib": "final_model.int8.ptz", "int6_zstd": "final_model.int6.ptz"}
ROUNDTRIP_LOG_NAMES = {"int8_zlib": "final_int8_zlib_roundtrip", "int6_zstd": "final_int6_roundtrip"}
SIZE_LABELS = {"int8_zlib": "int8+zlib", "int6_zstd": "int6+zstd"}
MAGIC = b"PGOLF1"
MAGIC_V2 = b"PGOLF2"
PERGROUP = "pergroup"
V2_CODECS = (*CODECS.values(), *SINGLE_STREAM.values(), PERGROUP)


def serialize(state: dict[str, torch.Tensor], model_config: dict, fmt: str, control: list[str],
              fp16_keep: list[str]) -> tuple[bytes, int]:
    """-> (v1 file bytes, uncompressed payload bytes). File = MAGIC + codec name + NUL + compressed blob."""
    obj = {"format": fmt, "version": ARTIFACT_VERSION, "model_config": model_config,
           "tensors": quantize_state(state, fmt, control, fp16_keep)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    codec = CODECS[fmt]
    return MAGIC + codec.encode() + b"\0" + compress(payload, codec), len(payload)


def file_codec(fmt: str, coder: CoderSettings) -> str:
    """The codec a v2 file records: the format's own for COMPRESSOR=auto, else the chosen one."""
    if coder.compressor == "auto":
        return CODECS[fmt]
    return PERGROUP if coder.compressor == PERGROUP else SINGLE_STREAM[coder.compressor]


def encode_v2(obj: dict, codec: str, row_sort: bool = True) -> tuple[bytes, dict]:
    """A v2 object -> (file bytes, coder stats)."""
    if codec == PERGROUP:
        body, stats = pack(obj, row_sort=row_sort)
    else:
        require(codec)
        buf = io.BytesIO()
        torch.save(obj, buf)
        body, stats = compress(buf.getvalue(), codec), {"payload_bytes": buf.tell()}
    return MAGIC_V2 + codec.encode() + b"\0" + body, stats


def export_artifact(model: torch.nn.Module, fmt: str, control: list[str], fp16_keep: list[str],
                    quant: QuantSettings = QuantSettings(), gptq: GPTQSettings = GPTQSettings(),
                    lqer: LQERSettings = LQERSettings(), coder: CoderSettings = CoderSettings(),
                    calibration_batches: Iterable | None = None, hessians: dict | None = None,
                    all_reduce: Callable | None = None, log: Callable[[str], None] = lambda msg: None
                    ) -> tuple[bytes, dict]:
    """The model -> (v2 artifact bytes, stats). The one export entry point.

    MATRIX_QUANT=gptq needs Hessians: pass them (gptq.collect_hessians, e.g. timed inside the
    training wallclock), or calibration_batches (an iterator of TRAINING batches, x or (x, y);
    GPTQ_CALIBRATION_BATCHES of them are used) and they are collected here. stats: seconds per
    phase, per-tensor report, per-group coder sizes, bytes.
    """
    quant.validate(fmt)
    gptq.validate()
    lqer.validate()
    coder.validate()
    codec = file_codec(fmt, coder)
    if codec != PERGROUP:
        require(codec)  # fail before the work, not after
    stats: dict = {"codec": codec}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if gptq.matrix_quant == "gptq" and hessians is None:
        if calibration_batches is None:
            raise ValueError("MATRIX_QUANT=gptq needs calibration_batches (training data) or precomputed hessians")
        t0 = time.perf_counter()
        wanted = int6_weight_names(state, control, fp16_keep) | {"tok_emb.weight"}
        hessians = collect_hessians(model, itertools.islice(calibration_batches, gptq.gptq_calibration_batches),
                                    wanted, all_reduce)
        stats["hessian_seconds"] = time.perf_counter() - t0
        log(f"gptq:collected {len(hessians)} Hessians from {gptq.gptq_calibration_batches} training batches "
            f"in {stats['hessian_seconds']:.1f}s")
    t0 = time.perf_counter()
    packed, report = quantize_mixed(state, fmt, control, fp16_keep, quant, gptq, lqer, hessians)
    stats.update(quant_seconds=time.perf_counter() - t0, tensors=report)
    log(f"quant:{gptq.matrix_quant} matrix_bits:{quant.matrix_bits} embed_bits:{quant.embed_bits} "
        f"lqer:{sum('lqer' in r for r in report.values())} tensors:{len(report)} "
        f"seconds:{stats['quant_seconds']:.1f}")
    obj = {"format": fmt, "version": ARTIFACT_VERSION_V2, "model_config": model.cfg.to_dict(),
           "settings": {**asdict(quant), **asdict(gptq), **asdict(lqer), **asdict(coder)}, "tensors": packed}
    t0 = time.perf_counter()
    blob, stats["coder"] = encode_v2(obj, codec, coder.pergroup_row_sort)
    stats.update(compress_seconds=time.perf_counter() - t0, bytes=len(blob))
    log(f"compress:{codec} bytes:{len(blob)} seconds:{stats['compress_seconds']:.1f}")
    return blob, stats


def _decode_v1(path, raw: bytes) -> dict:
    codec, sep, blob = raw[len(MAGIC):].partition(b"\0")
    if not sep or codec.decode(errors="replace") not in CODECS.values():
        raise ValueError(f"{path}: unknown codec {codec[:20]!r}")
    require(codec.decode())  # a missing package is an install problem, not a damaged file
    try:
        return torch.load(io.BytesIO(decompress(blob, codec.decode())), map_location="cpu", weights_only=True)
    except Exception as e:  # zlib/zstd/unpickling errors of a damaged file
        raise ValueError(f"{path}: cannot read the artifact ({type(e).__name__}: {e}); the file is corrupt or "
                         "truncated, copy or export it again") from None


def _decode_v2(path, raw: bytes) -> dict:
    codec, sep, body = raw[len(MAGIC_V2):].partition(b"\0")
    codec = codec.decode(errors="replace")
    if not sep or codec not in V2_CODECS:
        raise ValueError(f"{path}: unknown codec {codec[:20]!r}")
    if codec == PERGROUP:
        try:
            return unpack(body)
        except CodecMissing as e:
            raise CodecMissing(f"{path}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}; the file is corrupt or truncated, copy or export it again") from None
    require(codec)
    try:
        return torch.load(io.BytesIO(decompress(body, codec)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the artifact ({type(e).__name__}: {e}); the file is corrupt or "
                         "truncated, copy or export it again") from None


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """-> (dequantized state dict, model config, format) of a v1 or v2 file. Clear errors for foreign,
    damaged or newer files and for missing codecs."""
    raw = Path(path).read_bytes()
    if raw.startswith(MAGIC):
        obj, version = _decode_v1(path, raw), ARTIFACT_VERSION
    elif raw.startswith(MAGIC_V2):
        obj, version = _decode_v2(path, raw), ARTIFACT_VERSION_V2
    else:
        raise ValueError(f"{path}: not a pgolf artifact (bad magic); was it written by another script?")
    if obj.get("version") != version or obj.get("format") not in CODECS:
        raise ValueError(f"{path}: artifact format {obj.get('format')!r} v{obj.get('version')} is not supported "
                         f"(this pgolf reads v{ARTIFACT_VERSION} and v{ARTIFACT_VERSION_V2} of {', '.join(CODECS)})")
    state = dequantize_state(obj["tensors"]) if version == ARTIFACT_VERSION else dequantize_mixed(obj["tensors"])
    return state, obj["model_config"], obj["format"]


# Set by the packer in the single-file train_gpt.py: there the running file is what ships.
PACKED_SINGLE_FILE = False


def code_bytes(defaults: dict) -> tuple[int, str]:
    """(bytes, what was measured) of the code that counts against the limit: the running file when
    packed, else the train_gpt.py that `pgolf pack` would write with these defaults."""
    if PACKED_SINGLE_FILE:
        main_file = Path(sys.modules["__main__"].__file__)
        return len(main_file.read_bytes()), main_file.name
    from pgolf.pack import compressed_stub, packed_source

    source = packed_source(defaults)
    stub = len(compressed_stub(source))
    return len(source.encode("utf-8")), f"readable packed train_gpt.py; its lzma stub would be {stub} bytes"


def budget_line(model_bytes: int, code: int) -> tuple[int, str]:
    """Total and a status word for the log: OK, or OVER BUDGET with the overshoot."""
    total = model_bytes + code
    if total <= SIZE_LIMIT:
        return total, f"OK headroom:{SIZE_LIMIT - total}"
    return total, f"OVER BUDGET by {total - SIZE_LIMIT} bytes (limit {SIZE_LIMIT})"
