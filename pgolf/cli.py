"""The `pgolf` command: one subcommand per job, each handled by the module that owns it."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module:function taking argv, one-line help). Imported lazily so `pgolf --help` is fast.
COMMANDS = {
    "train": ("pgolf.cli:train_command", "train, export, round-trip and score a model (env vars / --key=value)"),
    "data": ("pgolf.cli:data_command", "data tools: download, prepare, verify, synth"),
    "eval": ("pgolf.eval_artifact:main", "score a saved artifact: standard + sliding-window val_bpb, no training"),
    "audit": ("pgolf.audit:main", "test an eval's legality: causality, normalization, score-first, one pass, bytes"),
    "pack": ("pgolf.pack:pack_command", "write a self-contained train_gpt.py from a preset (--compress: counted stub)"),
    "budget": ("pgolf.budget:budget_command", "predict artifact + code bytes of a configuration before training"),
    "seeds": ("pgolf.seeds:seeds_command", "run one configuration for several seeds (or --dry-run the commands)"),
    "significance": ("pgolf.stats:significance_command", "one-sided Welch t-test: better by >= N nats at p < 0.01?"),
    "record": ("pgolf.record:record_command", "build a records folder (README, submission.json, logs) from runs"),
    "report": ("pgolf.report:report_command", "markdown table + loss/val_bpb plots of run folders"),
    "preflight": ("pgolf.preflight:preflight_command", "first run on a new GPU: 50 steps, checks, ms/step, MFU, memory"),
}

SYNTH_DIR = "./data/synth"


TRAIN_USAGE = """usage: pgolf train [--preset NAME] [--name=value ...]      (or env vars: NAME=value pgolf train)

Train a model, write the artifact, read it back from disk into a fresh model and score that.
"""

TRAIN_EXAMPLES = """
examples:
  pgolf train --preset smoke                      # offline: synthetic corpus in ./data/synth, no download
  pgolf train --preset smoke --num_layers=4 --iterations=300
  pgolf train --preset smoke --help               # this list with the smoke preset's values
  DATA_PATH=DIR TOKENIZER_PATH=FILE VOCAB_SIZE=1024 pgolf train --preset smoke   # your own shards
  NUM_LAYERS=11 RUN_ID=try1 pgolf train --preset seed170 --muon_weight_decay=0.038
  torchrun --standalone --nproc_per_node=8 -m pgolf.train                       # 8 GPUs, baseline preset
A run writes runs/<RUN_ID>/: train.log, metrics.jsonl, config.json, final_model.pt and the artifact.
"""


def train_command(argv: list[str]) -> int:
    from pgolf.config import parse_flags, resolve
    from pgolf.console import settings_help, wants_help
    from pgolf.train import run

    if wants_help(argv):
        print(TRAIN_USAGE + "\n" + settings_help(argv) + TRAIN_EXAMPLES, end="")
        return 0
    preset, flags = parse_flags(argv)
    cfg = resolve(preset, flags=flags)
    if not cfg.data_path:  # the smoke preset's offline default: the synthetic corpus
        cfg.data_path, cfg.tokenizer_path = SYNTH_DIR, synthetic_corpus(cfg.vocab_size)
    run(cfg)
    return 0


def synthetic_corpus(vocab_size: int) -> str:
    """Make (or reuse) the offline corpus in SYNTH_DIR; -> its tokenizer path."""
    from pgolf.synth import ensure_synthetic_dataset

    try:
        return ensure_synthetic_dataset(SYNTH_DIR, vocab_size=vocab_size)["tokenizer"]
    except PermissionError as e:
        raise PermissionError(f"cannot write the synthetic corpus to {SYNTH_DIR} ({e.filename}: {e.strerror}); run "
                              "from a folder you can write to, or set DATA_PATH and TOKENIZER_PATH to a dataset") from None


def data_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pgolf data")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="write an offline corpus with a known entropy rate")
    synth.add_argument("--out", default=SYNTH_DIR)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--vocab-size", type=int, default=1024)
    synth.add_argument("--train-docs", type=int, default=12000)
    synth.add_argument("--val-docs", type=int, default=400)
    _add_data_tools(sub)
    args = parser.parse_args(argv)
    if args.action != "synth":
        return DATA_ACTIONS[args.action](args)
    from pgolf.synth import write_synthetic_dataset

    meta = write_synthetic_dataset(args.out, seed=args.seed, vocab_size=args.vocab_size,
                                   train_docs=args.train_docs, val_docs=args.val_docs)
    for key, value in meta.items():
        print(f"{key}:{value}")
    return 0


def _add_data_tools(sub) -> None:
    from pgolf.download import DEFAULT_REPO_ID, DEFAULT_REMOTE_ROOT

    dl = sub.add_parser("download", help="fetch the challenge shards + tokenizer from the Hugging Face hub")
    dl.add_argument("--variant", default="sp1024", help="dataset fineweb10B_<variant> (sp1024, byte260, sp8192, "
                    "sp8192_lossless_caps_caseops_v1_reserved, ...)")
    dl.add_argument("--train-shards", type=int, required=True, help="train shards to fetch (capped at the manifest's)")
    dl.add_argument("--dest", default="./data", help="local root: manifest.json, datasets/, tokenizers/")
    dl.add_argument("--repo-id", help=f"hub dataset repo (default: where --variant is published, else {DEFAULT_REPO_ID})")
    dl.add_argument("--remote-root", default=DEFAULT_REMOTE_ROOT)
    dl.add_argument("--mirror", help="copy from a local directory laid out like the hub repo instead")
    prep = sub.add_parser("prepare", help="tokenize JSON-lines documents into shards + manifest")
    prep.add_argument("--docs", required=True, help='JSON lines, one {"text": ...} per document')
    prep.add_argument("--out", required=True)
    prep.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size (default 1024)")
    prep.add_argument("--tokenizer", help="use this SentencePiece model instead of training one")
    prep.add_argument("--num-val-docs", type=int, default=50_000, help="the first K documents are val")
    prep.add_argument("--shard-tokens", type=int, default=10**8)
    prep.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    prep.add_argument("--tokenizer-train-docs", type=int, default=0, help="cap on train docs for the tokenizer")
    prep.add_argument("--byte-sidecar", action="store_true", help="also write fineweb_val_bytes_*.bin")
    prep.add_argument("--caseops", action="store_true",
                      help="lossless case transform (pgolf/caseops.py); writes the val byte sidecar")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is done")
    ver = sub.add_parser("verify", help="check shards, tokenizer, manifest and byte accounting")
    ver.add_argument("dir")
    ver.add_argument("--tokenizer", help="default: the manifest's, else DIR/tokenizer.model")
    ver.add_argument("--docs", help="source documents to compare the decoded text with (default: the manifest's)")


def _download(args) -> int:
    from pathlib import Path

    from pgolf.download import HfHub, LocalHub, download, repo_for

    hub = LocalHub(args.mirror) if args.mirror else HfHub(repo_for(args.variant, args.repo_id), Path(args.dest))
    summary = download(args.variant, args.train_shards, args.dest, hub, remote_root=args.remote_root)
    print(f"fetched:{summary['fetched']} skipped:{summary['skipped']} val_shards:{summary['val_shards']} "
          f"train_shards:{summary['train_shards']}")
    print(f"DATA_PATH={summary['data_path']} TOKENIZER_PATH={summary['tokenizer_path']}")
    return 0


def _prepare(args) -> int:
    from pgolf.prepare import prepare_dataset

    manifest = prepare_dataset(args.docs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                               num_val_docs=args.num_val_docs, shard_tokens=args.shard_tokens,
                               workers=args.workers, overwrite=args.overwrite, byte_sidecar=args.byte_sidecar,
                               tokenizer_train_docs=args.tokenizer_train_docs,
                               transform="caseops" if args.caseops else None)
    tok = manifest["tokenizer"]
    print(f"tokenizer:{tok['source']} vocab_size:{tok['vocab_size']} sha256:{tok['sha256'][:16]}")
    for split, stats in manifest["splits"].items():
        print(f"{split}: docs:{stats['docs']} tokens:{stats['tokens']} bytes:{stats['bytes']} "
              f"shards:{len(stats['shards'])} skipped_empty:{stats['skipped_empty']}")
    if manifest["transform"]:
        print(f"transform:{manifest['transform']['name']} v{manifest['transform']['version']} byte_sidecar:val")
    print(f"DATA_PATH={args.out} TOKENIZER_PATH={args.out}/{tok['model_path']}")
    return 0


def _verify(args) -> int:
    from pgolf.verify import format_report
    from pgolf.verify_text import verify_with_texts

    report, text = verify_with_texts(args.dir, args.tokenizer, args.docs, progress=sys.stderr.isatty())
    print(format_report(report, text.lines()))
    return 0 if report.ok else 1


DATA_ACTIONS = {"download": _download, "prepare": _prepare, "verify": _verify}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: pgolf COMMAND [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]][0].split(":")
    from pgolf.console import run_command

    return run_command(f"pgolf {argv[0]}", lambda args: getattr(importlib.import_module(module), func)(args), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
