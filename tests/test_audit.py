"""`pgolf audit`: it passes the real evaluations and catches each planted violation of the four conditions.

Each broken evaluator below is a known illegal pattern: update before score, a leaked future (or target)
token, attention without its causal mask, a double-scored window, a dropped window, an unnormalized
mixture, a loss taken from another distribution than the one reported, weights adapted silently, and
byte tables that miss the leading spaces. The legal versions of the same evaluators pass.
"""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pgolf.eval as eval_module
from pgolf.audit import Audited, Recorder, audit, expected_bytes, text_bytes
from pgolf.data import load_tokens, val_pattern
from pgolf.eval import ByteTables, EvalResult, byte_tables, evaluate, load_sentencepiece, window_plan
from pgolf.verify import write_byte_sidecars
from tests.test_eval import tiny_gpt, write_tiny_artifact

VOCAB = 512  # tiny_data's tokenizer
CHECKS = ("causality", "normalization", "score_before_update", "single_pass", "byte_accounting")


@pytest.fixture(scope="module")
def val(tiny_data):
    """The first 400 tokens of the synthetic val split (BOS-delimited documents), its tokenizer and tables."""
    data_dir, _ = tiny_data
    sp = load_sentencepiece(data_dir / "tokenizer.model")
    return sp, load_tokens(val_pattern(str(data_dir)), VOCAB, 400), byte_tables(sp, VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt(vocab=VOCAB, seed=3)


def run_audit(val, run, model=None, positions: int = 3, **kw) -> dict:
    sp, tokens, _ = val
    checks, _ = audit(Audited("test", tokens, run, VOCAB, model), expected_bytes(sp, tokens, None),
                      positions=positions, samples=64, **kw)
    return {c.name: c for c in checks}


def failed(checks: dict) -> set[str]:
    return {name for name, c in checks.items() if not c.ok}


def sliding(model, tables, seq_len=32, stride=8):
    return lambda toks, obs: evaluate(model, toks, tables, seq_len=seq_len, stride=stride, batch_seqs=5, observer=obs)


# ---- the real evaluations pass, and observing them changes nothing ------------------------------------

@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 8), (24, 5)])
def test_audit_passes_the_real_evaluation(val, model, seq_len, stride):
    checks = run_audit(val, sliding(model, val[2], seq_len, stride), model)
    assert failed(checks) == set(), [c.line() for c in checks.values()]
    assert "runs:7 " in checks["causality"].detail  # 1 repeat + 2 perturbed runs for each of 3 positions
    assert "max_change after_t:0 from_t:0 repeat:0 tolerance:0 (bit-identical)" in checks["causality"].detail
    assert "scored_once:399/399 " in checks["single_pass"].detail and "repeated:0 " in checks["single_pass"].detail
    assert "updates:0 tokens_used:0 violations:0 weights:unchanged" == checks["score_before_update"].detail
    _, tokens, tables = val
    t = torch.from_numpy(tokens.astype(np.int64))
    total = int(tables.count(t[:-1], t[1:]).sum())
    assert checks["byte_accounting"].detail == f"totals_bytes:{total} reported:{total} text_bytes:{total}"


def test_observer_changes_no_number(val, model):
    _, tokens, tables = val
    for seq_len, stride in ((32, 32), (32, 8)):
        plain = evaluate(model, tokens, tables, seq_len=seq_len, stride=stride, batch_seqs=5)
        seen = evaluate(model, tokens, tables, seq_len=seq_len, stride=stride, batch_seqs=5,
                        observer=Recorder(tokens, np.arange(1, 20)))
        assert (seen.val_loss, seen.val_bpb, seen.targets, seen.bytes, seen.token_forwards) == \
            (plain.val_loss, plain.val_bpb, plain.targets, plain.bytes, plain.token_forwards)


def test_an_evaluation_that_reports_nothing_passes_nothing(val, model):
    """Without reports there is nothing to compare: no check may pass vacuously (updates: none to count)."""
    _, _, tables = val
    checks = run_audit(val, lambda toks, obs: evaluate(model, toks, tables, seq_len=32, stride=8, batch_seqs=5), model)
    assert failed(checks) == {"causality", "normalization", "single_pass", "byte_accounting"}
    assert "reported no loss" in checks["causality"].detail and "positions:0/67 " in checks["normalization"].detail


# ---- condition 1: causality ---------------------------------------------------------------------------

class PeekingGPT(torch.nn.Module):
    """A model whose hidden state at input i also sees the input `ahead` positions later (1: its own target)."""

    def __init__(self, base, ahead: int):
        super().__init__()
        self.base, self.ahead = base, ahead

    def hidden(self, x):
        peek = torch.roll(x, -self.ahead, dims=1)
        return self.base.hidden(x) + self.base.tok_emb(peek)

    def logits(self, h):
        return self.base.logits(h)


def test_a_leaked_future_token_fails_causality(val, model):
    checks = run_audit(val, sliding(PeekingGPT(model, 2), val[2]))
    assert failed(checks) == {"causality"}
    assert "changing the text after" in checks["causality"].detail


def test_a_leaked_target_fails_causality(val, model):
    """Seeing x_t to predict x_t leaves losses before t alone; the distribution at t moves with x_t."""
    checks = run_audit(val, sliding(PeekingGPT(model, 1), val[2]))
    assert failed(checks) == {"causality"}
    assert "max_change after_t:0 " in checks["causality"].detail
    assert "the distribution predicted for" in checks["causality"].detail


def test_attention_without_its_causal_mask_fails_causality(val, model, monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **{**kw, "is_causal": False}))
    checks = run_audit(val, sliding(model, val[2]))
    assert failed(checks) == {"causality"}


def doc_chunk_eval(model, tables, window_from_doc_end: bool, seq_len: int = 48, chunk: int = 32):
    """Per-document chunks: `chunk` targets on a grid from each BOS (a document's last target is the next BOS),
    each chunk read with up to seq_len tokens of its own document. window_from_doc_end places the last, short
    chunk's window back from the document's end, as the record's TTT does (`_compute_chunk_window`): where the
    document ends then decides how much context its last targets get. Otherwise the window is placed back from
    the chunk's grid end, which does not depend on anything after the chunk's first target."""

    @torch.no_grad()
    def run(tokens, observer) -> EvalResult:
        t = torch.from_numpy(tokens.astype(np.int64))
        bos = np.flatnonzero(tokens == 1)
        nats, nbytes = 0.0, 0
        for s, e in zip(bos, np.append(bos[1:], len(tokens) - 1)):
            for a in range(s, e, chunk):
                b = min(a + chunk, e)  # targets a+1..b
                start = max(s, (b if window_from_doc_end else a + chunk) - seq_len)
                logp = F.log_softmax(model.logits(model.hidden(t[start:b][None]))[0, a - start:], dim=-1)
                positions = np.arange(a + 1, b + 1)
                nll = -logp.gather(1, t[positions][:, None])[:, 0]
                nb = tables.count(t[positions - 1], t[positions])
                observer.scored(positions, nll, nb, lambda rows, lp=logp: lp[torch.as_tensor(rows)])
                nats, nbytes = nats + float(nll.double().sum()), nbytes + int(nb.sum())
        return EvalResult(nats / (len(tokens) - 1), 0.0, len(tokens) - 1, nbytes, 0, 0.0)

    return run


def test_context_that_depends_on_where_the_document_ends_fails_causality(val, model):
    """The trap for a per-document evaluation: the text after t may be innocent while the boundary is not."""
    assert (val[1] == 1).sum() == 2  # the prefix holds a whole document and the start of another
    legal = run_audit(val, doc_chunk_eval(model, val[2], window_from_doc_end=False), model, positions=12)
    assert failed(legal) == set(), [c.line() for c in legal.values()]
    leaky = run_audit(val, doc_chunk_eval(model, val[2], window_from_doc_end=True), model, positions=12)
    assert failed(leaky) == {"causality"}
    assert "max_change after_t:0 from_t:" in leaky["causality"].detail  # only moving the boundary shows it


# ---- condition 4: a single pass -----------------------------------------------------------------------

def test_a_double_scored_window_fails_single_pass(val, model, monkeypatch):
    def plan_twice(num_tokens, seq_len, stride):
        starts, ends, n = window_plan(num_tokens, seq_len, stride)
        return np.append(starts, starts[3]), np.append(ends, ends[3]), np.append(n, n[3])

    monkeypatch.setattr(eval_module, "window_plan", plan_twice)
    checks = run_audit(val, sliding(model, val[2]))
    assert failed(checks) == {"single_pass", "byte_accounting"}  # 8 targets counted twice: 8 targets' bytes too
    assert "scored_once:391/399 (N=400) missing:0 repeated:8 " in checks["single_pass"].detail


def test_a_dropped_window_fails_single_pass(val, model, monkeypatch):
    def plan_short(num_tokens, seq_len, stride):
        return tuple(a[:-1] for a in window_plan(num_tokens, seq_len, stride))

    monkeypatch.setattr(eval_module, "window_plan", plan_short)
    checks = run_audit(val, sliding(model, val[2]))
    assert {"single_pass", "byte_accounting"} <= failed(checks)
    assert " missing:7 repeated:0 " in checks["single_pass"].detail  # 399 - 32 = 367 = 46 * 8 - 1: 7 left


def test_totals_other_than_the_reports_fail_single_pass(val, model):
    """An evaluation whose totals hold more than it reported (here 1% more nats) is not what was audited."""
    real = sliding(model, val[2])

    def inflated(tokens, observer):
        r = real(tokens, observer)
        return dataclasses.replace(r, val_loss=r.val_loss * 1.01)

    checks = run_audit(val, inflated, model)
    assert failed(checks) == {"single_pass"}
    assert "scored_once:399/399 " in checks["single_pass"].detail


# ---- conditions 2 and 3: a toy adaptive evaluation, legal and broken ------------------------------------

def cache_eval(model, tables, variant: str = "legal", seq_len: int = 32, chunk: int = 8, bonus: float = 0.5):
    """A toy score-first adaptive evaluation: chunks of `chunk` targets with up to `seq_len` tokens of context;
    a unigram cache of the tokens already used adds bonus * log1p(count) to the logits. Variants plant bugs:
    update_first (adapt on a chunk, then score it), unnormalized (add the cache as probability mass, without
    renormalizing), other_loss (score with temperature 0.8, report the T=1 distribution), silent (also nudge
    the model's weights and report no update), persistent (keep the cache from one call to the next)."""
    kept = torch.zeros(VOCAB)

    @torch.no_grad()
    def run(tokens, observer) -> EvalResult:
        counts = kept if variant == "persistent" else torch.zeros(VOCAB)
        t = torch.from_numpy(tokens.astype(np.int64))
        nats, nbytes = 0.0, 0
        for s, e, k in zip(*window_plan(len(tokens), seq_len, chunk)):
            positions = np.arange(e - k + 1, e + 1)

            def update():
                counts.index_add_(0, t[positions], torch.ones(k))
                if variant == "silent":
                    model.tok_emb.weight[t[positions]] += 0.01
                else:
                    observer.updated(np.arange(s, e + 1))  # the window's inputs and its scored targets

            if variant == "update_first":
                update()
            logits = model.logits(model.hidden(t[s:e][None]))[0, -k:] + bonus * torch.log1p(counts)
            logp = F.log_softmax(logits, dim=-1)
            if variant == "unnormalized":
                logp = torch.log(logp.exp() + 0.1 * (counts > 0))
            y = t[positions]
            nll = -logp.gather(1, y[:, None])[:, 0]
            if variant == "other_loss":
                nll = F.cross_entropy(logits / 0.8, y, reduction="none")
            b = tables.count(t[positions - 1], y)
            observer.scored(positions, nll, b, lambda rows, lp=logp: lp[torch.as_tensor(rows)])
            nats, nbytes = nats + float(nll.double().sum()), nbytes + int(b.sum())
            if variant != "update_first":
                update()
        targets = len(tokens) - 1
        return EvalResult(nats / targets, nats / (np.log(2) * nbytes), targets, nbytes, 0, 0.0)

    return run


def test_a_legal_adaptive_evaluation_passes(val, model):
    checks = run_audit(val, cache_eval(model, val[2]), model)
    assert failed(checks) == set(), [c.line() for c in checks.values()]
    # 399 targets: a first chunk of 32, then 46 of <= 8; each update reads its window's 32 inputs + last target
    assert checks["score_before_update"].detail == "updates:47 tokens_used:1551 violations:0 weights:unchanged"


def test_update_before_score_is_caught(val, model):
    checks = run_audit(val, cache_eval(model, val[2], "update_first"), model)
    assert "score_before_update" in failed(checks) and "causality" in failed(checks)
    assert "violations:399 " in checks["score_before_update"].detail  # every chunk's 8 targets, every time
    assert "update 1 used token 1 before it was scored" in checks["score_before_update"].detail


def test_silent_adaptation_is_caught_and_undone(val, model):
    before = model.tok_emb.weight.clone()
    checks = run_audit(val, cache_eval(model, val[2], "silent"), model)
    assert failed(checks) == {"score_before_update"}
    assert checks["score_before_update"].detail == ("updates:0 tokens_used:0 violations:0 "
                                                    "weights:changed with no update reported")
    assert torch.equal(model.tok_emb.weight, before)  # the audit restored the weights after each run


def test_state_carried_between_runs_fails_causality(val, model):
    checks = run_audit(val, cache_eval(model, val[2], "persistent"), model)
    assert failed(checks) == {"causality"}
    assert "a repeat run on the same tokens differs by" in checks["causality"].detail


def test_an_unnormalized_distribution_is_caught(val, model):
    checks = run_audit(val, cache_eval(model, val[2], "unnormalized"), model)
    assert failed(checks) == {"normalization"}
    err = float(checks["normalization"].detail.split("max|sum_p-1|:")[1].split()[0])
    assert err > 0.05


def test_a_loss_from_another_distribution_is_caught(val, model):
    checks = run_audit(val, cache_eval(model, val[2], "other_loss"), model)
    assert failed(checks) == {"normalization"}
    assert "max|sum_p-1|:" in checks["normalization"].detail
    err = float(checks["normalization"].detail.split("max|loss+log_p(target)|:")[1].split()[0])
    assert err > 1e-3


# ---- byte accounting ----------------------------------------------------------------------------------

def test_byte_tables_without_leading_spaces_are_caught(val, model):
    _, _, tables = val
    no_spaces = ByteTables(tables.base_bytes, torch.zeros_like(tables.has_leading_space), tables.is_boundary)
    checks = run_audit(val, sliding(model, no_spaces), model)
    assert failed(checks) == {"byte_accounting"}


def test_text_bytes_of_a_stream_cut_inside_a_character(val):
    sp, _, tables = val
    ids = [1] + sp.encode("ab cd \u00e9t\u00e9 x") + [1] + sp.encode("\u00e9\u00e9")
    tokens = np.array(ids[:-1], dtype=np.uint16)  # ends after the first byte of the last é
    t = torch.from_numpy(tokens.astype(np.int64))
    expected = len("ab cd \u00e9t\u00e9 x\u00e9".encode()) + 1  # the cut character's first byte counts 1
    assert text_bytes(sp, tokens) == int(tables.count(t[:-1], t[1:]).sum()) == expected


# ---- pgolf audit ARTIFACT -----------------------------------------------------------------------------

def audit_argv(art, data_dir, *extra):
    return ["audit", str(art), "--data", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.model"),
            "--seq-len", "32", "--tokens", "600", "--positions", "2", "--samples", "32", *extra]


@pytest.mark.parametrize("mode", ["standard", "sliding"])
def test_pgolf_audit_passes_an_artifact(tiny_data, tmp_path, capsys, mode):
    from pgolf.cli import main

    data_dir, _ = tiny_data
    art = write_tiny_artifact(tmp_path / "final_model.int8.ptz")
    assert main(audit_argv(art, data_dir, "--mode", mode, "--stride", "8")) == 0
    out = capsys.readouterr().out
    for name in CHECKS:
        assert f"\nPASS {name} " in out
    tokens = 577 if mode == "standard" else 600  # standard keeps 18 blocks of 32 (+1)
    assert f"mode:{mode} tokens:{tokens} " in out and "audit:PASS checks:5/5 " in out


def test_pgolf_audit_uses_the_sidecar(tiny_data, tmp_path, capsys):
    from pgolf.cli import main

    data_dir, _ = tiny_data
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    sp = load_sentencepiece(copy / "tokenizer.model")
    write_byte_sidecars(copy, byte_tables(sp, VOCAB))
    art = write_tiny_artifact(tmp_path / "final_model.int8.ptz")
    assert main(audit_argv(art, copy, "--mode", "sliding", "--stride", "8")) == 0
    assert " sidecar_bytes:" in capsys.readouterr().out


def test_pgolf_audit_passes_ttt(tiny_data, tmp_path, capsys, monkeypatch):
    from pgolf.cli import main

    data_dir, _ = tiny_data
    art = write_tiny_artifact(tmp_path / "final_model.int8.ptz")
    small = dict(TTT_LORA_RANK=4, TTT_CHUNK_SIZE=16, TTT_EVAL_SEQ_LEN=32, TTT_BATCH_SIZE=2, TTT_LORA_LR=0.01,
                 PHASED_TTT_PREFIX_DOCS=1, PHASED_TTT_NUM_PHASES=1, GLOBAL_TTT_CHUNK_TOKENS=64)
    for k, v in small.items():
        monkeypatch.setenv(k, str(v))
    assert main(audit_argv(art, data_dir, "--mode", "ttt")) == 0
    out = capsys.readouterr().out
    assert "mode:ttt tokens:600 " in out and "audit:PASS checks:5/5 " in out
    assert " violations:0 weights:unchanged" in out and "PASS causality " in out and "(bit-identical)" in out
