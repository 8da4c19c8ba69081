"""Records folders built from real tiny runs (made by `pgolf seeds`), and every refusal."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import sys

import pytest

from pgolf import pack, record, seeds
from pgolf.artifact import SIZE_LIMIT
from pgolf.runs import RunError, load_run
from pgolf.stats import mean_std

AUTHOR = ["--author", "Ada Lovelace", "--github-id", "ada", "--name", "Tiny record", "--blurb", "Two tiny seeds."]
REQUIRED = {"author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "pre_quant_val_loss",
            "pre_quant_val_bpb", "roundtrip_val_loss", "roundtrip_val_bpb", "step_stop", "wallclock_seconds",
            "eval_time_seconds", "bytes_total", "bytes_model", "bytes_code"}
MULTI = {"seeds", "seed_results", "means", "stds"}


def tiny_sets(data_dir) -> list[str]:
    values = dict(data_path=data_dir, tokenizer_path=data_dir / "tokenizer.model", vocab_size=512, num_layers=2,
                  model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=64, train_batch_tokens=2048, iterations=8,
                  warmdown_iters=3, val_loss_every=0, train_log_every=1, val_batch_size=8192, warmup_steps=0,
                  max_wallclock_seconds=0, progress=0)
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def seed_runs(tiny_data, tmp_path_factory):
    data_dir, _ = tiny_data
    root = tmp_path_factory.mktemp("seeds")
    argv = ["--preset", "baseline", "--seeds", "1,2", *tiny_sets(data_dir), "--out-dir", str(root / "runs"),
            "--prefix", "tiny"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # as tiny_env does: 2 threads on a shared 2-core box run 50x slower
        assert seeds.seeds_command(argv) == 0
    return root, [root / "runs" / "tiny_seed1", root / "runs" / "tiny_seed2"]


def copy_run(src, dst, **final_changes):
    shutil.copytree(src, dst)
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    final = json.loads(lines[-1])
    assert final["event"] == "final"
    final.update(final_changes)
    (dst / "metrics.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(final)]) + "\n")
    return dst


def test_seeds_dry_run_prints_one_command_per_seed(tmp_path, capsys):
    argv = ["--preset", "seed170", "--seeds", "1337,42", "--set", "num_layers=10", "--out-dir", str(tmp_path / "r"),
            "--prefix", "p", "--dry-run"]
    assert seeds.seeds_command(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [shlex.join([sys.executable, "-m", "pgolf.cli", "train", "--preset=seed170", "--num_layers=10",
                               f"--seed={s}", f"--run_id=p_seed{s}", f"--out_dir={tmp_path / 'r'}"])
                   for s in (1337, 42)]
    script = tmp_path / "rec" / "train_gpt.py"
    script.parent.mkdir()
    script.write_text("")
    assert seeds.seeds_command([*argv, "--nproc", "8", "--script", str(script)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"(cd {tmp_path / 'rec'} && torchrun --standalone --nproc_per_node=8 train_gpt.py "
                     f"--num_layers=10 --seed=1337 --run_id=p_seed1337 --out_dir={tmp_path / 'r'})")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="distinct seeds"):
        seeds.seeds_command(["--seeds", "1,1", "--dry-run"])
    with pytest.raises(ValueError, match="unknown setting --bogus"):
        seeds.seeds_command(["--seeds", "1", "--set", "bogus=2", "--dry-run"])


def test_record_from_two_seeds(seed_runs, tmp_path):
    root, dirs = seed_runs
    runs = [load_run(d) for d in dirs]
    assert [r.seed for r in runs] == [1, 2] and all(r.final["step_stop"] == 8 for r in runs)
    out = tmp_path / "records" / "2026-01-01_tiny"
    assert record.record_command([*map(str, dirs), "--out", str(out), *AUTHOR, "--date", "2026-01-01",
                                  "--no-compress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                     "train_gpt.py", "train_seed1.log", "train_seed2.log"]
    sub = json.loads((out / "submission.json").read_text())
    assert REQUIRED | MULTI <= set(sub)
    assert (sub["author"], sub["github_id"], sub["date"]) == ("Ada Lovelace", "ada", "2026-01-01")
    losses = [r.final["val_loss"] for r in runs]
    assert (sub["val_loss"], sub["stds"]["val_loss"]) == pytest.approx(mean_std(losses))
    assert sub["means"]["val_bpb"] == pytest.approx(sum(r.final["val_bpb"] for r in runs) / 2)
    code = len((out / "train_gpt.py").read_bytes())
    assert sub["bytes_code"] == code
    assert sub["bytes_model"] == max(r.final["bytes_model"] for r in runs)
    assert sub["bytes_total"] == sub["bytes_model"] + code
    assert sub["seeds"] == [1, 2] and set(sub["seed_results"]) == {"1", "2"}
    assert sub["seed_results"]["2"]["val_bpb"] == runs[1].final["val_bpb"]
    assert sub["seed_results"]["1"]["wallclock_seconds"] == round(runs[0].final["train_time_ms"] / 1000, 3)
    assert (out / "train_seed2.log").read_bytes() == (dirs[1] / "train.log").read_bytes()
    req = (out / "requirements.txt").read_text().splitlines()
    assert [line.split("==")[0] for line in req] == ["torch", "numpy", "sentencepiece", "zstandard"]
    shipped = (out / "train_gpt.py").read_text()
    assert "'train_batch_tokens': 2048" in shipped and str(dirs[0].parent.parent) not in shipped
    readme = (out / "README.md").read_text()
    for text in ("# Tiny record", "Two tiny seeds.", "SEED=1 python train_gpt.py", "SEED=2 python train_gpt.py",
                 "| 2 | 8 | ", "| TRAIN_BATCH_TOKENS | 2048 | 524288 |", "sequence length 64, 2,048 tokens per step",
                 f"`train_gpt.py` ({code:,} bytes)", "mean ± std"):
        assert text in readme, text


def test_record_single_run_compressed(seed_runs, tmp_path):
    """The compressed stub is the default of `pgolf record`."""
    root, dirs = seed_runs
    out = tmp_path / "one"
    assert record.record_command([str(dirs[0]), "--out", str(out), *AUTHOR]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert REQUIRED <= set(sub) and not MULTI & set(sub)
    stub, readable = (out / "train_gpt.py").read_bytes(), (out / "train_gpt_readable.py").read_bytes()
    assert sub["bytes_code"] == len(stub) < 0.35 * len(readable)
    assert sub["val_bpb"] == load_run(dirs[0]).final["val_bpb"]
    assert sorted(p.name for p in out.iterdir())[-1] == "train_seed1.log"


def test_record_refusals(seed_runs, tmp_path):
    root, dirs = seed_runs
    args = [*AUTHOR]
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(RunError, match=rf"{existing}: output folder already exists"):
        record.record_command([str(dirs[0]), "--out", str(existing), *args])
    odd = tmp_path / "odd"
    shutil.copytree(dirs[1], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "matrix_lr": 0.01}))
    with pytest.raises(RunError, match="mixes configurations: .* differ in matrix_lr: 0.04 vs 0.01"):
        record.record_command([str(dirs[0]), str(odd), "--out", str(tmp_path / "r1"), *args])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dirs[1], unfinished)
    lines = (unfinished / "metrics.jsonl").read_text().splitlines()
    (unfinished / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(RunError, match=rf"{unfinished}: metrics.jsonl has no \"final\" event"):
        record.record_command([str(unfinished), "--out", str(tmp_path / "r2"), *args])
    code = len(record.shipped_code([load_run(dirs[0])], None, True)["train_gpt.py"])  # the default: the stub
    big = copy_run(dirs[0], tmp_path / "big", bytes_model=SIZE_LIMIT - code + 5)
    (big / "final_model.int8.ptz").unlink()
    with pytest.raises(RunError, match=rf"{big}: artifact .* exceeds the 16,000,000-byte limit by 5 bytes"):
        record.record_command([str(big), "--out", str(tmp_path / "r3"), *args])
    changed = copy_run(dirs[0], tmp_path / "changed", bytes_model=123)
    with pytest.raises(RunError, match="the run logged 123; the artifact was changed after the run"):
        record.record_command([str(changed), "--out", str(tmp_path / "r4"), *args])
    ran_packed = tmp_path / "ran_packed"
    shutil.copytree(dirs[0], ran_packed)
    log = (ran_packed / "train.log").read_text()
    (ran_packed / "train.log").write_text(re.sub(r"bytes \(readable packed train_gpt.py[^)]*\)", "bytes (train_gpt.py)", log))
    other = tmp_path / "other_train_gpt.py"
    other.write_text("print('a different file')\n")
    shipped = len(other.read_bytes())
    with pytest.raises(RunError, match=rf"counts a \d+-byte train_gpt.py but the shipped one has {shipped}"):
        record.record_command([str(ran_packed), "--out", str(tmp_path / "r5"), "--code", str(other), *args])
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def test_record_command_sets_what_the_shipped_file_lacks(seed_runs, tmp_path):
    root, dirs = seed_runs
    code_dir = tmp_path / "work"
    pack.write_packed(code_dir, {"num_layers": 2})  # a file whose defaults are not the runs' settings
    out = tmp_path / "rec"
    assert record.record_command([str(dirs[0]), "--out", str(out), "--code", str(code_dir / "train_gpt.py"),
                                  *AUTHOR]) == 0
    readme = (out / "README.md").read_text()
    line = next(text for text in readme.splitlines() if text.startswith("SEED=1 "))
    assert line.startswith("SEED=1 ")
    assert {"VAL_BATCH_SIZE=8192", "VAL_LOSS_EVERY=0", "TRAIN_LOG_EVERY=1", "ITERATIONS=8"} <= set(line.split())
    assert " NUM_LAYERS=" not in line and "MODEL_DIM=64 " in line and line.endswith(" python train_gpt.py")
    assert "DATA_PATH" not in line and (out / "train_gpt.py").read_bytes() == (code_dir / "train_gpt.py").read_bytes()
    assert f"copied from `{code_dir / 'train_gpt.py'}`" in readme
