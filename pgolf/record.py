"""`pgolf record RUN_DIR... --out records/<date>_<slug>/ --author ...`: a submission folder in the
challenge's layout, built from finished run folders:

- train_gpt.py: the file the runs were made with (--code), or packed from the runs' configuration
  (with --compress, the counted stub plus the readable twin);
- README.md: results table, techniques, configuration, exact command, hardware;
- submission.json: author fields, scores, sizes; with several runs also seeds, seed_results, means, stds;
- the train logs and a requirements.txt.

Refused, with nothing written: runs without final metrics, runs of different configurations, an
existing output folder, a run whose artifact plus the shipped code exceeds 16,000,000 bytes, and
runs whose logged code size belongs to another train_gpt.py than the one shipped.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import shlex
import shutil
import time
from importlib import metadata
from pathlib import Path

from pgolf.artifact import SIZE_LIMIT
from pgolf.config import Hyperparameters, preset_diff
from pgolf.options import command_parser
from pgolf.pack import READABLE_NAME, compressed_stub, packed_source
from pgolf.runs import PER_RUN_KEYS, Run, RunError, check_same_config, load_runs, new_folder
from pgolf.stats import mean_std

REQUIREMENTS = ("torch", "numpy", "sentencepiece", "zstandard")
# Settings of the runs that say where they ran, not what they are: the shipped file keeps the
# challenge defaults for these (the harness sets DATA_PATH etc.; SEED goes on the command line).
MACHINE_SETTINGS = ("seed", "data_path", "tokenizer_path", "progress")
METRICS = ("val_loss", "val_bpb", "pre_quant_val_loss", "pre_quant_val_bpb", "roundtrip_val_loss",
           "roundtrip_val_bpb", "sliding_val_loss", "sliding_val_bpb")


def logged_code_size(run: Run) -> tuple[int, str] | None:
    for line in run.log_lines("Code size: "):
        match = re.match(r"Code size: (\d+) bytes \((.+)\)$", line)
        if match:
            return int(match.group(1)), match.group(2)
    return None


def shipped_code(runs: list[Run], code: str | None, compress: bool) -> dict[str, bytes]:
    """The code files of the submission: {file name: bytes}; train_gpt.py is the counted one."""
    if code:
        path = Path(code)
        if not path.is_file():
            raise RunError(f"--code {code}: no such file")
        files = {"train_gpt.py": path.read_bytes()}
        twin = path.with_name(READABLE_NAME)
        if twin.is_file():
            files[READABLE_NAME] = twin.read_bytes()
        return files
    config = runs[0].config
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(Hyperparameters)})
    if unknown:
        raise RunError(f"{runs[0].path}/config.json has settings this pgolf does not know ({', '.join(unknown)}); "
                       "pass --code with the train_gpt.py the runs were made with")
    base = Hyperparameters()
    cfg = Hyperparameters(**{**config, **{k: getattr(base, k) for k in MACHINE_SETTINGS}})
    source = packed_source(preset_diff(cfg))
    if compress:
        return {"train_gpt.py": compressed_stub(source), READABLE_NAME: source.encode()}
    return {"train_gpt.py": source.encode()}


def check_sizes(runs: list[Run], code_bytes: int) -> dict[str, int]:
    """Per run: the artifact bytes (the file on disk must match the log), refusing totals over the limit."""
    model_bytes = {}
    for run in runs:
        logged = run.final["bytes_model"]
        artifact = run.path / Path(run.final.get("artifact", "")).name
        if artifact.is_file() and artifact.stat().st_size != logged:
            raise RunError(f"{artifact}: {artifact.stat().st_size} bytes on disk but the run logged {logged}; "
                           "the artifact was changed after the run")
        total = logged + code_bytes
        if total > SIZE_LIMIT:
            raise RunError(f"{run.path}: artifact {logged:,} + code {code_bytes:,} = {total:,} bytes exceeds the "
                           f"{SIZE_LIMIT:,}-byte limit by {total - SIZE_LIMIT:,} bytes; this cannot be submitted")
        size = logged_code_size(run)
        if size and size[1] == "train_gpt.py" and size[0] != code_bytes:
            raise RunError(f"{run.path}/train.log counts a {size[0]}-byte train_gpt.py but the shipped one has "
                           f"{code_bytes} bytes; pass --code with the file these runs were made with")
        model_bytes[run.run_id] = logged
    return model_bytes


def run_results(run: Run, code_bytes: int) -> dict:
    f = run.final
    out = {k: f[k] for k in METRICS if k in f}
    out.update(step_stop=f["step_stop"], wallclock_seconds=round(f["train_time_ms"] / 1000, 3),
               eval_time_seconds=round(f["eval_time_ms"] / 1000, 3), bytes_model=f["bytes_model"],
               bytes_total=f["bytes_model"] + code_bytes)
    return out


def submission(runs: list[Run], code_bytes: int, author: dict) -> dict:
    """submission.json: one run's results, or for several the means (bytes: the largest run)."""
    results = [run_results(r, code_bytes) for r in runs]
    out = {**author}
    if len(runs) == 1:
        out.update(results[0])
    else:
        keys = [k for k in results[0] if k not in ("bytes_model", "bytes_total")]
        stats = {k: mean_std([r[k] for r in results]) for k in keys}
        out.update({k: m for k, (m, _) in stats.items()})
        out["step_stop"] = round(out["step_stop"])
        out.update(bytes_model=max(r["bytes_model"] for r in results),
                   bytes_total=max(r["bytes_total"] for r in results))
    out.update(bytes_code=code_bytes, quant_format=runs[0].final["quant_format"],
               model_params=runs[0].final["model_params"])
    if len(runs) > 1:
        out["seeds"] = [r.seed for r in runs]
        out["seed_results"] = {str(r.seed): res for r, res in zip(runs, results)}
        out["means"] = {k: m for k, (m, _) in stats.items()}
        out["stds"] = {k: s for k, (_, s) in stats.items()}
    return out


def techniques(config: dict) -> list[str]:
    """What the configuration changes relative to the challenge baseline, in words."""
    c, base, out = config, dataclasses.asdict(Hyperparameters()), []
    dim = c["model_dim"]
    if c["num_layers"] != base["num_layers"] or dim != base["model_dim"]:
        out.append(f"{c['num_layers']} layers x {dim} (baseline 9 x 512)")
    if c["mlp_mult"] != base["mlp_mult"]:
        out.append(f"MLP {c['mlp_mult']:g}x (hidden {int(round(c['mlp_mult'] * dim))})")
    if c["quant_format"] == "int6_zstd":
        out.append("int6 per-row attention/MLP matrices, fp16 tied embedding, zstd-22")
    if c["qat"]:
        out.append(f"int6 straight-through QAT from {c['qat_start_frac']:.0%} of training")
    if c["smear_gate"]:
        out.append("SmearGate (previous-token blend, masked at BOS)")
    if c["muon_variant"] != "muon":
        out.append(f"{c['muon_variant']} optimizer for the matrices")
    if c["muon_weight_decay"]:
        out.append(f"decoupled Muon weight decay {c['muon_weight_decay']:g}")
    if c["swa_every"]:
        out.append(f"SWA every {c['swa_every']} steps in the warmdown")
    if c["eval_stride"]:
        out.append(f"sliding-window evaluation, stride {c['eval_stride']}")
    if c["train_seq_len"] != base["train_seq_len"] or c["train_batch_tokens"] != base["train_batch_tokens"]:
        out.append(f"sequence length {c['train_seq_len']}, {c['train_batch_tokens']:,} tokens per step")
    return out or ["the challenge baseline configuration"]


def requirements() -> str:
    lines = []
    for name in REQUIREMENTS:
        try:
            lines.append(f"{name}=={metadata.version(name).split('+')[0]}")  # no local label (+cpu, +cu128)
        except metadata.PackageNotFoundError:
            lines.append(name)
    return "\n".join(lines) + "\n"


def log_names(runs: list[Run]) -> list[str]:
    seeds = [r.seed for r in runs]
    if len(set(seeds)) == len(seeds):
        return [f"train_seed{s}.log" for s in seeds]
    return [f"train_{r.run_id}.log" for r in runs]


def baked_defaults(files: dict[str, bytes]) -> dict | None:
    """The defaults a pgolf-packed train_gpt.py carries (its one preset, 'packed'); None for another file."""
    source = files.get(READABLE_NAME) or files["train_gpt.py"]
    match = re.search(rb"^PRESETS = \{'packed': (\{.*\})\}$", source, re.M)
    try:
        return ast.literal_eval(match.group(1).decode()) if match else None
    except (ValueError, SyntaxError):
        return None


def command_env(config: dict, defaults: dict | None) -> str:
    """Env vars for the settings the runs used that the shipped file would not pick by itself."""
    base = dataclasses.asdict(Hyperparameters())
    effective = {**base, **(defaults or {})}
    env = []
    for key, value in config.items():
        if key in base and key not in MACHINE_SETTINGS + PER_RUN_KEYS and value != effective[key]:
            text = str(int(value)) if isinstance(value, bool) else str(value)
            env.append(f"{key.upper()}={shlex.quote(text)} ")
    return "".join(env)


def _world_size(run: Run) -> int:
    for line in run.log_lines("world_size:"):
        return int(line.split()[0].split(":")[1])
    return 1


def _results_table(runs: list[Run], sub: dict) -> list[str]:
    head = ("| seed | steps | train s | eval s | pre-quant bpb | round-trip bpb | sliding bpb | val_loss | val_bpb "
            "| artifact bytes | total bytes |")
    rows = [head, "|" + "---|" * 11]
    results = sub.get("seed_results") or {str(runs[0].seed): sub}
    for seed, r in results.items():
        sliding = f"{r['sliding_val_bpb']:.5f}" if "sliding_val_bpb" in r else "—"
        rows.append(f"| {seed} | {r['step_stop']} | {r['wallclock_seconds']:.1f} | {r['eval_time_seconds']:.1f} "
                    f"| {r['pre_quant_val_bpb']:.5f} | {r['roundtrip_val_bpb']:.5f} | {sliding} | {r['val_loss']:.5f} "
                    f"| {r['val_bpb']:.5f} | {r['bytes_model']:,} | {r['bytes_total']:,} |")
    if "stds" in sub:
        m, s = sub["means"], sub["stds"]
        rows.append(f"| mean ± std | | | | {m['pre_quant_val_bpb']:.5f} | {m['roundtrip_val_bpb']:.5f} | "
                    + (f"{m['sliding_val_bpb']:.5f}" if "sliding_val_bpb" in m else "—")
                    + f" | {m['val_loss']:.5f} ± {s['val_loss']:.5f} | {m['val_bpb']:.5f} ± {s['val_bpb']:.5f} | | |")
    return rows


def readme(runs: list[Run], sub: dict, files: dict[str, int], shipped_from: str, env: str) -> str:
    config = {k: v for k, v in runs[0].config.items() if k not in MACHINE_SETTINGS}
    base = dataclasses.asdict(Hyperparameters())
    diff = preset_diff(Hyperparameters(**{**base, **{k: v for k, v in config.items() if k in base}}))
    nproc = _world_size(runs[0])
    launch = f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py" if nproc > 1 else "python train_gpt.py"
    many = len(runs) > 1
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"**val_bpb {sub['val_bpb']:.5f}**{f' (mean of {len(runs)} seeds)' if many else ''}, val_loss "
             f"{sub['val_loss']:.5f} nats. Artifact + code: {sub['bytes_total']:,} bytes"
             f"{' (largest seed)' if many else ''}, headroom {SIZE_LIMIT - sub['bytes_total']:,} "
             f"under {SIZE_LIMIT:,}.", "", f"Author: {sub['author']} (@{sub['github_id']}), {sub['date']}.", "",
             "## Results", "", *_results_table(runs, sub), "",
             "val_bpb is the headline score: the sliding-window evaluation when run, else the standard evaluation "
             "of the artifact after its round trip from disk.", "",
             "## Techniques", "", *[f"- {t}" for t in techniques(runs[0].config)], "",
             "## Configuration", "", "Settings of these runs that differ from the challenge baseline:", "",
             "| setting (env var) | value | baseline |", "|---|---|---|",
             *[f"| {k.upper()} | {v} | {base[k]} |" for k, v in diff.items()], "",
             "## Command", "", "From inside this folder, one run per seed (DATA_PATH and TOKENIZER_PATH default to "
             "the challenge layout, `./data/datasets/fineweb10B_sp1024` and `./data/tokenizers/`):", "", "```",
             *[f"SEED={r.seed} {env}{launch}" for r in runs], "```", "",
             "## Hardware and software", ""]
    for prefix in ("python:", "cuda:", "world_size:"):
        lines += [f"- `{line}`" for line in runs[0].log_lines(prefix)[:1]]
    lines += ["", "## Files", "", *[f"- `{name}` ({size:,} bytes)" for name, size in files.items()], "",
              f"`train_gpt.py` is the counted code ({files['train_gpt.py']:,} bytes); {shipped_from}"]
    return "\n".join(lines) + "\n"


def record_command(argv: list[str]) -> int:
    parser = command_parser("pgolf record", __doc__)
    parser.add_argument("runs", nargs="+", help="finished run folders of one configuration (one per seed)")
    parser.add_argument("--out", required=True, help="new folder, e.g. records/track_10min_16mb/<date>_<slug>")
    for flag in ("--author", "--github-id", "--name", "--blurb"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--code", help="the train_gpt.py the runs were made with (default: pack from their config)")
    parser.add_argument("--compress", action=argparse.BooleanOptionalAction, default=True,
                        help="without --code: ship the compressed stub (default; --no-compress: the readable file)")
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        raise RunError(f"{args.out}: output folder already exists; choose a new --out (nothing was written)")
    runs = load_runs(args.runs)
    for run in runs:
        if not (run.path / "train.log").is_file():
            raise RunError(f"{run.path}: no train.log; the records folder must include each run's log")
    check_same_config(runs, "the record's runs")
    code = shipped_code(runs, args.code, args.compress)
    code_bytes = len(code["train_gpt.py"])
    check_sizes(runs, code_bytes)
    author = dict(author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb, date=args.date)
    sub = submission(runs, code_bytes, author)
    logs = log_names(runs)
    shipped_from = (f"copied from `{args.code}`." if args.code else
                    "packed by `pgolf record` from the runs' configuration"
                    + (" (minified, lzma, a latin-1 literal; the readable source is `train_gpt_readable.py`)." if args.compress
                       else "."))
    with new_folder(args.out) as tmp:
        for name, data in code.items():
            (tmp / name).write_bytes(data)
        for run, name in zip(runs, logs):
            shutil.copyfile(run.path / "train.log", tmp / name)
        (tmp / "requirements.txt").write_text(requirements())
        (tmp / "submission.json").write_text(json.dumps(sub, indent=1) + "\n")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        env = command_env(runs[0].config, baked_defaults(code))
        (tmp / "README.md").write_text(readme(runs, sub, files, shipped_from, env))
    print(f"wrote {args.out}: README.md, {', '.join(files)}")
    print(f"val_bpb {sub['val_bpb']:.5f} val_loss {sub['val_loss']:.5f} bytes_total {sub['bytes_total']:,} "
          f"(code {code_bytes:,}) headroom {SIZE_LIMIT - sub['bytes_total']:,}")
    return 0
