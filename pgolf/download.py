"""`pgolf data download`: fetch the challenge's published shards and tokenizer from the Hugging Face hub.

Remote layout, under the remote root (default `datasets`) of the dataset repo: `manifest.json`,
`datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin` and the tokenizer files named by the
manifest's tokenizer entry. The local layout under --dest is the same without the remote root, so
DATA_PATH is `<dest>/datasets/fineweb10B_<variant>` and the manifest sits two levels above it.

Every val shard is fetched; train shards are capped at the manifest's count. A file already present
and complete (a shard whose header matches its size; any other file whose size matches the remote
one) is skipped, so an interrupted download resumes. Each file lands under its final name only
once complete (staged, then renamed).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Protocol

from pgolf.data import ShardError, read_shard_header

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
# Published variants whose shards live outside the challenge repo, and those whose val split ships a
# per-token byte sidecar (fineweb_val_bytes_NNNNNN.bin: a transformed tokenizer's original bytes), which
# is fetched with every val shard. Any other variant is looked up in DEFAULT_REPO_ID's manifest.
VARIANT_REPOS = {
    "sp8192": "kevclark/parameter-golf",
    "sp8192_lossless_caps_caseops_v1_reserved": "romeerp/parameter-golf-caseops-v1",
}
SIDECAR_VARIANTS = frozenset({"sp8192_lossless_caps_caseops_v1_reserved"})
DEFAULT_REMOTE_ROOT = "datasets"
MANIFEST_NAME = "manifest.json"
TOKENIZER_KEYS = ("model_path", "vocab_path", "path")
PROBE_SECONDS = 3.0  # one quick connection attempt: offline fails at once, not after a minute of retries


class HubUnavailable(ValueError):
    """The hub cannot be reached (offline, DNS, timeout)."""


class RemoteMissing(ValueError):
    """The hub answered, but the repo or file does not exist."""


class Hub(Protocol):
    def check(self) -> None:
        """Raise HubUnavailable at once when the source cannot be reached (before anything is written)."""

    def size(self, remote_path: str) -> int: ...

    def fetch(self, remote_path: str, local_path: Path) -> None:
        """Write the remote file to local_path (a temporary name; the caller renames it)."""


def offline_message(source: str, dest: Path, reason: str) -> str:
    return (f"cannot reach {source} ({reason}). Offline, use data you already have: put the files under "
            f"--dest {dest} in the challenge layout (complete files are kept, not fetched again) or point "
            "DATA_PATH/TOKENIZER_PATH at them; or build a dataset from raw documents with "
            "`pgolf data prepare --docs DOCS.jsonl --out DIR`")


def unreachable(endpoint: str, offline: bool, timeout: float = PROBE_SECONDS) -> str | None:
    """Why `endpoint` cannot be reached (offline mode, no DNS, no TCP connection to it or to the proxy
    in its way within `timeout`), or None when it answers."""
    if offline:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # then the proxy is what must answer
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname, p.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"no connection to {host}:{port}: {e.strerror or e or type(e).__name__}"
    return None


def _transport_errors() -> tuple[type, ...]:
    """Connection/timeout errors of whichever HTTP client this huggingface_hub version uses."""
    found: list[type] = [ConnectionError, TimeoutError]  # includes OfflineModeIsEnabled
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            found += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            pass
    return tuple(found)


class HfHub:
    """The Hugging Face hub through huggingface_hub; downloads are staged under <dest>/.download."""

    def __init__(self, repo_id: str, dest: Path):
        self.repo_id, self.dest = repo_id, Path(dest)
        self.staging = self.dest / ".download"

    def check(self) -> None:
        from huggingface_hub import constants

        reason = unreachable(constants.ENDPOINT, constants.HF_HUB_OFFLINE)
        if reason:
            raise HubUnavailable(offline_message(f"the Hugging Face hub for {self.repo_id}", self.dest, reason))

    @contextmanager
    def _errors(self, remote_path: str):
        from huggingface_hub import errors

        try:
            yield
        except (errors.LocalEntryNotFoundError, *_transport_errors()) as e:  # before EntryNotFoundError, its base
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            source = f"the Hugging Face hub for {self.repo_id}"
            raise HubUnavailable(offline_message(source, self.dest, reason)) from None
        except (errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise RemoteMissing(f"{self.repo_id}: {remote_path} is not on the hub ({type(e).__name__}); "
                                "check --repo-id, --remote-root and --variant") from None

    def size(self, remote_path: str) -> int:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        with self._errors(remote_path):
            meta = get_hf_file_metadata(hf_hub_url(self.repo_id, remote_path, repo_type="dataset"))
        if meta.size is None:
            raise RemoteMissing(f"{self.repo_id}: the hub reports no size for {remote_path}")
        return int(meta.size)

    def fetch(self, remote_path: str, local_path: Path) -> None:
        from huggingface_hub import hf_hub_download

        folder, _, name = remote_path.rpartition("/")
        with self._errors(remote_path):
            staged = hf_hub_download(self.repo_id, name, subfolder=folder or None, repo_type="dataset",
                                     local_dir=self.staging)
        os.replace(staged, local_path)


class LocalHub:
    """A directory laid out like the hub repo (a mirror, or a fake hub in tests)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check(self) -> None:
        pass  # a missing file is reported by the call that needs it

    def _source(self, remote_path: str) -> Path:
        source = self.root / remote_path
        if not source.is_file():
            raise RemoteMissing(f"{source} does not exist; check --mirror, --remote-root and --variant")
        return source

    def size(self, remote_path: str) -> int:
        return self._source(remote_path).stat().st_size

    def fetch(self, remote_path: str, local_path: Path) -> None:
        shutil.copyfile(self._source(remote_path), local_path)


def dataset_entry(manifest: dict, name: str, where: str) -> dict:
    """The manifest's entry for dataset `name` (e.g. fineweb10B_sp1024)."""
    datasets = manifest.get("datasets") or []
    for entry in datasets:
        if entry.get("name") == name:
            return entry
    names = ", ".join(str(d.get("name")) for d in datasets) or "none"
    raise ValueError(f"{where}: no dataset {name!r} (it lists: {names}); check --variant, or delete a stale "
                     f"{MANIFEST_NAME} to fetch it again")


def tokenizer_entry(manifest: dict, dataset: dict, where: str) -> dict:
    name = dataset.get("tokenizer_name")
    for entry in manifest.get("tokenizers") or []:
        if entry.get("name") == name:
            return entry
    raise ValueError(f"{where}: dataset {dataset.get('name')!r} names tokenizer {name!r}, which has no "
                     "entry under 'tokenizers'; the manifest is incomplete")


def dataset_counts(dataset: dict, where: str) -> tuple[int, int]:
    """(files_val, files_train) from the dataset's stats."""
    stats = dataset.get("stats") or {}
    try:
        return int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: dataset {dataset.get('name')!r} has no stats.files_val/files_train "
                         "counts; the manifest is incomplete") from None


def _load_manifest(hub: Hub, remote_root: str, dest: Path, log: Callable[[str], None]) -> dict:
    local = dest / MANIFEST_NAME
    if not local.exists():
        fetch_file(hub, f"{remote_root}/{MANIFEST_NAME}", local)
        log(f"fetched {MANIFEST_NAME}")
    else:
        log(f"using {local} (delete it to fetch the manifest again)")
    try:
        return json.loads(local.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{local}: not a JSON manifest ({e}); delete it and run the download again") from None


def repo_for(variant: str, repo_id: str | None) -> str:
    """--repo-id when given, else where the variant is published."""
    return repo_id or VARIANT_REPOS.get(variant, DEFAULT_REPO_ID)


def download_plan(manifest: dict, variant: str, train_shards: int, where: str) -> tuple[list[str], dict]:
    """Relative paths to fetch (val shards and their byte sidecars, train shards, tokenizer files) and a summary."""
    name = f"fineweb10B_{variant}"
    dataset = dataset_entry(manifest, name, where)
    files_val, files_train = dataset_counts(dataset, where)
    folder = dataset.get("path") or f"datasets/{name}"
    n_train = min(train_shards, files_train)
    shards = [f"{folder}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    if variant in SIDECAR_VARIANTS:  # without it a transformed tokenizer's bytes would be counted wrong
        shards += [f"{folder}/fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
    shards += [f"{folder}/fineweb_train_{i:06d}.bin" for i in range(n_train)]
    tok = tokenizer_entry(manifest, dataset, where)
    tokenizer_files = [tok[k] for k in TOKENIZER_KEYS if isinstance(tok.get(k), str)]
    summary = {"dataset": folder, "val_shards": files_val, "train_shards": n_train,
               "train_shards_requested": train_shards, "train_shards_available": files_train,
               "tokenizer": tok.get("model_path") or tok.get("path")}
    return shards + tokenizer_files, summary


def _is_complete(local: Path, rel: str, hub: Hub, remote_root: str) -> bool:
    if not local.is_file():
        return False
    if rel.endswith(".bin"):  # a shard's header fixes its size, so no remote query is needed
        try:
            read_shard_header(local)
            return True
        except ShardError:
            return False
    return local.stat().st_size == hub.size(f"{remote_root}/{rel}")


def fetch_file(hub: Hub, remote_path: str, local: Path) -> None:
    """Fetch to a .part file, check it (shard header, JSON), then rename: a final name is always complete."""
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + ".part")
    try:
        hub.fetch(remote_path, part)
        if local.suffix == ".bin":
            read_shard_header(part)
        elif local.suffix == ".json":
            try:
                json.loads(part.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{remote_path}: the fetched file is not valid JSON ({e})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, local)


def download(variant: str, train_shards: int, dest: str | Path, hub: Hub, *,
             remote_root: str = DEFAULT_REMOTE_ROOT, log: Callable[[str], None] = print) -> dict:
    """Fetch manifest, every val shard, min(train_shards, available) train shards and the tokenizer."""
    if train_shards < 0:
        raise ValueError(f"--train-shards {train_shards}: must be >= 0")
    hub.check()  # before --dest is created: an unreachable hub leaves nothing behind
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    remote_root = remote_root.strip("/")
    manifest = _load_manifest(hub, remote_root, dest, log)
    files, summary = download_plan(manifest, variant, train_shards, str(dest / MANIFEST_NAME))
    if summary["train_shards"] < train_shards:
        log(f"note: the manifest lists {summary['train_shards_available']} train shards; "
            f"fetching {summary['train_shards']}, not {train_shards}")
    fetched = skipped = 0
    for rel in files:
        local = dest / rel
        if _is_complete(local, rel, hub, remote_root):
            skipped += 1
            log(f"have  {rel} ({local.stat().st_size:,} bytes)")
            continue
        fetch_file(hub, f"{remote_root}/{rel}", local)
        fetched += 1
        log(f"fetched {rel} ({local.stat().st_size:,} bytes)")
    # the hub client's staging area; after a failure it keeps partial files so the next run resumes them
    shutil.rmtree(dest / ".download", ignore_errors=True)
    summary.update(fetched=fetched, skipped=skipped, data_path=str(dest / summary["dataset"]),
                   tokenizer_path=str(dest / summary["tokenizer"]) if summary["tokenizer"] else None)
    return summary
