"""Crash-safe file writes shared by every module that writes results: write to a temporary name in
the same folder, then rename, so a reader never sees a half-written file."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
