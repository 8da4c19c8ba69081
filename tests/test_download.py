"""`pgolf data download` against a fake hub directory: layout, caps, resume, atomicity, offline errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data import read_shard, write_shard
from pgolf.download import HfHub, HubUnavailable, LocalHub, RemoteMissing, download
from pgolf.verify import verify_dataset

from tests.conftest import REPO

DATASET = "datasets/fineweb10B_sp1024"
FILES_VAL, FILES_TRAIN = 2, 3


class CountingHub(LocalHub):
    def __init__(self, root):
        super().__init__(root)
        self.fetched: list[str] = []

    def fetch(self, remote_path, local_path):
        self.fetched.append(remote_path)
        super().fetch(remote_path, local_path)


@pytest.fixture(scope="module")
def hub_dir(tiny_data, tmp_path_factory):
    """The challenge's hub layout under datasets/, built from the synthetic corpus (2 val, 3 train shards)."""
    data, _ = tiny_data
    root = tmp_path_factory.mktemp("hub") / "datasets"
    (root / DATASET).mkdir(parents=True)
    stats = {}
    for split, count in (("val", FILES_VAL), ("train", FILES_TRAIN)):
        tokens = read_shard(data / f"fineweb_{split}_000000.bin")
        for i, part in enumerate(np.array_split(tokens, count)):  # a document may continue into the next shard
            write_shard(root / DATASET / f"fineweb_{split}_{i:06d}.bin", part)
        stats.update({f"docs_{split}": int((tokens == 1).sum()), f"tokens_{split}": int(tokens.size),
                      f"files_{split}": count})
    (root / "tokenizers").mkdir()
    (root / "tokenizers/fineweb_512_bpe.model").write_bytes((data / "tokenizer.model").read_bytes())
    (root / "tokenizers/fineweb_512_bpe.vocab").write_bytes((data / "tokenizer.vocab").read_bytes())
    manifest = {
        "tokenizers": [{"name": "sp_bpe_512", "vocab_size": 512, "model_path": "tokenizers/fineweb_512_bpe.model",
                        "vocab_path": "tokenizers/fineweb_512_bpe.vocab"}],
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_512", "path": DATASET,
                      "vocab_size": 512, "stats": stats}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root.parent


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fetches_every_val_shard_caps_train_and_resumes(hub_dir, tmp_path):
    hub, dest, logs = CountingHub(hub_dir), tmp_path / "data", []
    summary = download("sp1024", 10, dest, hub, log=logs.append)
    assert summary["val_shards"] == 2 and summary["train_shards"] == 3 and summary["fetched"] == 7
    assert "note: the manifest lists 3 train shards; fetching 3, not 10" in logs
    assert listing(dest) == listing(hub_dir / "datasets")  # the local layout is the remote one minus the root
    assert hub.fetched[0] == "datasets/manifest.json" and len(hub.fetched) == 8
    report = verify_dataset(Path(summary["data_path"]))  # finds the manifest two levels up and its tokenizer
    assert report.ok and report.manifest == dest / "manifest.json"
    assert report.totals("val").tokens == json.loads((dest / "manifest.json").read_text())["datasets"][0]["stats"][
        "tokens_val"]

    hub.fetched.clear()
    again = download("sp1024", 10, dest, hub, log=logs.append)
    assert (again["fetched"], again["skipped"], hub.fetched) == (0, 7, [])

    shard = dest / DATASET / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])  # what a crash mid-copy by another tool would leave
    with open(dest / "tokenizers/fineweb_512_bpe.vocab", "ab") as f:
        f.write(b"x")  # size differs from the remote file
    download("sp1024", 10, dest, hub, log=logs.append)
    assert sorted(hub.fetched) == [f"datasets/{DATASET}/fineweb_train_000001.bin",
                                   "datasets/tokenizers/fineweb_512_bpe.vocab"]
    assert listing(dest) == listing(hub_dir / "datasets")


def test_fewer_train_shards_and_val_always_complete(hub_dir, tmp_path):
    summary = download("sp1024", 1, tmp_path, LocalHub(hub_dir), log=lambda m: None)
    names = sorted(p.name for p in (tmp_path / DATASET).iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert summary["fetched"] == 5
    assert verify_dataset(tmp_path / DATASET).ok  # a train prefix is fine; the val split is complete


def test_verify_holds_a_download_to_its_manifest(hub_dir, tmp_path):
    summary = download("sp1024", 3, tmp_path, LocalHub(hub_dir), log=lambda m: None)
    data = Path(summary["data_path"])
    (data / "fineweb_val_000001.bin").unlink()  # a silently shorter val split changes the metric
    problems = verify_dataset(data).problems
    assert problems == [f"{tmp_path / 'manifest.json'} (val): lists 2 shards, found 1; the val split must be "
                        "complete (download every val shard)"]
    download("sp1024", 3, tmp_path, LocalHub(hub_dir), log=lambda m: None)
    (data / "fineweb_train_000003.bin").write_bytes((data / "fineweb_train_000002.bin").read_bytes())
    assert verify_dataset(data).problems[0].endswith("lists 3 shards, found 4; extra shards do not belong to this "
                                                     "dataset")


def test_interrupted_fetch_leaves_no_complete_looking_file(hub_dir, tmp_path):
    class DyingHub(LocalHub):
        def fetch(self, remote_path, local_path):
            if remote_path.endswith("fineweb_val_000001.bin"):
                local_path.write_bytes(b"\0" * 100)  # half a file, then the connection drops
                raise HubUnavailable("connection reset")
            super().fetch(remote_path, local_path)

    with pytest.raises(HubUnavailable):
        download("sp1024", 3, tmp_path, DyingHub(hub_dir), log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / DATASET).iterdir()) == ["fineweb_val_000000.bin"]


def test_corrupt_remote_shard_is_rejected(hub_dir, tmp_path):
    shutil.copytree(hub_dir, tmp_path / "hub")
    remote = tmp_path / "hub/datasets" / DATASET / "fineweb_val_000000.bin"
    remote.write_bytes(remote.read_bytes()[:-2])
    with pytest.raises(ValueError, match="fineweb_val_000000.bin.part: header says .* the shard is truncated"):
        download("sp1024", 0, tmp_path / "data", LocalHub(tmp_path / "hub"), log=lambda m: None)
    assert not (tmp_path / "data" / DATASET / "fineweb_val_000000.bin").exists()
    assert not list((tmp_path / "data").rglob("*.part"))


def test_unknown_variant_lists_what_exists(hub_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no dataset 'fineweb10B_sp4096' \(it lists: fineweb10B_sp1024\)"):
        download("sp4096", 1, tmp_path, LocalHub(hub_dir), log=lambda m: None)
    with pytest.raises(RemoteMissing, match="does not exist"):
        download("sp1024", 1, tmp_path / "x", LocalHub(tmp_path / "nowhere"), log=lambda m: None)


def test_hub_errors_become_clear_messages(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    hub = HfHub("willdepueoai/parameter-golf", tmp_path)
    cases = [(ConnectionError("name resolution failed"), HubUnavailable),
             (errors.LocalEntryNotFoundError("cannot find the requested files"), HubUnavailable),
             (errors.EntryNotFoundError("404 entry not found"), RemoteMissing)]
    try:  # the HTTP client of current huggingface_hub versions
        import httpx2

        cases.append((httpx2.ConnectError("connection refused"), HubUnavailable))
    except ImportError:
        pass
    for error, expected in cases:
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
        with pytest.raises(expected) as info:
            hub.fetch("datasets/manifest.json", tmp_path / "m.part")
        if expected is HubUnavailable:
            assert "use data you already have" in str(info.value) and "pgolf data prepare" in str(info.value)
            assert f"--dest {tmp_path}" in str(info.value)
        else:
            assert "datasets/manifest.json is not on the hub" in str(info.value)


def test_unreachable_hub_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    tried = []

    def no_dns(address, timeout=None):
        tried.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("the hub client must not be called (its retries take half a minute)")

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", never)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    dest = tmp_path / "data"
    assert main(["data", "download", "--train-shards", "1", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    host = constants.ENDPOINT.split("://")[1].split("/")[0].split(":")[0]
    assert len(err.splitlines()) == 1 and f"no connection to {host}:443: Name or service not known" in err
    assert len(tried) == 1 and not dest.exists()  # one probe; no folder, cache or lock file left


def test_the_probe_goes_through_a_proxy(monkeypatch):
    import socket
    import urllib.request

    from pgolf.download import unreachable

    class Connection:
        def close(self):
            pass

    tried = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: tried.append(address) or Connection())
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy.local:3128"})
    monkeypatch.setattr(urllib.request, "proxy_bypass", lambda host: False)
    assert unreachable("https://huggingface.co", offline=False) is None and tried == [("proxy.local", 3128)]
    assert unreachable("https://huggingface.co", offline=True) == "HF_HUB_OFFLINE is set" and len(tried) == 1


def test_offline_cli_exits_2_with_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # huggingface_hub makes no network call
    proc = subprocess.run([sys.executable, "-m", "pgolf.cli", "data", "download", "--train-shards", "1",
                           "--dest", str(tmp_path / "data")], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "cannot reach the Hugging Face hub for willdepueoai/parameter-golf" in proc.stderr
    assert f"--dest {tmp_path / 'data'}" in proc.stderr and "pgolf data prepare --docs" in proc.stderr
    assert "(HF_HUB_OFFLINE is set)" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "data").exists()  # nothing left behind: no folder, cache or lock file


def test_cli_download_from_a_mirror(hub_dir, tmp_path, capsys):
    assert main(["data", "download", "--train-shards", "2", "--mirror", str(hub_dir), "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fetched:6 skipped:0 val_shards:2 train_shards:2" in out
    assert f"DATA_PATH={tmp_path / DATASET} TOKENIZER_PATH={tmp_path / 'tokenizers/fineweb_512_bpe.model'}" in out
