"""The per-group coder and artifact v2: bit-exact round trips, damaged groups named, codecs never
silently replaced, v1 artifacts still readable."""
from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from pgolf import coder
from pgolf.artifact import MAGIC_V2, export_artifact, load_artifact, serialize
from pgolf.coder import CodecMissing, CoderSettings, pack, unpack
from pgolf.fileio import write_atomic
from pgolf.gptq import GPTQSettings
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings
from pgolf.quant import fake_quantize, int6_weight_names
from tests.test_quant import CONTROL, KEEP, TINY, noisy_model

DATA = Path(__file__).parent / "data"
# Written by pgolf's v1 writer (artifact.serialize) before the v2 format existed: a 1-layer, 16-wide
# model (vocab 16) of N(0, 0.1) matrices; sha256 over its dequantized tensors in name order.
V1_FIXTURES = {"v1_int6_zstd.ptz": ("int6_zstd", "f182d1007bbab6ec3a30340fb1f23c5cdeb90c5154fa2e679e6cd9fed3cefdc9"),
               "v1_int8_zlib.ptz": ("int8_zlib", "5825f880cd5c742d09568c77c825c9e2ccf54629cf13380645d26ae014c28fa8")}
FRONTIER_LIKE = dict(quant=QuantSettings(matrix_bits=5, embed_bits=7, attn_clip_sigmas=4.0, mlp_clip_sigmas=4.0,
                                         embed_clip_sigmas=5.0),
                     lqer=LQERSettings(lqer_enabled=True, lqer_top_k=2, lqer_asym_enabled=True))


@pytest.fixture(autouse=True)
def _no_lrzip(monkeypatch, request):
    """lrzip (ZPAQ) takes seconds per call; only the test that names it uses it."""
    if "lrzip" not in request.node.name:
        monkeypatch.setattr(coder, "lrzip_available", lambda: False)


def same_tree(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def export_tree(**settings) -> dict:
    """The object a v2 artifact stores, via a pergroup export read back with unpack."""
    blob, _ = export_artifact(noisy_model(), "int6_zstd", CONTROL, KEEP, coder=CoderSettings(compressor="pergroup"),
                              **settings)
    return unpack(blob[blob.index(b"\0") + 1:])


@pytest.mark.parametrize("row_sort", [True, False])
def test_pergroup_round_trip_is_bit_exact(row_sort):
    tree = export_tree(**FRONTIER_LIKE)
    tree["tensors"]["extra.bf16"] = {"kind": "raw", "dtype": "bfloat16", "data": torch.randn(3, 5).bfloat16()}
    tree["tensors"]["extra.flags"] = {"kind": "raw", "dtype": "bool", "data": torch.tensor([True, False, True])}
    blob, stats = pack(tree, row_sort=row_sort)
    back = unpack(blob)
    assert same_tree(tree, back)
    assert pack(tree, row_sort=row_sort)[0] == blob  # deterministic
    groups = {g for g in stats if g not in ("header", "lrzip")}
    assert groups == {"attn_qo", "attn_kv", "mlp_up", "mlp_down", "embed", "small"} | ({"perm"} if row_sort else set())
    for g in groups:
        assert stats[g]["bytes"] == min(stats[g]["tried"].values())
        assert set(stats[g]["tried"]) >= {"zstd-22", "brotli-11", "lzma-9"}


def test_similarity_order_puts_near_rows_together():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-20, 20, (4, 64), generator=g)
    rows = torch.cat([base[i % 4] + torch.randint(-1, 2, (64,), generator=g) for i in range(12)]).reshape(12, 64)
    order = coder.similarity_order(rows.to(torch.int8).numpy())
    assert sorted(order.tolist()) == list(range(12))
    families = [int(i) % 4 for i in order]
    assert sum(a != b for a, b in zip(families, families[1:])) == 3  # each family's rows are one run


def container_groups(blob: bytes) -> tuple[dict, int]:
    body = blob[blob.index(b"\0") + 1:]
    _, head_len = struct.unpack_from("<BI", body, 4)
    header = json.loads(zlib.decompress(body[9:9 + head_len]))
    return header, len(blob) - len(body) + 9 + head_len


def test_a_damaged_or_truncated_group_is_named(tmp_path):
    blob, _ = export_artifact(noisy_model(), "int6_zstd", CONTROL, KEEP, coder=CoderSettings(compressor="pergroup"))
    header, offset = container_groups(blob)
    spans = {}
    for g in header["groups"]:
        spans[g["name"]] = (offset, offset + g["bytes"])
        offset += g["bytes"]
    assert offset == len(blob)
    path = tmp_path / "m.ptz"
    start, end = spans["mlp_up"]
    damaged = bytearray(blob)
    damaged[(start + end) // 2] ^= 0x40
    write_atomic(path, bytes(damaged))
    with pytest.raises(ValueError, match=r"group 'mlp_up' is corrupt: its CRC32 does not match.*corrupt or truncated"):
        load_artifact(path)
    last = header["groups"][-1]["name"]
    write_atomic(path, blob[:-10])
    with pytest.raises(ValueError, match=f"group '{last}' is truncated: {header['groups'][-1]['bytes'] - 10} of"):
        load_artifact(path)
    write_atomic(path, blob[:spans["attn_kv"][0] + 3])
    with pytest.raises(ValueError, match="group 'attn_kv' is truncated: 3 of"):
        load_artifact(path)
    write_atomic(path, blob[:container_groups(blob)[1] - 5])
    with pytest.raises(ValueError, match="per-group header is corrupt or truncated"):
        load_artifact(path)


def test_a_missing_codec_is_an_error_never_a_fallback(monkeypatch, tmp_path):
    model = noisy_model()
    blob, _ = export_artifact(model, "int6_zstd", CONTROL, KEEP, coder=CoderSettings(compressor="pergroup"))
    header, _ = container_groups(blob)
    brotli_groups = [g["name"] for g in header["groups"] if g["codec"] == "brotli-11"]
    assert brotli_groups, header["groups"]
    write_atomic(tmp_path / "m.ptz", blob)
    monkeypatch.setitem(sys.modules, "brotli", None)  # `import brotli` now raises ImportError
    with pytest.raises(CodecMissing, match=f"group '{brotli_groups[0]}': the brotli-11 codec needs the `brotli` package"):
        load_artifact(tmp_path / "m.ptz")
    with pytest.raises(CodecMissing, match="needs the `brotli` package"):
        export_artifact(model, "int6_zstd", CONTROL, KEEP, coder=CoderSettings(compressor="pergroup"))
    with pytest.raises(CodecMissing, match="needs the `brotli` package"):
        export_artifact(model, "int6_zstd", CONTROL, KEEP, coder=CoderSettings(compressor="brotli"))
    monkeypatch.delitem(sys.modules, "brotli")
    # lrzip: a candidate only when its binary is on PATH, and the stats say which.
    monkeypatch.setattr(coder, "lrzip_available", lambda: False)
    assert coder.group_codecs() == ("zstd-22", "brotli-11", "lzma-9")
    assert pack({"t": torch.zeros(3)})[1]["lrzip"] == "absent (no lrzip binary on PATH)"
    # A file whose group was written with lrzip cannot be read without it.
    header["groups"][0]["codec"] = "lrzip"
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = blob[blob.index(b"\0") + 1:]
    _, old_len = struct.unpack_from("<BI", body, 4)
    rewritten = MAGIC_V2 + b"pergroup\0" + body[:4] + struct.pack("<BI", 1, len(head)) + head + body[9 + old_len:]
    write_atomic(tmp_path / "lrz.ptz", rewritten)
    with pytest.raises(CodecMissing, match=f"group '{header['groups'][0]['name']}': the lrzip codec needs the `lrzip` binary"):
        load_artifact(tmp_path / "lrz.ptz")


@pytest.mark.parametrize("name", sorted(V1_FIXTURES))
def test_v1_artifacts_still_load(name):
    fmt, digest = V1_FIXTURES[name]
    state, cfg, got_fmt = load_artifact(DATA / name)
    assert got_fmt == fmt and cfg["model_dim"] == 16 and cfg["vocab_size"] == 16 and len(state) == 12
    assert hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest() == digest
    assert (DATA / name).read_bytes().startswith(b"PGOLF1" + (b"zstd-22\0" if fmt == "int6_zstd" else b"zlib-9\0"))


@pytest.mark.parametrize("compressor", ["auto", "zstd", "brotli", "lzma", "pergroup"])
def test_default_settings_store_what_v1_stores(compressor, tmp_path):
    """With the default quantization settings a v2 export holds v1's tensors exactly (the int6
    matrices equal to QAT's fake-quant), whatever the compressor."""
    model = noisy_model()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_atomic(tmp_path / "v1.ptz", serialize(state, TINY.to_dict(), "int6_zstd", CONTROL, KEEP)[0])
    blob, stats = export_artifact(model, "int6_zstd", CONTROL, KEEP, coder=CoderSettings(compressor=compressor))
    assert blob.startswith(MAGIC_V2 + {"auto": b"zstd-22", "zstd": b"zstd-22", "brotli": b"brotli-11",
                                       "lzma": b"lzma-9", "pergroup": b"pergroup"}[compressor] + b"\0")
    write_atomic(tmp_path / "v2.ptz", blob)
    v1, _, _ = load_artifact(tmp_path / "v1.ptz")
    v2, cfg, fmt = load_artifact(tmp_path / "v2.ptz")
    assert fmt == "int6_zstd" and cfg == TINY.to_dict() and stats["bytes"] == len(blob)
    assert same_tree(v1, v2)
    for name in int6_weight_names(state, CONTROL, KEEP):
        assert torch.equal(v2[name], fake_quantize(state[name]))


def test_gptq_export_reads_back_and_loads_into_a_model(tmp_path):
    model = noisy_model()
    batches = iter([torch.randint(0, 64, (2, 16)) for _ in range(4)])
    logs = []
    blob, stats = export_artifact(model, "int6_zstd", CONTROL, KEEP, gptq=GPTQSettings(matrix_quant="gptq",
                                  gptq_calibration_batches=3), coder=CoderSettings(compressor="pergroup"),
                                  calibration_batches=batches, log=logs.append, **FRONTIER_LIKE)
    assert len(list(batches)) == 1  # exactly GPTQ_CALIBRATION_BATCHES were drawn
    assert any(line.startswith("gptq:collected 13 Hessians from 3 training batches") for line in logs)
    assert {r["method"] for r in stats["tensors"].values()} == {"gptq"}
    assert sum("lqer" in r for r in stats["tensors"].values()) == 2
    write_atomic(tmp_path / "g.ptz", blob)
    state, cfg, _ = load_artifact(tmp_path / "g.ptz")
    fresh = type(model)(type(model.cfg)(**cfg))
    fresh.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="needs calibration_batches"):
        export_artifact(model, "int6_zstd", CONTROL, KEEP, gptq=GPTQSettings(matrix_quant="gptq"))


@pytest.mark.skipif(not coder.lrzip_available(), reason="no lrzip binary on PATH")
def test_lrzip_group_round_trip():
    tree = {"tensors": {"blocks.0.mlp.fc.weight": {"q": torch.randint(-31, 32, (64, 32), dtype=torch.int8)}}}
    blob, stats = pack(tree, codecs=("lrzip",))
    assert stats["mlp_up"]["codec"] == "lrzip" and stats["lrzip"] == "used as a candidate"
    assert same_tree(unpack(blob), tree)
