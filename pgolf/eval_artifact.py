"""`pgolf eval ARTIFACT`: score a saved artifact without training (standard + sliding window).

The model is rebuilt from the configuration stored in the artifact. The other settings (data,
tokenizer, sequence lengths, batch sizes) resolve like every pgolf command's: defaults, then the
run's config.json beside the artifact (when there is one), then env vars (DATA_PATH, EVAL_STRIDE, ...),
then the flags; the log says where the data paths came from. The
standard score uses the training sequence length on the truncated stream, exactly like the
round-trip line of `pgolf train`; the sliding score uses --seq-len/--stride on the full stream.
Runs on one process or under torchrun (windows split across ranks).
"""
from __future__ import annotations

import argparse
import json
from functools import partial
import sys
from pathlib import Path

import torch

from pgolf.artifact import ROUNDTRIP_LOG_NAMES, load_artifact
from pgolf.config import FIELD_TYPES, Hyperparameters, fill_run_defaults, resolve_traced
from pgolf.dist import setup_dist, teardown_dist
from pgolf.execution import apply_execution, attach_attention_kernel, plan_execution
from pgolf.eval import CONTEXT_EXTENSIONS, Evaluator, beyond_context, load_sentencepiece, load_validation, log_eval
from pgolf.model import GPT, rebuild_model
from pgolf.ttt import TTTSettings, evaluate_ttt

DEFAULT_STRIDE = 64


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation settings `pgolf eval` and `pgolf audit` share (the run's config.json fills the rest)."""
    p.add_argument("artifact", help="final_model.*.ptz written by pgolf train")
    p.add_argument("--stride", type=int, default=None,
                   help=f"sliding-window stride (default: the run's EVAL_STRIDE, else {DEFAULT_STRIDE}, "
                        "capped at seq_len; 0 skips the sliding eval; --seq-len alone turns it on)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sliding-window length (default: the run's EVAL_SEQ_LEN or TRAIN_SEQ_LEN)")
    p.add_argument("--batch-seqs", type=int, default=None, help="windows per forward per rank (default: EVAL_BATCH_SEQS)")
    p.add_argument("--data", default=None, help="dataset dir with fineweb_val_*.bin (default: DATA_PATH from the env, else the run's)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: TOKENIZER_PATH from the env, else the run's)")
    p.add_argument("--config", default=None, help="run config.json (default: the one beside the artifact, if any)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pgolf eval", description="Score a saved artifact without training: "
                                "standard and sliding-window val_loss / val_bpb.")
    add_settings_arguments(p)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N validation tokens")
    p.add_argument("--ttt", action="store_true", help="also score with test-time training (TTT_* settings, docs/eval.md)")
    return p.parse_args(argv)


# `pgolf eval` flags -> the settings they set (the same settings DATA_PATH=..., EVAL_STRIDE=... set).
FLAG_FIELDS = {"data": "data_path", "tokenizer": "tokenizer_path", "seq_len": "eval_seq_len",
               "batch_seqs": "eval_batch_seqs", "max_tokens": "val_max_tokens", "stride": "eval_stride"}


def run_settings(args: argparse.Namespace, model_config: dict, env: dict | None = None
                 ) -> tuple[Hyperparameters, dict[str, str]]:
    """(settings, where each came from): defaults < the run's config.json < env vars < flags, with the
    model fields fixed by the artifact."""
    config_path = Path(args.config) if args.config else Path(args.artifact).with_name("config.json")
    saved: dict = {}
    if config_path.exists():
        saved = fill_run_defaults({k: v for k, v in json.loads(config_path.read_text()).items() if k in FIELD_TYPES})
        stored = fill_run_defaults({**model_config, "train_seq_len": saved.get("train_seq_len")})
        differ = {k: (saved[k], stored[k]) for k in model_config if k in saved and saved[k] != stored[k]}
        if differ:
            detail = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in sorted(differ.items()))
            raise ValueError(f"{config_path}: describes a different model than {args.artifact} (config vs artifact: "
                             f"{detail}); pass the run's own config with --config")
    elif args.config:
        raise FileNotFoundError(f"--config {config_path}: no such file")
    if "train_seq_len" not in saved and args.seq_len:
        saved["train_seq_len"] = args.seq_len  # no run config: the standard eval uses the given length
    saved.update({k: v for k, v in model_config.items() if k in FIELD_TYPES})
    flags = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag, None) is not None}
    cfg, origin = resolve_traced(env=env, flags=flags, saved=saved)
    clash = sorted(k for k, v in model_config.items() if k in FIELD_TYPES and getattr(cfg, k) != v)
    if clash:
        detail = ", ".join(f"{k.upper()}={getattr(cfg, k)!r} ({origin[k]}) vs {model_config[k]!r}" for k in clash)
        raise ValueError(f"{args.artifact}: the model is fixed by the artifact, but {detail}; unset those settings")
    eval_len = cfg.eval_seq_len or cfg.train_seq_len
    # --seq-len asks for a sliding eval, even of a run that had none (its saved EVAL_STRIDE=0)
    asked = args.seq_len is not None and origin.get("eval_stride") == "saved config"
    if not cfg.eval_stride and ("eval_stride" not in origin or asked):
        cfg.eval_stride = min(DEFAULT_STRIDE, eval_len)
    if cfg.eval_stride < 0 or cfg.eval_stride > eval_len or cfg.eval_batch_seqs < 1:
        raise ValueError(f"stride {cfg.eval_stride} must be in [0, seq_len={eval_len}] and batch seqs "
                         f"{cfg.eval_batch_seqs} >= 1")
    return cfg, origin


def check_tokenizer(cfg: Hyperparameters, vocab_size: int, path: str) -> None:
    pieces = load_sentencepiece(cfg.tokenizer_path).vocab_size()
    if pieces != vocab_size:
        raise ValueError(f"{cfg.tokenizer_path}: tokenizer has {pieces} pieces but the model in {path} has "
                         f"vocab_size {vocab_size}; pass the tokenizer it was trained with (--tokenizer)")


class ConsoleLog:
    """The RunLog interface on stdout, rank 0 only; metrics are not recorded."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.enabled and console:
            print(msg, flush=True)

    def metric(self, event: str, **fields) -> None:
        pass


def log_stats(log: ConsoleLog, name: str, r) -> None:
    log(f"{name}_stats targets:{r.targets} bytes:{r.bytes} tokens_per_s:{r.tokens_per_second:.0f} "
        f"token_forwards:{r.token_forwards} forwards_per_token:{r.forwards_per_token:.3f}")


def read_artifact(path: str) -> tuple[dict, dict, str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such artifact (pgolf train writes runs/<run_id>/final_model.*.ptz)")
    return load_artifact(path)


def load_model_and_settings(args: argparse.Namespace) -> tuple[GPT, Hyperparameters, str, dict, dict]:
    """The dequantized model of args.artifact, the run's settings for scoring it, its format and config,
    and where each setting came from."""
    state, model_config, fmt = read_artifact(args.artifact)
    model = rebuild_model(state, model_config, args.artifact)
    cfg, origin = run_settings(args, model_config)
    check_tokenizer(cfg, model.cfg.vocab_size, args.artifact)
    return model, cfg, fmt, model_config, origin


def build_evaluator(cfg: Hyperparameters, origin: dict, d, log, autocast_dtype, progress: bool = False) -> Evaluator:
    for name in ("data_path", "tokenizer_path"):
        log(f"{name}:{getattr(cfg, name)} from:{origin.get(name, 'default')}")
    tokens, tables, sidecar = load_validation(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, cfg.val_max_tokens, log)
    return Evaluator.for_run(cfg, d, tokens, tables, sidecar, autocast_dtype, progress=progress,
                             ttt_fn=partial(evaluate_ttt, settings=cfg.part(TTTSettings)))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    model, cfg, fmt, model_config, origin = load_model_and_settings(args)
    d = setup_dist()
    try:
        log = ConsoleLog(d.is_main)
        ex = plan_execution(cfg.compile, cfg.autocast, d.device)  # CPU: no training steps to pay a compile
        apply_execution(ex, d.device)
        use_compile, autocast_dtype = ex.compile, ex.autocast
        log(f"eval_artifact:{args.artifact} format:{fmt} bytes:{Path(args.artifact).stat().st_size} "
            f"model:{json.dumps(model_config, sort_keys=True)}")
        evaluator = build_evaluator(cfg, origin, d, log, autocast_dtype, progress=d.is_main and sys.stderr.isatty())
        extended = any(getattr(cfg, name, False) for name in CONTEXT_EXTENSIONS)
        warning = beyond_context(cfg.train_seq_len, evaluator.eval_seq_len if cfg.eval_stride else 0, extended)
        if warning:
            log(warning)
        model = model.to(d.device)
        attach_attention_kernel(model, d.device)
        hidden_fn = torch.compile(model.hidden, dynamic=False) if use_compile else None
        log(f"world_size:{d.world_size} device:{d.device} compile:{use_compile} autocast:{autocast_dtype}")
        log(ex.line())
        name = ROUNDTRIP_LOG_NAMES[fmt]
        std = evaluator.standard(model, hidden_fn)
        log_eval(log, name, std)
        log_stats(log, name, std)
        if cfg.eval_stride > 0:
            sw = evaluator.sliding(model, hidden_fn)
            log_eval(log, "final_sliding_window", sw, f"stride:{cfg.eval_stride} seq_len:{evaluator.eval_seq_len} ")
            log_stats(log, "final_sliding_window", sw)
        if args.ttt:
            from pgolf.ttt_cost import run_with_cap
            run_with_cap(evaluator, model, cfg.part(TTTSettings), log)
        d.barrier()  # no rank tears down its communicator while another still uses it
    finally:
        teardown_dist(d)
    return 0


if __name__ == "__main__":  # e.g. torchrun --nproc_per_node=8 -m pgolf.eval_artifact ARTIFACT
    sys.exit(main(sys.argv[1:]))
