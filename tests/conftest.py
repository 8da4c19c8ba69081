"""Shared fixtures: a tiny synthetic dataset + tokenizer made by the tests themselves (no ../shared)."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from pgolf.synth import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic corpus: fineweb_{train,val}_000000.bin, tokenizer.model, synth.json."""
    out = tmp_path_factory.mktemp("tiny_data")
    meta = write_synthetic_dataset(out, seed=1, vocab_size=512, train_docs=1500, val_docs=40, tokenizer_docs=600)
    return out, meta


def tiny_env(data_dir, run_dir, **overrides) -> dict:
    """Env for a tiny CPU training run on tiny_data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOLF_")}
    env.update(
        DATA_PATH=str(data_dir), TOKENIZER_PATH=str(data_dir / "tokenizer.model"), OUT_DIR=str(run_dir),
        VOCAB_SIZE="512", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="64",
        TRAIN_BATCH_TOKENS="2048", ITERATIONS="8", WARMDOWN_ITERS="3", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
        VAL_BATCH_SIZE="8192", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", PROGRESS="0",
        OMP_NUM_THREADS="1", COMPILE="0", AUTOCAST="off",  # explicit: the auto defaults pick bf16/compile by CPU
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_cmd(args: list[str], env: dict, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextmanager
def gloo_rank(rank: int, world_size: int, init_file: str):
    """One rank of a CPU process group, for a worker spawned by a test. A clean exit waits for every rank
    before tearing down: a rank that tears down while its peer still talks aborts the peer (gloo)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed_and_threads(monkeypatch):
    # Tiny models run fastest on one thread, and one thread per process keeps parallel runs from thrashing;
    # OMP_NUM_THREADS also keeps in-process runs from choosing their own count (pgolf.execution).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


PYTHON = sys.executable
