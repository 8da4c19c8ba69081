"""What a new user sees: `--help` on every command, one-line errors with their exit codes, closest-name
suggestions, log lines that keep the progress bar intact, and the closing summary line."""
from __future__ import annotations

import errno
import io
import re
import sys
from dataclasses import dataclass, fields

import pytest

from pgolf import console
from pgolf.cli import COMMANDS, main
from pgolf.config import GROUPS, PRESET_HELP, PRESETS, ConfigError, Hyperparameters, parse_flags, resolve
from pgolf.model import GPTConfig
from tests.conftest import PYTHON, run_cmd


# ---- pgolf train --help ------------------------------------------------------------------------------

def help_text(capsys, *argv) -> str:
    assert main(["train", *argv]) == 0
    return capsys.readouterr().out


def test_train_help_lists_presets_settings_comments_and_examples(capsys):
    for flag in ("--help", "-h"):
        out = help_text(capsys, flag)
        for name in PRESETS:
            assert re.search(rf"^  {re.escape(name)} +{re.escape(PRESET_HELP[name])}$", out, re.M), name
        defaults = Hyperparameters()
        for title, group in GROUPS:
            assert f"\n{title} ({group.__name__}):\n" in out
            comments = console.field_comments(group)
            for f in fields(group):
                value = console._shown(getattr(defaults, f.name))
                line = re.search(rf"^  {f.name.upper()}=(\S*) *(.*)$", out, re.M)
                assert line and line.group(1) == value, f.name
                if f.name in comments:  # the comment, on the same line or (after a long value) the next one
                    assert comments[f.name] in out[line.start():line.end() + 200], f.name
        assert "PGOLF_NAME" in out and "--name=value" in out and "examples:" in out
        assert "pgolf train --preset smoke" in out


def test_every_preset_has_a_one_line_description():
    assert list(PRESET_HELP) == list(PRESETS)
    assert all(text and "\n" not in text for text in PRESET_HELP.values())


def test_help_shows_where_values_come_from(capsys):
    text = console.settings_help(["--preset", "smoke", "--num_layers=3", "--help"], env={"MATRIX_LR": "0.03"})
    assert re.search(r"^  NUM_LAYERS=3 .*\[flag --num_layers; default 9\]$", text, re.M)
    assert re.search(r"^  MATRIX_LR=0.03 .*\[env MATRIX_LR; default 0.04\]$", text, re.M)
    assert re.search(r"^  ITERATIONS=150 .*\[preset smoke; default 20000\]$", text, re.M)
    bad = console.settings_help(["--num_layerz=3"], env={})
    assert "the values below are the defaults" in bad and "did you mean --num_layers?" in bad


def test_field_comments_come_from_the_source():
    comments = console.field_comments(GPTConfig)
    assert comments["num_layers"].startswith("transformer blocks (first half encoder")
    assert "beta1" not in console.field_comments(Hyperparameters)  # a field without a comment has none
    assert console.field_comments(Hyperparameters)["control_tensor_name_patterns"].startswith("stored fp32")

    @dataclass
    class Example:
        width: int = 3  # the width
        depth: int = (  # spans lines
            4)
        height: int = 2

        def method(self):
            height = 5  # not a field comment
            return height

    assert console.field_comments(Example) == {"width": "the width", "depth": "spans lines"}


def test_module_and_packed_entry_points_print_help(tmp_path):
    from pgolf import pack

    out = run_cmd([PYTHON, "-m", "pgolf.train", "--help"], env=None).stdout
    assert "usage: python -m pgolf.train" in out and "transformer blocks" in out
    pack.write_packed(tmp_path / "plain", {"num_layers": 3})
    pack.write_packed(tmp_path / "stub", {"num_layers": 3}, compress=True)
    # A packed file is lean: its help lists the settings it was packed with (`pgolf train --help` has them all).
    plain = run_cmd([PYTHON, "train_gpt.py", "--help"], env=None, cwd=tmp_path / "plain").stdout
    assert plain.endswith("NUM_LAYERS=3\n(the rest at their defaults)\n") and plain.startswith("usage: train_gpt.py")
    stub = run_cmd([PYTHON, "train_gpt.py", "-h"], env=None, cwd=tmp_path / "stub").stdout
    assert stub == plain


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("train", "data", "eval")])
def test_command_help_is_the_whole_docstring(command, capsys):
    import importlib

    module = importlib.import_module(COMMANDS[command][0].split(":")[0])
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    first_paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
    assert first_paragraph in out  # not cut after its first line
    if command in ("pack", "budget", "seeds"):
        assert f"one of: {', '.join(PRESETS)}" in out and "--name=value" in out


# ---- settings: one spelling, closest names --------------------------------------------------------------

def test_both_override_spellings_mean_the_same():
    assert parse_flags(["--set", "num_layers=3", "--set=MATRIX_LR=0.1", "--seed", "5"]) == (
        None, {"num_layers": "3", "MATRIX_LR": "0.1", "seed": "5"})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_flags(["--set", "num_layers"])


def test_pack_budget_seeds_take_train_style_settings(tmp_path, capsys):
    from pgolf import pack, seeds

    assert pack.pack_command(["--preset", "smoke", "--num_layers=3", "--out", str(tmp_path / "a")]) == 0
    assert pack.pack_command(["--preset", "smoke", "--set", "num_layers=3", "--out", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "train_gpt.py").read_text(), (tmp_path / "b" / "train_gpt.py").read_text()
    assert a == b and "'num_layers': 3" in a
    capsys.readouterr()
    # --seed is a setting here, not an abbreviation of --seeds
    assert seeds.seeds_command(["--preset", "smoke", "--seeds", "1,2", "--num_layers", "3", "--seed=9",
                                "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[:2]
    assert all("--num_layers=3" in line for line in lines)
    assert [re.findall(r"--seed=(\d+)", line)[-1] for line in lines] == ["1", "2"]
    with pytest.raises(ConfigError, match=r"did you mean --num_layers\?"):
        pack.pack_command(["--num_layerz=3", "--out", str(tmp_path / "c")])


def test_unknown_setting_suggests_the_closest_names():
    with pytest.raises(ConfigError) as info:
        resolve("baseline", env={}, flags={"num_layerz": "3"})
    message = str(info.value)
    assert message == "unknown setting --num_layerz; did you mean --num_layers? `pgolf train --help` lists every setting"
    with pytest.raises(ConfigError, match=r"in env var PGOLF_MATRIX_LRR; did you mean PGOLF_MATRIX_LR or "):
        resolve("baseline", env={"PGOLF_MATRIX_LRR": "0.1"})
    with pytest.raises(ConfigError) as info:
        resolve("baseline", env={}, flags={"xyzzy": "1"})
    assert "did you mean" not in str(info.value) and len(str(info.value)) < 100


# ---- one-line errors ------------------------------------------------------------------------------------

def test_expected_errors_are_one_line_with_exit_codes(capsys):
    def fail(error):
        def func(argv):
            raise error
        return func

    cases = [
        (PermissionError(errno.EACCES, "Permission denied", "runs/x"), 2,
         "pgolf x: error: runs/x: Permission denied; check its permissions or choose a folder you can write to"),
        (OSError(errno.ENOSPC, "No space left on device", "runs/x/final_model.pt"), 2,
         "pgolf x: error: runs/x/final_model.pt: No space left on device; the disk is full; free some space or "
         "choose another folder"),
        (FileNotFoundError("DATA_PATH: no such folder\nsecond line"), 2, "pgolf x: error: DATA_PATH: no such folder; "
                                                                         "second line"),
        (ConfigError("bad value"), 2, "pgolf x: error: bad value"),
        (KeyboardInterrupt(), 130, "pgolf x: interrupted"),
        (KeyboardInterrupt("interrupted at step 3; runs/x keeps the log"), 130,
         "pgolf x: interrupted at step 3; runs/x keeps the log"),
    ]
    for error, code, line in cases:
        assert console.run_command("pgolf x", fail(error), []) == code
        assert capsys.readouterr().err == line + "\n"
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        console.run_command("pgolf x", fail(RuntimeError("a bug")), [])


# ---- the terminal: the bar and the closing line ------------------------------------------------------

def render(text: str) -> list[str]:
    """The lines a terminal shows for `text` (carriage returns overwrite; enough for one tqdm bar)."""
    lines, row, col = [[]], 0, 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        else:
            line = lines[row]
            line[col:col + 1] = [ch]
            col += 1
    return ["".join(line).rstrip() for line in lines]


def test_log_lines_keep_the_progress_bar_intact(tmp_path, monkeypatch):
    from pgolf.train import RunLog

    screen = io.StringIO()  # one terminal for both streams, as in a shell
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    log = RunLog()
    log.open(tmp_path)
    bar = console.progress_bar(10)
    bar.update(1)
    log("step:1/10 train_loss:6.9000")
    bar.update(1)
    log("step:2/10 train_loss:6.8000")
    bar.close()
    log.close()
    shown = [line for line in render(screen.getvalue()) if line]
    assert shown[:2] == ["step:1/10 train_loss:6.9000", "step:2/10 train_loss:6.8000"]
    assert len(shown) == 3 and re.match(r"^ *20%\|.*\| 2/10 ", shown[2])  # one bar, below the lines
    assert (tmp_path / "train.log").read_text() == "step:1/10 train_loss:6.9000\nstep:2/10 train_loss:6.8000\n"


def test_summary_line():
    final = {"roundtrip_val_bpb": 1.25530370, "val_bpb": 1.2401, "sliding_val_bpb": 1.2401, "bytes_total": 306_959,
             "artifact": "runs/a/final_model.int8.ptz"}
    assert console.summary_line(final, 1.20871) == (
        "summary: round-trip val_bpb 1.2553 | sliding val_bpb 1.2401 | entropy floor 1.2087 (synthetic corpus; gap "
        "+0.0314) | 306,959 of 16,000,000 bytes (OK) | artifact runs/a/final_model.int8.ptz")
    over = dict(final, sliding_val_bpb=None, val_bpb=1.2553, bytes_total=16_000_001)
    assert console.summary_line(over, None) == ("summary: round-trip val_bpb 1.2553 | 16,000,001 of 16,000,000 bytes "
                                                "(OVER THE LIMIT) | artifact runs/a/final_model.int8.ptz")
