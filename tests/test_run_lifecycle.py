"""A run's start and end: bad data, tokenizers and output folders fail before the run folder exists;
after that, an error or Ctrl-C is recorded as the last line of train.log and the last metrics record."""
from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pgolf.train
from pgolf import fileio
from pgolf.cli import main
from pgolf.config import FIELD_TYPES, resolve
from pgolf.train import run
from tests.conftest import PYTHON, REPO, tiny_env


def settings_env(data_dir, out_dir, **overrides) -> dict:
    """Only the hyperparameters of tiny_env (for resolve(env=...) and monkeypatch.setenv)."""
    return {k: v for k, v in tiny_env(data_dir, out_dir, **overrides).items()
            if k.lower() in FIELD_TYPES}


def broken_copy(tiny_data, tmp_path, what: str) -> tuple[Path, dict]:
    """A copy of the tiny corpus with one thing wrong; -> (data dir, extra settings)."""
    src, _ = tiny_data
    data = tmp_path / "data"
    shutil.copytree(src, data)
    train = data / "fineweb_train_000000.bin"
    if what == "empty":
        for shard in data.glob("*.bin"):
            shard.unlink()
    elif what == "truncated":  # a later shard, which the loader would reach only hours in
        (data / "fineweb_train_000001.bin").write_bytes(train.read_bytes()[:5000])
    elif what == "wrong header":
        raw = bytearray(train.read_bytes())
        raw[:4] = np.int32(12345).tobytes()
        train.write_bytes(bytes(raw))
    elif what == "tokenizer":
        return data, {"VOCAB_SIZE": "256"}  # the tokenizer has 512 pieces
    elif what == "out_dir":
        (tmp_path / "a_file").write_text("")
        return data, {"OUT_DIR": str(tmp_path / "a_file" / "runs")}
    return data, {}


START_ERRORS = {
    "empty": "no files match .*fineweb_val_\\[0-9\\]\\*\\.bin; check DATA_PATH",
    "truncated": "fineweb_train_000001.bin: header says \\d+ tokens .* the shard is truncated or corrupt",
    "wrong header": "fineweb_train_000000.bin: magic/version 12345/1, expected 20240520/1",
    "tokenizer": "tokenizer has 512 pieces but VOCAB_SIZE=256",
    "out_dir": "OUT_DIR: .*a_file/runs/start cannot be created, .*a_file is a file; set OUT_DIR to a folder",
}


@pytest.mark.parametrize("what", list(START_ERRORS))
def test_a_failed_start_leaves_no_run_folder(what, tiny_data, tmp_path):
    data, extra = broken_copy(tiny_data, tmp_path, what)
    out = tmp_path / "runs"
    cfg = resolve(env=settings_env(data, out, RUN_ID="start", **extra))
    with pytest.raises((ValueError, OSError), match=START_ERRORS[what]):
        run(cfg)
    assert not out.exists() and not (tmp_path / "a_file" / "runs").exists()


def test_an_unwritable_out_dir_is_one_line_and_no_folder(tiny_data, tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):  # what the OS answers in a folder the user may not write to
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "TemporaryFile", denied)
    for key, value in settings_env(tiny_data[0], tmp_path / "ro" / "runs", RUN_ID="x").items():
        monkeypatch.setenv(key, value)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == (f"pgolf train: error: OUT_DIR: cannot write {tmp_path}/ro/runs/x ({tmp_path}: Permission denied); "
                   "set OUT_DIR to a folder you can write to\n")
    assert not (tmp_path / "ro").exists()


def test_an_unwritable_folder_for_the_smoke_corpus_is_one_line(tmp_path, monkeypatch, capsys):
    def denied(out_dir, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "data")

    monkeypatch.setattr("pgolf.synth.write_synthetic_dataset", denied)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "smoke"]) == 2
    assert capsys.readouterr().err == (
        "pgolf train: error: cannot write the synthetic corpus to ./data/synth (data: Permission denied); run from a "
        "folder you can write to, or set DATA_PATH and TOKENIZER_PATH to a dataset\n")
    assert list(tmp_path.iterdir()) == []


def test_out_dir_under_a_file_exits_2_in_one_line(tiny_data, tmp_path):
    (tmp_path / "a_file").write_text("")
    env = tiny_env(tiny_data[0], tmp_path / "a_file" / "runs", RUN_ID="x")
    proc = subprocess.run([PYTHON, "-m", "pgolf.cli", "train"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"pgolf train: error: OUT_DIR: {tmp_path}/a_file/runs/x cannot be created, "
                           f"{tmp_path}/a_file is a file; set OUT_DIR to a folder\n")


def stop_at_call(monkeypatch, call: int, error: BaseException) -> None:
    """Make the training loop's train_step raise `error` on its `call`-th call (after call-1 steps)."""
    real, calls = pgolf.train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(pgolf.train, "train_step", step)


def last_records(run_dir: Path) -> tuple[str, dict]:
    log = (run_dir / "train.log").read_text().splitlines()
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    return log[-1], json.loads(metrics[-1])


def test_ctrl_c_after_the_start_is_recorded(tiny_data, tmp_path, monkeypatch, capsys):
    stop_at_call(monkeypatch, 4, KeyboardInterrupt())
    for key, value in settings_env(tiny_data[0], tmp_path, RUN_ID="int", TRAIN_LOG_EVERY="2").items():
        monkeypatch.setenv(key, value)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == (f"pgolf train: interrupted at step 3; {tmp_path}/int keeps the log and "
                                       "metrics so far\n")
    line, record = last_records(tmp_path / "int")
    assert line == "interrupted at step 3" and record == {"event": "interrupted", "step": 3}


def test_an_error_after_the_start_is_recorded(tiny_data, tmp_path, monkeypatch, capsys):
    stop_at_call(monkeypatch, 3, ValueError("loader went away"))
    for key, value in settings_env(tiny_data[0], tmp_path, RUN_ID="err").items():
        monkeypatch.setenv(key, value)
    assert main(["train"]) == 2
    assert capsys.readouterr().err == "pgolf train: error: loader went away\n"
    line, record = last_records(tmp_path / "err")
    assert line == "failed at step 2: ValueError: loader went away"
    assert record == {"event": "failed", "step": 2, "error": "ValueError: loader went away"}
    assert "Traceback (most recent call last)" in (tmp_path / "err" / "train.log").read_text()

    stop_at_call(monkeypatch, 1, RuntimeError("a bug"))  # a bug keeps its traceback, and is recorded too
    with pytest.raises(RuntimeError, match="a bug"):
        run(resolve(env=settings_env(tiny_data[0], tmp_path, RUN_ID="bug")))
    assert last_records(tmp_path / "bug") == ("failed at step 0: RuntimeError: a bug",
                                              {"event": "failed", "step": 0, "error": "RuntimeError: a bug"})


@pytest.mark.slow
def test_sigint_to_a_running_train_exits_130_and_records_it(tiny_data, tmp_path):
    """A real Ctrl-C: SIGINT to the process once it has logged a step."""
    env = tiny_env(tiny_data[0], tmp_path, RUN_ID="sig", ITERATIONS="100000")
    proc = subprocess.Popen([PYTHON, "-m", "pgolf.cli", "train"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step:2/"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert len(err.splitlines()) == 1, err
    line, record = last_records(tmp_path / "sig")
    step = record["step"]
    assert record == {"event": "interrupted", "step": step} and 2 <= step < 100000
    assert line == f"interrupted at step {step}"
    assert err == f"pgolf train: interrupted at step {step}; {tmp_path}/sig keeps the log and metrics so far\n"
