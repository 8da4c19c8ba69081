"""Command-line pieces shared by the `pgolf` commands built on argparse: help texts that are the whole
module docstring, and the preset + settings options of pack, budget and seeds, which take settings the
way `pgolf train` does (`--name=value`, or `--set NAME=VALUE`)."""
from __future__ import annotations

import argparse

SETTINGS_EPILOG = ("settings: any setting as --name=value (e.g. --num_layers=11), or --set NAME=VALUE; "
                   "`pgolf train --help` lists them all with their defaults")


def command_parser(prog: str, doc: str, settings: bool = False) -> argparse.ArgumentParser:
    """A parser whose description is `doc` as written (never cut mid-sentence); with settings, the
    --preset (its choices listed) and --set options, and no abbreviations (--seed must not mean --seeds)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=SETTINGS_EPILOG if settings else None, allow_abbrev=not settings)
    if settings:
        from pgolf.config import PRESETS

        parser.add_argument("--preset", default="baseline", choices=list(PRESETS), metavar="PRESET",
                            help=f"one of: {', '.join(PRESETS)} (default baseline; `pgolf train --help` describes them)")
        parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                            help="override a setting (repeatable); the same as --name=value")
    return parser


def parse_with_settings(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """(the command's own options, the setting overrides): --set pairs plus every leftover --name=value."""
    from pgolf.config import parse_flags

    args, rest = parser.parse_known_args(argv)
    _, flags = parse_flags([*rest, *(f"--set={pair}" for pair in args.sets)])
    return args, flags
