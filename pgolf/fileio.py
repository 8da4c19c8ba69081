"""Crash-safe file writes shared by every module that writes results: write to a temporary name in
the same folder, then rename, so a reader never sees a half-written file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_writable(folder: str | Path, setting: str) -> None:
    """Raise an OSError naming `folder`, the setting that chose it and the fix, unless files can be created
    in it, or in the nearest existing folder above it (where it would be created). Creates nothing."""
    folder = Path(folder)
    base = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not base.is_dir():
        raise NotADirectoryError(f"{setting}: {folder} cannot be created, {base} is a file; set {setting} to a folder")
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise PermissionError(f"{setting}: cannot write {folder} ({base}: {e.strerror}); set {setting} to a folder "
                              "you can write to") from None
