"""`pgolf seeds --preset P --seeds 1337,42,2025`: one run per seed, one after another, each into its
own run folder (`<out_dir>/<prefix>_seed<S>`); `--dry-run` prints the commands instead.

Runs use the package (`pgolf train`, or `torchrun -m pgolf.train` with --nproc > 1) or, with
--script, a packed train_gpt.py launched from inside its folder, as the challenge runs it.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from pgolf.config import resolve
from pgolf.options import command_parser, parse_with_settings


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1337,42,2025") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give one or more distinct seeds")
    return seeds


def seed_commands(preset: str, sets: dict[str, str], seeds: list[int], prefix: str, out_dir: str, nproc: int,
                  script: str | None) -> list[list[str]]:
    """One argv per seed; settings travel as --key=value flags so each command is complete on its own."""
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    commands = []
    for seed in seeds:
        flags = [f"--{k}={v}" for k, v in sets.items()]
        flags += [f"--seed={seed}", f"--run_id={prefix}_seed{seed}", f"--out_dir={out_dir}"]
        if script:
            target = [Path(script).name]
        elif nproc > 1:
            target = ["-m", "pgolf.train", f"--preset={preset}"]
        else:
            target = ["-m", "pgolf.cli", "train", f"--preset={preset}"]
        commands.append(launcher + target + flags)
    return commands


def seeds_command(argv: list[str]) -> int:
    parser = command_parser("pgolf seeds", __doc__, settings=True)
    parser.add_argument("--seeds", required=True, help="comma-separated, e.g. 1337,42,2025")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("--script", help="a packed train_gpt.py to run (from inside its folder) instead of the package")
    parser.add_argument("--out-dir", default="runs", help="parent folder of the run folders")
    parser.add_argument("--prefix", default=None, help="run id prefix (default: <preset>_<date>_<time>)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, sets = parse_with_settings(parser, argv)
    seeds = parse_seeds(args.seeds)
    resolve(args.preset, env={}, flags=sets)  # unknown keys and bad values fail here, before any run
    if args.script and not Path(args.script).is_file():
        raise FileNotFoundError(f"--script {args.script}: no such file; pack one with `pgolf pack --out DIR`")
    cwd = str(Path(args.script).resolve().parent) if args.script else None
    out_dir = str(Path(args.out_dir).resolve())  # absolute: a script runs from its own folder
    prefix = args.prefix or f"{args.preset}_{time.strftime('%Y%m%d_%H%M%S')}"
    commands = seed_commands(args.preset, sets, seeds, prefix, out_dir, args.nproc, args.script)
    for cmd in commands:
        line = shlex.join(cmd)
        print(f"(cd {shlex.quote(cwd)} && {line})" if cwd else line, flush=True)
        if args.dry_run:
            continue
        if subprocess.run(cmd, cwd=cwd).returncode != 0:
            print(f"pgolf seeds: the run above failed; stopping (finished runs are kept in {out_dir})", file=sys.stderr)
            return 1
    if not args.dry_run:
        dirs = " ".join(shlex.quote(f"{out_dir}/{prefix}_seed{s}") for s in seeds)
        print(f"run folders: {dirs}\nnext: pgolf significance {dirs} --vs ...  |  pgolf record {dirs} --out ...")
    return 0
