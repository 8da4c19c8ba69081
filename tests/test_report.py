"""Run reports: the markdown table carries the final metrics, the plots are real PNGs."""
from __future__ import annotations

import struct

import pytest

from pgolf import report
from pgolf.runs import RunError, load_run, load_runs
from tests.fake_runs import fake_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_writes_table_and_plots(tmp_path, capsys):
    runs = [fake_run(tmp_path / "runs", "a", seed=1, val_loss=2.0123456, val_bpb=1.2345678),
            fake_run(tmp_path / "runs", "b", seed=2, val_loss=2.02, val_bpb=1.24, steps=30, bytes_model=15_990_000,
                     entropy_floor=1.2087),
            fake_run(tmp_path / "runs", "c", seed=3, finished=False)]
    out = tmp_path / "report"
    assert report.report_command([*map(str, runs), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*report.PLOTS, "report.md"])
    for name in report.PLOTS:
        assert png_size(out / name) == (800, 500)
        assert (out / name).stat().st_size > 10_000  # axes, three curves and a legend, not an empty canvas
    md = (out / "report.md").read_text()
    assert "| a | 1 | 20 | 2.0 | 2.01235 | 1.23457 | 1.22957 | 1.23457 | — | — | 1,050,000 | 14,950,000 | finished |" in md
    assert "| b | 2 | 30 | 3.0 | 2.02000 | 1.24000 | 1.23500 | 1.24000 | — | 1.20870 | 16,040,000 | -40,000 | finished |" in md
    assert "| c | 3 | 20 | — | — | — | — | — | — | — | — | — | unfinished (still running, or killed without a record) |" in md
    assert all(f"![{name}]({name})" in md for name in report.PLOTS)
    assert "| a | 1 | 20 |" in capsys.readouterr().out


def test_plot_draws_every_run_with_points(tmp_path):
    runs = load_runs([fake_run(tmp_path, "a", seed=1), fake_run(tmp_path, "b", seed=2, finished=False)],
                     require_final=False)
    assert report.plot(runs, "train", "train_loss", "time", "loss", tmp_path / "t.png") == 2
    assert report.plot(runs, "val", "val_bpb", "step", "bpb", tmp_path / "v.png") == 2
    assert report.plot(runs, "val", "no_such_metric", "step", "x", tmp_path / "n.png") == 0
    assert png_size(tmp_path / "n.png") == (800, 500)  # still a valid image, saying there is nothing to draw


def test_run_series_reads_the_curves(tmp_path):
    run = load_run(fake_run(tmp_path, "a", steps=20))
    steps, times, losses = run.series("train", "train_loss")
    assert steps == list(range(1, 21)) and times[-1] == 2000.0
    assert losses[0] == pytest.approx(5.9) and losses[-1] == pytest.approx(4.0)
    assert run.series("val", "val_bpb") == ([0, 10, 20], [0.0, 1000.0, 2000.0], [3.0, 2.5, 2.0])


def test_report_refuses_existing_folder_and_bad_runs(tmp_path):
    run = fake_run(tmp_path / "runs", "a")
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match=rf"{out}: output folder already exists"):
        report.report_command([str(run), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(RunError, match="no metrics.jsonl"):
        report.report_command([str(tmp_path / "runs"), "--out", str(tmp_path / "r2")])
    assert not (tmp_path / "r2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind


def test_new_folder_is_all_or_nothing(tmp_path):
    from pgolf.runs import new_folder

    with pytest.raises(RuntimeError, match="boom"):
        with new_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    with new_folder(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "done.txt").read_text() == "ok"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_report_marks_runs_that_stopped_early_and_draws_the_floor(tmp_path, capsys):
    stopped = [fake_run(tmp_path, "int", steps=12, finished=False, early_end={"event": "interrupted", "step": 12}),
               fake_run(tmp_path, "bad", steps=7, finished=False,
                        early_end={"event": "failed", "step": 7, "error": "OSError: disk full | retry"})]
    runs = load_runs(stopped, require_final=False)
    assert [r.status for r in runs] == ["interrupted at step 12", "failed at step 7: OSError: disk full | retry"]
    assert report.table_row(runs[0])[2:] == ["12"] + ["—"] * 9 + ["interrupted at step 12"]
    assert report.table_row(runs[1])[-1] == "failed at step 7: OSError: disk full \\| retry"  # a table cell
    with pytest.raises(RunError, match=r"did not finish \(interrupted at step 12\)"):
        load_run(stopped[0])

    # The entropy floor is drawn as a line of its own: the plot differs from the same runs without it.
    plain = load_runs([fake_run(tmp_path / "p", "syn", seed=1)])
    floored = load_runs([fake_run(tmp_path / "f", "syn", seed=1, entropy_floor=2.5)])
    assert plain[0].entropy_floor is None and floored[0].entropy_floor == 2.5
    report.plot(plain, "val", "val_bpb", "step", "bpb", tmp_path / "plain.png")
    report.plot(floored, "val", "val_bpb", "step", "bpb", tmp_path / "floored.png")
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "floored.png").read_bytes()
