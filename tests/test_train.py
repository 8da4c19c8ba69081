"""End-to-end CPU runs on the tiny synthetic corpus: learning, artifact, round trip, log contract."""
import json
import math
import re
from pathlib import Path

import pytest

from pgolf.config import resolve
from pgolf.train import run
from tests.conftest import PYTHON, run_cmd, tiny_env


def tiny_cfg(data_dir, out_dir, **overrides):
    env = tiny_env(data_dir, out_dir, **overrides)
    return resolve("baseline", env={k: v for k, v in env.items() if k.isupper()})


def read_events(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


@pytest.fixture(scope="module")
def learned_run(tiny_data, tmp_path_factory):
    data_dir, meta = tiny_data
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg(data_dir, out, ITERATIONS=80, WARMDOWN_ITERS=20, VAL_LOSS_EVERY=40, TRAIN_LOG_EVERY=20,
                   RUN_ID="learn", MATRIX_LR=0.06)
    return run(cfg), Path(out) / "learn", meta


def test_loss_falls_toward_the_corpus_entropy(learned_run):
    final, run_dir, meta = learned_run
    vals = [e["val_bpb"] for e in read_events(run_dir, "val")]
    floor = meta["entropy_bits_per_byte"]
    assert [e["step"] for e in read_events(run_dir, "val")] == [0, 40, 80]
    assert vals[0] > vals[1] > vals[2]
    assert vals[0] > 3.0  # untrained: about log2(512) bits per token / 2.7 bytes per token
    assert vals[2] > floor - 0.05  # a model cannot beat the source's entropy rate (up to sampling noise)
    assert (vals[0] - vals[2]) / (vals[0] - floor) > 0.6  # most of the way to the floor in 80 tiny steps
    train = [e["train_loss"] for e in read_events(run_dir, "train")]
    assert train[-1] < 0.6 * train[0]


def test_artifact_round_trip_and_size_accounting(learned_run):
    final, run_dir, _ = learned_run
    artifact = run_dir / "final_model.int8.ptz"
    assert artifact.stat().st_size == final["bytes_model"]
    assert final["bytes_total"] == final["bytes_model"] + final["bytes_code"]
    assert abs(final["roundtrip_val_bpb"] - final["pre_quant_val_bpb"]) < 0.01  # int8 per-row round trip
    assert final["val_bpb"] == final["roundtrip_val_bpb"]  # the reported score is the round trip's
    assert not list(run_dir.glob("*.tmp"))


def test_log_lines_follow_the_challenge_format(learned_run):
    final, run_dir, _ = learned_run
    log = (run_dir / "train.log").read_text()
    assert re.search(r"^step:1/80 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$", log, re.M)
    assert re.search(r"^step:80/80 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
                     log, re.M)
    exact = re.search(r"^final_int8_zlib_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", log, re.M)
    assert exact and math.isclose(float(exact.group(2)), final["roundtrip_val_bpb"], abs_tol=1e-8)
    assert re.search(r"^final_int8_zlib_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms$", log, re.M)
    size = re.search(r"^Total submission size int8\+zlib: (\d+) bytes", log, re.M)
    assert size and int(size.group(1)) == final["bytes_total"]
    assert log.index("config:") < log.index("step:0/80")  # the log opens with the resolved configuration
    assert json.loads((run_dir / "config.json").read_text())["iterations"] == 80


def test_the_run_ends_with_its_summary_line(learned_run):
    final, run_dir, meta = learned_run
    floor = meta["entropy_bits_per_byte"]
    assert read_events(run_dir, "data") == [{"event": "data", "synthetic": True, "entropy_bits_per_byte": floor}]
    log = (run_dir / "train.log").read_text().splitlines()
    assert any(line.startswith("data:synthetic path:") and f"entropy_bits_per_byte:{floor:.4f}" in line for line in log)
    assert log[-1] == (f"summary: round-trip val_bpb {final['roundtrip_val_bpb']:.4f} | entropy floor {floor:.4f} "
                       f"(synthetic corpus; gap {final['val_bpb'] - floor:+.4f}) | {final['bytes_total']:,} of "
                       f"16,000,000 bytes (OK) | artifact {run_dir / 'final_model.int8.ptz'}")


def test_pgolf_eval_rescores_a_run_from_its_own_folder(learned_run, capsys):
    """`pgolf eval` reads the run's config.json beside the artifact (whose model fields were filled in at
    training, e.g. ROPE_TRAIN_SEQ_LEN 0 -> TRAIN_SEQ_LEN) and gets the run's round trip again."""
    from pgolf.cli import main as cli_main

    final, run_dir, _ = learned_run
    assert json.loads((run_dir / "config.json").read_text())["rope_train_seq_len"] == 0
    assert cli_main(["eval", final["artifact"], "--stride", "0"]) == 0
    out = capsys.readouterr().out
    exact = re.search(r"^final_\w+_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", out, re.M)
    assert exact and float(exact.group(2)) == pytest.approx(final["val_bpb"], abs=1e-6)


def test_wallclock_cap_stops_early_after_a_time_placed_warmdown(tiny_data, tmp_path):
    """Under a cap the warmdown is placed by time: the LR must fall during the last WARMDOWN_ITERS steps
    and be near 0 on the last step, not be cut off at full LR when the cap stops the run."""
    cfg = tiny_cfg(tiny_data[0], tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3.0, RUN_ID="cap",
                   TRAIN_LOG_EVERY=1, WARMDOWN_ITERS=5)
    final = run(cfg)
    log = (tmp_path / "cap" / "train.log").read_text()
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000$", log, re.M)
    assert stop and int(stop.group(2)) == final["step_stop"] < 100000
    assert final["train_time_ms"] >= 3000
    lr = [e["lr_mul"] for e in read_events(tmp_path / "cap", "train")]
    assert len(lr) == final["step_stop"] >= 6  # one record per step (a tiny step takes well under 0.5 s)
    assert lr[0] == 1.0
    falling = [m for m in lr if m < 1.0]
    assert len(falling) >= 3 and falling == sorted(falling, reverse=True)  # a real decay, not one last step
    assert lr[-1] < 1.5 / 5  # the cap arrives at the end of the warmdown: less than ~1 of its 5 steps left


def test_gptq_time_is_reserved_inside_the_wallclock_cap(tiny_data, tmp_path):
    """GPTQ_RESERVE_SECONDS comes off the training cap, and the log gives calibration + quantization seconds."""
    cfg = tiny_cfg(tiny_data[0], tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3.0, RUN_ID="gptq",
                   WARMDOWN_ITERS=5, QUANT_FORMAT="int6_zstd", MATRIX_QUANT="gptq", GPTQ_RESERVE_SECONDS=1.5,
                   GPTQ_CALIBRATION_BATCHES=2, COMPRESSOR="pergroup")
    final = run(cfg)
    log = (tmp_path / "gptq" / "train.log").read_text()
    assert "gptq:reserving 1.5s of the wallclock, training until 1500ms" in log
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms", log, re.M)
    assert stop and 1500 <= int(stop.group(1)) < 3000 and final["train_time_ms"] < 3000
    hess = re.search(r"^gptq:collected (\d+) Hessians from 2 training batches in ([\d.]+)s$", log, re.M)
    quant = re.search(r"^quant:gptq matrix_bits:6 .* seconds:([\d.]+)$", log, re.M)
    total = re.search(r"^gptq:training\+quantization (\d+)ms of the 3000ms cap \(reserve 1.5s, used ([\d.]+)s\)$",
                      log, re.M)
    assert hess and quant and total, log[-2000:]
    used = float(hess.group(2)) + float(quant.group(1))
    assert abs(float(total.group(2)) - used) < 0.11
    assert int(total.group(1)) == pytest.approx(final["train_time_ms"] + 1000 * used, abs=110)
    assert math.isfinite(final["val_bpb"])


def test_module_entry_point_runs(tiny_data, tmp_path):
    env = tiny_env(tiny_data[0], tmp_path, ITERATIONS=2, RUN_ID="cli")
    proc = run_cmd([PYTHON, "-m", "pgolf.train"], env)
    assert "final_int8_zlib_roundtrip_exact" in proc.stdout
    assert (tmp_path / "cli" / "final_model.int8.ptz").exists()


def test_unknown_flag_is_rejected_by_the_cli(tiny_data, tmp_path):
    env = tiny_env(tiny_data[0], tmp_path)
    import subprocess

    proc = subprocess.run([PYTHON, "-m", "pgolf.cli", "train", "--num_layerz=3"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown setting --num_layerz" in proc.stderr


@pytest.mark.slow
def test_compiled_runs_in_one_process_do_not_share_a_recompile_budget(tiny_data, tmp_path, monkeypatch):
    """A sweep (the ablation) calls run() with other settings in one process; without a reset each new
    model shape is a recompile of the same forward, and past dynamo's recompile limit (8) that is fatal
    under fullgraph (here the limit is 1)."""
    import torch

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    data_dir, _ = tiny_data
    for i, mult in enumerate((2, 3)):
        final = run(tiny_cfg(data_dir, tmp_path, COMPILE=1, ITERATIONS=2, MLP_MULT=mult, RUN_ID=f"sweep{i}"))
        assert final["step_stop"] == 2
