"""Test an evaluation against the four conditions of a legal score, and against its byte count.

The conditions are those of openai/parameter-golf issue #1017: (1) strict causality, (2) a full
normalized distribution over the vocabulary, (3) score before update, (4) a single left-to-right pass.
`audit` runs an evaluation with a Recorder as its EvalObserver (pgolf.eval), then checks:

- causality: rerun on copies of the stream where the text after a sampled position t is changed
  (the rest of t's document and all later documents, boundaries kept): the loss at every position
  <= t must not move. A second copy changes every token from t on, its target and the document
  boundaries included: the losses before t and the distribution predicted for t must not move. A
  repeat run on the unchanged stream must agree too (no state carried between runs).
- normalization: at sampled positions the reported log-probabilities cover the whole vocabulary,
  exp() of them sums to 1, and the scored loss is -log p(the stream's token there).
- score before update: every token an update used had already been scored (position 0, never a
  target, is context from the start); weights that change with no update reported fail too.
- single pass: each of the N-1 targets is scored exactly once, and what was reported is what the
  totals hold.
- byte accounting: the bytes in the totals equal the given truth (decoded text or byte sidecar).

An evaluation plugs in as an `Audited`: a function run(tokens, observer) -> EvalResult.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pgolf.eval import EvalObserver, EvalResult
from pgolf.spm import BOS_TOKEN
from pgolf.verify import byte_values, partial_char_tail

SUM_TOL = 1e-4  # |sum_v p(v) - 1| at a sampled position (the bound)
NLL_TOL = 1e-5  # |scored loss + log p(target)| in nats: fp32 cross-entropy vs fp32 log-softmax
TOTALS_RTOL = 1e-9  # reported losses vs the totals' nats, both fp64 sums in different orders


class Recorder:
    """An EvalObserver that keeps, per stream position, how often it was scored, its last loss and its
    bytes; the log-probabilities at sampled positions; and every update that used an unscored token."""

    def __init__(self, tokens: np.ndarray, sample: np.ndarray):
        n = len(tokens)
        self.tokens = tokens
        self.count = np.zeros(n, dtype=np.int64)
        self.nll = np.full(n, np.nan)
        self.sample = np.zeros(n, dtype=bool)
        self.sample[sample] = True
        self.rows: dict[int, np.ndarray] = {}  # position -> log-probabilities over the vocabulary
        self.reported_targets, self.reported_nats, self.reported_bytes, self.out_of_range = 0, 0.0, 0, 0
        self.updates, self.update_tokens, self.violations = 0, 0, 0
        self.first_violation: tuple[int, int] | None = None  # (update number, position)

    def scored(self, positions, nll, nbytes, log_probs) -> None:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        nll = nll.detach().double().cpu().numpy().reshape(-1)
        nbytes = torch.as_tensor(nbytes).detach().cpu().numpy().reshape(-1)
        self.reported_targets += positions.size
        self.reported_nats += float(nll.sum())
        self.reported_bytes += int(nbytes.sum(dtype=np.int64))
        inside = np.flatnonzero((positions >= 1) & (positions < len(self.count)))
        self.out_of_range += positions.size - inside.size
        pos = positions[inside]
        np.add.at(self.count, pos, 1)
        self.nll[pos] = nll[inside]
        hit = inside[self.sample[pos]]
        if hit.size:
            rows = log_probs(hit).detach().double().cpu().numpy()
            self.rows.update(zip(positions[hit].tolist(), rows))

    def updated(self, positions) -> None:
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        self.updates += 1
        self.update_tokens += positions.size
        valid = (positions >= 0) & (positions < len(self.count))
        seen = np.zeros(positions.size, dtype=bool)
        seen[valid] = (positions[valid] == 0) | (self.count[positions[valid]] > 0)  # token 0: context, never a target
        bad = positions[~seen]
        if bad.size and self.first_violation is None:
            self.first_violation = (self.updates, int(bad[0]))
        self.violations += bad.size


@dataclass
class Audited:
    """An evaluation under audit. run(tokens, observer) scores a stream of the same length as `tokens`,
    starting from the same state on every call, and reports to observer (an EvalObserver) every target
    it adds to its totals and, if it adapts, every update. vocab_size is the alphabet its distributions
    must cover. `model`, if given, is checked (and restored) for weight changes no update reported."""
    name: str
    tokens: np.ndarray
    run: Callable[[np.ndarray, EvalObserver], EvalResult]
    vocab_size: int
    model: torch.nn.Module | None = None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name} {self.detail}"


class _Runner:
    """Runs the evaluation with a fresh Recorder, restoring the model's weights if they changed."""

    def __init__(self, ev: Audited):
        self.ev, self.runs = ev, 0
        self.weights = None if ev.model is None else {k: v.detach().clone() for k, v in ev.model.state_dict().items()}

    def __call__(self, tokens: np.ndarray, sample: np.ndarray) -> tuple[Recorder, EvalResult, bool]:
        rec = Recorder(tokens, sample)
        result = self.ev.run(tokens, rec)
        self.runs += 1
        changed = False
        if self.weights is not None:
            now = self.ev.model.state_dict()
            changed = any(not torch.equal(now[k], v) for k, v in self.weights.items())
            if changed:
                self.ev.model.load_state_dict(self.weights)
        return rec, result, changed


def audit(ev: Audited, expected_bytes: tuple[int, str], *, positions: int = 4, samples: int = 256, seed: int = 0,
          atol: float = 0.0) -> tuple[list[Check], EvalResult]:
    """The five checks on `ev` (and the result of its unperturbed run). expected_bytes = (count, source)."""
    rng = np.random.default_rng(seed)
    n = len(ev.tokens)
    causal = causal_positions(n, positions, rng)
    sample = np.union1d(rng.choice(np.arange(1, n), size=min(samples, n - 1), replace=False), causal)
    runner = _Runner(ev)
    base, result, changed = runner(ev.tokens, sample)
    checks = [check_causality(runner, ev, base, causal, rng, atol),
              check_normalization(base, ev.vocab_size),
              check_score_before_update(base, changed),
              check_single_pass(base, result),
              check_bytes(base, result, expected_bytes)]
    return checks, result


def causal_positions(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct positions t in [1, n-2] (each has a token after it), one per equal stretch of the stream."""
    if n < 3 or k < 1:
        return np.zeros(0, dtype=np.int64)
    edges = np.linspace(1, n - 1, min(k, n - 2) + 1).astype(np.int64)
    return np.unique([rng.integers(lo, max(lo + 1, hi)) for lo, hi in zip(edges[:-1], edges[1:])]).astype(np.int64)


def perturb(tokens: np.ndarray, start: int, vocab_size: int, rng: np.random.Generator, keep_bos: bool) -> np.ndarray:
    """A copy with every token from `start` on replaced by another token of the vocabulary; with keep_bos, BOS
    tokens stay where they are and no new ones appear (the text changes, the document boundaries do not)."""
    out = tokens.astype(np.int64)
    idx = np.arange(start, len(out))
    if keep_bos:
        idx = idx[out[idx] != BOS_TOKEN]
    new, redo = out[idx].copy(), np.ones(idx.size, dtype=bool)
    while redo.any():
        new[redo] = rng.integers(0, vocab_size, size=int(redo.sum()))
        redo = (new == out[idx]) | (keep_bos & (new == BOS_TOKEN))
    out[idx] = new
    return out.astype(tokens.dtype)


def max_diff(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Largest |a - b|, where a position scored in one run but not the other counts as infinite."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    d = np.abs(a - b)
    d = d[~np.isnan(d)]
    return float(d.max()) if d.size else 0.0


def check_causality(runner: _Runner, ev: Audited, base: Recorder, causal: np.ndarray, rng, atol: float) -> Check:
    """Per position t: the text after t changed (boundaries kept) must leave the losses at <= t; every token
    from t on changed (its target and the boundaries too) must leave the losses before t and the distribution
    predicted for t. A repeat run on the same tokens must agree."""
    runs0, worst, problems = runner.runs, {"after_t": 0.0, "from_t": 0.0, "repeat": 0.0}, []
    again, _, _ = runner(ev.tokens, causal)
    worst["repeat"] = max([max_diff(again.nll, base.nll)]
                          + [max_diff(again.rows.get(t), base.rows.get(t)) for t in causal.tolist()])
    if worst["repeat"] > atol:
        problems.append(f"a repeat run on the same tokens differs by {worst['repeat']:.3g} "
                        "(state carried between runs)")
    for t in causal.tolist():
        if np.isnan(base.nll[1:t + 1]).any() or t not in base.rows:  # nothing reported: nothing to compare
            problems.append(f"the run reported no loss for some positions <= {t} or no distribution at {t}")
            continue
        rec, _, _ = runner(perturb(ev.tokens, t + 1, ev.vocab_size, rng, keep_bos=True), np.array([t]))
        d = max_diff(rec.nll[1:t + 1], base.nll[1:t + 1])
        worst["after_t"] = max(worst["after_t"], d)
        if d > atol:
            moved = 1 + int(np.argmax(~np.isclose(rec.nll[1:t + 1], base.nll[1:t + 1], rtol=0, atol=atol,
                                                  equal_nan=True)))
            problems.append(f"changing the text after {t} moved the loss at {moved} by "
                            f"{abs(rec.nll[moved] - base.nll[moved]):.3g}")
        rec, _, _ = runner(perturb(ev.tokens, t, ev.vocab_size, rng, keep_bos=False), np.array([t]))
        d = max(max_diff(rec.nll[1:t], base.nll[1:t]), max_diff(rec.rows.get(t), base.rows.get(t)))
        worst["from_t"] = max(worst["from_t"], d)
        if d > atol:
            problems.append(f"changing every token from {t} on (its target and document boundaries included) moved "
                            f"the losses before {t} or the distribution predicted for {t} by {d:.3g}")
    detail = (f"positions:{','.join(map(str, causal.tolist())) or 'none'} runs:{runner.runs - runs0} max_change "
              + " ".join(f"{k}:{v:.3g}" for k, v in worst.items())
              + f" tolerance:{atol:g}" + (" (bit-identical)" if atol == 0 else " nats"))
    if problems:
        detail += "; " + "; ".join(problems[:3])
    return Check("causality", not problems and causal.size > 0, detail)


def check_normalization(rec: Recorder, vocab_size: int) -> Check:
    wanted = np.flatnonzero(rec.sample)
    got = [t for t in wanted.tolist() if t in rec.rows and rec.count[t] > 0]
    sum_err, nll_err, wrong_width = 0.0, 0.0, 0
    for t in got:
        row = rec.rows[t]
        if row.shape != (vocab_size,):
            wrong_width += 1
            continue
        sum_err = max(sum_err, abs(float(np.exp(row).sum()) - 1.0))
        nll_err = max(nll_err, abs(rec.nll[t] + row[int(rec.tokens[t])]))
    ok = wanted.size > 0 and len(got) == wanted.size and not wrong_width and sum_err <= SUM_TOL and nll_err <= NLL_TOL
    detail = (f"positions:{len(got)}/{wanted.size} vocab:{vocab_size} max|sum_p-1|:{sum_err:.3g} (<= {SUM_TOL:g}) "
              f"max|loss+log_p(target)|:{nll_err:.3g} (<= {NLL_TOL:g} nats)")
    if wrong_width:
        detail += f"; {wrong_width} distributions do not span the {vocab_size}-token vocabulary"
    if len(got) < wanted.size:
        detail += f"; {wanted.size - len(got)} sampled positions were not scored with a reported distribution"
    return Check("normalization", ok, detail)


def check_score_before_update(rec: Recorder, weights_changed: bool) -> Check:
    unreported = weights_changed and rec.updates == 0
    weights = "changed with no update reported" if unreported else ("changed" if weights_changed else "unchanged")
    detail = f"updates:{rec.updates} tokens_used:{rec.update_tokens} violations:{rec.violations} weights:{weights}"
    if rec.first_violation:
        detail += f"; update {rec.first_violation[0]} used token {rec.first_violation[1]} before it was scored"
    return Check("score_before_update", rec.violations == 0 and not unreported, detail)


def check_single_pass(rec: Recorder, result: EvalResult) -> Check:
    targets = len(rec.count) - 1
    scored = rec.count[1:]
    once, missing, repeated = int(np.sum(scored == 1)), int(np.sum(scored == 0)), int(np.sum(scored > 1))
    nats = result.val_loss * result.targets
    totals_agree = (result.targets == rec.reported_targets
                    and abs(rec.reported_nats - nats) <= TOTALS_RTOL * max(1.0, abs(nats)))
    ok = once == targets and rec.out_of_range == 0 and totals_agree
    detail = (f"scored_once:{once}/{targets} (N={targets + 1}) missing:{missing} repeated:{repeated} "
              f"out_of_range:{rec.out_of_range} totals_targets:{result.targets} reported:{rec.reported_targets} "
              f"totals_nats:{nats:.6f} reported_nats:{rec.reported_nats:.6f}")
    return Check("single_pass", ok, detail)


def check_bytes(rec: Recorder, result: EvalResult, expected: tuple[int, str]) -> Check:
    count, source = expected
    ok = result.bytes == rec.reported_bytes == count
    return Check("byte_accounting", ok, f"totals_bytes:{result.bytes} reported:{rec.reported_bytes} {source}:{count}")


def text_bytes(sp, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the decoded text of every target: each BOS-delimited document decoded on its own. A final
    document cut inside a multi-byte character counts its trailing byte tokens as the raw bytes they are."""
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == BOS_TOKEN)
    if not starts.size or starts[0] != 0:
        starts = np.concatenate([[0], starts])  # token 0 is never a target, BOS or not
    ends = np.append(starts[1:], len(tokens))
    last = tokens[starts[-1]:]
    cut = partial_char_tail(last, byte_values(sp))
    docs = [tokens[s + 1:e].tolist() for s, e in zip(starts, ends)]
    docs[-1] = docs[-1][:len(docs[-1]) - cut]
    return sum(len(text.encode("utf-8")) for text in sp.decode(docs)) + cut


def expected_bytes(sp, tokens: np.ndarray, sidecar: np.ndarray | None) -> tuple[int, str]:
    """The byte truth of a stream's targets: its byte sidecar when it has one, else its decoded text."""
    if sidecar is not None:
        return int(sidecar[1:len(tokens)].astype(np.int64).sum()), "sidecar_bytes"
    return text_bytes(sp, tokens), "text_bytes"


# ---- pgolf audit ARTIFACT ------------------------------------------------------------------------------

MODES = ("standard", "sliding", "ttt")  # each is the Evaluator method of that name, once it exists
DEFAULT_TOKENS = 8192


def parse_args(argv: list[str]):
    import argparse

    from pgolf.eval_artifact import add_settings_arguments

    p = argparse.ArgumentParser(prog="pgolf audit", description=__doc__.split("\n\n")[0] + " Exit 1 on any FAIL.")
    add_settings_arguments(p)
    p.add_argument("--mode", choices=MODES, default="standard", help="the evaluation to audit (default: standard)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"audit on the first N validation tokens (default {DEFAULT_TOKENS}; 0: all)")
    p.add_argument("--positions", type=int, default=4, help="positions t whose causality is tested (2 reruns each)")
    p.add_argument("--samples", type=int, default=256, help="positions whose full distribution is checked")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled positions and the perturbations")
    p.add_argument("--atol", type=float, default=0.0, help="causality tolerance in nats (default 0: bit-identical)")
    args = p.parse_args(argv)
    args.max_tokens = args.tokens
    if args.positions < 1 or args.samples < 1 or args.atol < 0:
        raise ValueError(f"--positions {args.positions} and --samples {args.samples} must be >= 1 and --atol "
                         f"{args.atol} >= 0")
    return args


def main(argv: list[str]) -> int:
    from pgolf.dist import Dist
    from pgolf.eval import Evaluator, load_sentencepiece
    from pgolf.eval_artifact import ConsoleLog, build_evaluator, load_model_and_settings

    args = parse_args(argv)
    if not hasattr(Evaluator, args.mode):
        print(f"pgolf audit: mode {args.mode} is not available yet: this pgolf has no '{args.mode}' evaluation "
              f"(Evaluator.{args.mode}); audit standard or sliding", file=sys.stderr)
        return 2
    model, cfg, _, _, origin = load_model_and_settings(args)
    if args.mode == "sliding" and cfg.eval_stride <= 0:
        raise ValueError(f"--mode sliding needs a stride > 0 (got {cfg.eval_stride}); pass --stride")
    log = ConsoleLog(True)
    evaluator = build_evaluator(cfg, origin, Dist(), log, autocast_dtype=None)  # one CPU process, fp32
    tokens, sidecar = evaluator.stream(args.mode)
    method = getattr(evaluator, args.mode)
    ev = Audited(args.mode, tokens, lambda toks, obs: method(model, tokens=toks, observer=obs), model.cfg.vocab_size,
                 model)
    truth = expected_bytes(load_sentencepiece(cfg.tokenizer_path), tokens, sidecar)
    log(f"audit:{args.artifact} mode:{args.mode} tokens:{len(tokens)} train_seq_len:{evaluator.seq_len} "
        f"eval_seq_len:{evaluator.eval_seq_len} stride:{evaluator.stride} device:cpu dtype:fp32 seed:{args.seed}")
    t0 = time.perf_counter()
    checks, result = audit(ev, truth, positions=args.positions, samples=args.samples, seed=args.seed, atol=args.atol)
    log(f"audit_eval val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} targets:{result.targets} "
        f"bytes:{result.bytes} eval_time:{1000 * result.seconds:.0f}ms")
    for c in checks:
        log(c.line())
    failed = [c.name for c in checks if not c.ok]
    log(f"audit:{'FAIL' if failed else 'PASS'} checks:{len(checks) - len(failed)}/{len(checks)} "
        + (f"failed:{','.join(failed)} " if failed else "") + f"audit_time:{time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0
