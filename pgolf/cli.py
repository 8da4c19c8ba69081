"""The `pgolf` command: one subcommand per job, each handled by the module that owns it."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module:function taking argv, one-line help). Imported lazily so `pgolf --help` is fast.
COMMANDS = {
    "train": ("pgolf.cli:train_command", "train, export, round-trip and score a model (env vars / --key=value)"),
    "data": ("pgolf.cli:data_command", "data tools: synth"),
}

SYNTH_DIR = "./data/synth"


def train_command(argv: list[str]) -> int:
    from pgolf.config import parse_flags, resolve
    from pgolf.train import run

    preset, flags = parse_flags(argv)
    cfg = resolve(preset, flags=flags)
    if not cfg.data_path:  # the smoke preset's offline default: the synthetic corpus
        from pgolf.synth import ensure_synthetic_dataset

        meta = ensure_synthetic_dataset(SYNTH_DIR, vocab_size=cfg.vocab_size)
        cfg.data_path, cfg.tokenizer_path = SYNTH_DIR, meta["tokenizer"]
        print(f"data:synthetic path:{SYNTH_DIR} entropy_bits_per_byte:{meta['entropy_bits_per_byte']:.4f} "
              "(the val_bpb floor)")
    run(cfg)
    return 0


def data_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pgolf data")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="write an offline corpus with a known entropy rate")
    synth.add_argument("--out", default=SYNTH_DIR)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--vocab-size", type=int, default=512)
    synth.add_argument("--train-docs", type=int, default=12000)
    synth.add_argument("--val-docs", type=int, default=400)
    args = parser.parse_args(argv)
    from pgolf.synth import write_synthetic_dataset

    meta = write_synthetic_dataset(args.out, seed=args.seed, vocab_size=args.vocab_size,
                                   train_docs=args.train_docs, val_docs=args.val_docs)
    for key, value in meta.items():
        print(f"{key}:{value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: pgolf COMMAND [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]][0].split(":")
    from pgolf.config import ConfigError

    try:
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"pgolf {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
