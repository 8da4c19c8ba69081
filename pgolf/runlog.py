"""A run's folder and log: the checks before the folder exists, the folder with its configuration and
environment, train.log (the challenge's log lines) and metrics.jsonl, and how a run that stops early
says so (a "failed" or "interrupted" record, last)."""
from __future__ import annotations

import json
import lzma
import platform
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.artifact import PACKED_SINGLE_FILE
from pgolf.config import Hyperparameters, to_dict
from pgolf.console import echo, error_message
from pgolf.data import (DistributedTokenLoader, read_shard_header, shard_files, synthetic_entropy, train_pattern,
                        val_pattern)
from pgolf.dist import Dist
from pgolf.eval import CONTEXT_EXTENSIONS, ByteTables, beyond_context, load_sentencepiece, load_validation
from pgolf.model import GPTConfig
from pgolf.fileio import check_writable


class RunLog:
    """Rank-0 text log (challenge line formats) plus a JSON-lines metrics file. Nothing is written until
    open() (after the run's checks pass), and nothing on other ranks. Console lines go through echo(),
    so a progress bar stays intact."""

    def __init__(self):
        self.run_dir: Path | None = None
        self.text = self.jsonl = None

    def open(self, run_dir: Path | None) -> None:
        if run_dir is not None:
            self.run_dir = run_dir
            self.text, self.jsonl = open(run_dir / "train.log", "a"), open(run_dir / "metrics.jsonl", "a")

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.text:
            if console:
                echo(msg)
            self.text.write(msg + "\n")
            self.text.flush()

    def metric(self, event: str, **fields) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"event": event, **fields}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f:
                f.close()
        self.text = self.jsonl = None

    def interrupted(self, step: int) -> str:
        """Record Ctrl-C as the last log line and metrics record; -> the one line for the terminal."""
        if self.run_dir is None:
            return "interrupted before the run started (nothing was written)"
        self.metric("interrupted", step=step)
        self(f"interrupted at step {step}", console=False)
        return f"interrupted at step {step}; {self.run_dir} keeps the log and metrics so far"

    def failed(self, step: int, e: Exception) -> None:
        """Record an error as the last log line (after its traceback) and a "failed" metrics record."""
        error = f"{type(e).__name__}: {error_message(e)}"
        self.metric("failed", step=step, error=error)
        self("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip(), console=False)
        self(f"failed at step {step}: {error}", console=False)


def environment_lines() -> list[str]:
    lines = [f"python:{platform.python_version()} torch:{torch.__version__} platform:{platform.platform()}"]
    if torch.cuda.is_available():
        lines.append(f"cuda:{torch.version.cuda} device:{torch.cuda.get_device_name()}")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    return lines


@dataclass
class RunData:
    """What a run reads, checked and loaded before its folder exists."""
    val_tokens: np.ndarray
    tables: ByteTables
    sidecar: np.ndarray | None
    loader: DistributedTokenLoader
    entropy_floor: float | None  # bits per byte of a synthetic corpus (its synth.json); None for real data
    lines: list[str]  # for the run's log, once it is open
    bos_id: int  # the tokenizer's BOS id (documents start with it)


def checked_bos(cfg: Hyperparameters, val_tokens: np.ndarray, train_first: int | None) -> int:
    """The tokenizer's BOS id, after checking that the shards start documents with it and that an explicit
    BOS_ID agrees (BOS_ID left at its default follows the tokenizer)."""
    bos = load_sentencepiece(cfg.tokenizer_path).bos_id()  # -1 (none) fails the shard check below
    for split, first in (("val", int(val_tokens[0]) if len(val_tokens) else None), ("train", train_first)):
        if first is not None and first != bos:
            raise ValueError(f"{cfg.data_path}: the {split} shards start with token {first}, not the BOS id {bos} of "
                             f"{cfg.tokenizer_path}; they were made with another tokenizer (check TOKENIZER_PATH)")
    if cfg.bos_id not in (bos, GPTConfig.bos_id):
        raise ValueError(f"BOS_ID={cfg.bos_id} but {cfg.tokenizer_path} has BOS id {bos}; unset BOS_ID to use the tokenizer's")
    return bos


def load_checked_data(cfg: Hyperparameters, d: Dist) -> RunData:
    """Check the output folder, every shard header and the tokenizer, and load the data, before the run
    folder exists: a bad OUT_DIR, DATA_PATH, shard or TOKENIZER_PATH fails with nothing left behind."""
    if d.is_main:
        check_writable(Path(cfg.out_dir) / cfg.run_id, "OUT_DIR")
    for shard in shard_files(val_pattern(cfg.data_path)) + shard_files(train_pattern(cfg.data_path)):
        read_shard_header(shard)  # a truncated shard fails now, not when the loader reaches it hours in
    lines: list[str] = []
    val_tokens, tables, sidecar = load_validation(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size,
                                                  cfg.val_max_tokens, lines.append)
    loader = DistributedTokenLoader(train_pattern(cfg.data_path), d.rank, d.world_size, d.device, cfg.vocab_size)
    bos = checked_bos(cfg, val_tokens, int(loader.stream.tokens[0]) if loader.stream.tokens.size else None)
    lines.append(f"train_loader:dataset:{Path(cfg.data_path).name} train_shards:{len(loader.stream.files)} bos_id:{bos}")
    floor = synthetic_entropy(cfg.data_path)
    if floor is not None:
        lines.append(f"data:synthetic path:{cfg.data_path} entropy_bits_per_byte:{floor:.4f} (the val_bpb floor)")
    extended = any(getattr(cfg, name, False) for name in CONTEXT_EXTENSIONS)
    warning = beyond_context(cfg.train_seq_len, (cfg.eval_seq_len or cfg.train_seq_len) if cfg.eval_stride else 0,
                             extended)
    return RunData(val_tokens, tables, sidecar, loader, floor, lines + ([warning] if warning else []), bos)


def running_source() -> str:
    """The code that runs: the file itself, or what a compressed stub (pgolf.pack) decompressed and ran."""
    main = sys.modules["__main__"]
    packed = getattr(main, "_packed", None)
    if isinstance(packed, str):
        return lzma.decompress(packed.encode("latin-1")).decode("utf-8")
    return Path(main.__file__).read_text(encoding="utf-8")


def open_run(cfg: Hyperparameters, d: Dist, log: RunLog, data: RunData) -> Path:
    """Create the run folder and open its log: configuration, environment, then the data lines."""
    run_dir = Path(cfg.out_dir) / cfg.run_id
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    log.open(run_dir if d.is_main else None)
    log(f"run_dir:{run_dir}")
    log("config:" + json.dumps(to_dict(cfg)), console=False)
    for line in environment_lines():
        log(line, console=False)
    if PACKED_SINGLE_FILE:  # like the reference script, keep the exact code that ran with its log
        log(running_source(), console=False)
    log.metric("config", **to_dict(cfg))
    for line in data.lines:
        log(line)
    if data.entropy_floor is not None:
        log.metric("data", synthetic=True, entropy_bits_per_byte=data.entropy_floor)
    return run_dir
