"""Test-time training: score-first, fresh adapters per document, ranks, the audit, and the cap check."""
from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import pgolf.ttt as ttt
from pgolf.audit import Audited, Recorder, audit, expected_bytes
from pgolf.data import load_tokens, val_pattern
from pgolf.dist import Dist
from pgolf.eval import byte_tables, load_sentencepiece
from pgolf.model import GPTConfig
from pgolf.ttt import TTTSettings, evaluate_ttt, find_documents
from pgolf.ttt_cost import check_cap, ttt_flops
from tests.conftest import gloo_rank
from tests.test_eval import random_tables
from tests.test_frontier import ALL_ON, TINY, randomized

V = TINY["vocab_size"]
# A forward runs one row per document in flight, so a document's scores can move in the last bits with how
# many others are in flight. Adam's first steps are about lr * sign(gradient) and turn that into lr-sized
# moves of near-zero entries, so the comparisons run SGD, where rounding stays rounding. What they guard
# against moves scores by far more (a window placed back from the document's end, reused adapters).
TOL = 1e-5
# C=8 targets per chunk, windows of up to 24, 2 documents per batch, phases after documents 2 and 4
SETTINGS = TTTSettings(ttt_lora_rank=4, ttt_chunk_size=8, ttt_eval_seq_len=24, ttt_batch_size=2, ttt_lora_lr=0.02,
                       phased_ttt_prefix_docs=4, phased_ttt_num_phases=2, global_ttt_lr=0.02,
                       global_ttt_chunk_tokens=64, global_ttt_batch_seqs=2, eval_max_seconds=0)
SGD = dataclasses.replace(SETTINGS, ttt_optimizer="sgd", ttt_beta1=0.9, ttt_lora_lr=0.002)


def frontier_model():
    """Every frontier part on (loop, lanes, XSA, gates, SmearGate, document mask): the adapters go through all."""
    model = randomized(GPTConfig(**TINY, **ALL_ON), seed=1)
    model.set_looping(True)
    return model.eval()


def stream(doc_lengths, seed=0) -> np.ndarray:
    """Documents of random tokens, each opened by BOS (1); no other token is BOS."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate([[1], rng.integers(2, V, n - 1)]) for n in doc_lengths]).astype(np.uint16)


class Losses:
    """An observer keeping the loss scored at each position."""

    def __init__(self, n):
        self.nll = np.full(n, np.nan)

    def scored(self, positions, nll, nbytes, log_probs):
        assert np.isnan(self.nll[positions]).all()
        self.nll[positions] = nll.double().numpy()

    def updated(self, positions):
        pass


def losses(model, tokens, settings=SGD, tables=None):
    seen = Losses(len(tokens))
    r = evaluate_ttt(model, tokens, tables or random_tables(V), settings=settings, d=Dist(), observer=seen)
    return seen.nll, r


def test_documents_own_every_target_once():
    toks = stream([5, 1, 9, 3])  # a one-token document: its BOS is its only target
    docs = find_documents(toks, 1)
    assert docs.tolist() == [[0, 4, -1], [5, 0, 0], [6, 8, 5], [15, 2, 6]]
    assert int(docs[:, 1].sum() + (docs[:, 2] >= 0).sum()) == len(toks) - 1
    assert ttt.segments(4, SETTINGS.boundaries()) == [(0, 2, True), (2, 4, False)]  # no update after the last


def test_a_chunk_scores_the_same_whether_or_not_later_chunks_exist():
    """Cut the stream right after t: every loss up to t is the same (later chunks, later documents and the
    position of the next BOS never reach back), while adaptation really changes the scores."""
    model = frontier_model()
    toks = stream([40, 29, 51, 33, 60, 45])  # phases after documents 2 (t=69) and 4 (t=153)
    full, r = losses(model, toks)
    assert r.targets == len(toks) - 1 and not np.isnan(full[1:]).any()
    for t in (20, 44, 69, 75, 160, 199, 230):
        cut, _ = losses(model, toks[:t + 1])
        assert np.abs(cut[1:t + 1] - full[1:t + 1]).max() <= TOL, t
    frozen, _ = losses(model, toks, dataclasses.replace(SGD, ttt_lora_lr=0.0, global_ttt_lr=0.0))
    first_chunk = slice(1, 9)  # scored before any update: identical with or without learning
    assert np.array_equal(frozen[first_chunk], full[first_chunk])
    assert np.abs(frozen[100:] - full[100:]).max() > 1e-3


def test_each_document_starts_from_fresh_adapters():
    """A document's losses (all but its BOS, which the previous document predicts) are the same whatever
    documents were batched before it or beside it."""
    model = frontier_model()
    for batch in (1, 2, 3):
        s = dataclasses.replace(SGD, ttt_batch_size=batch, phased_ttt_prefix_docs=0)
        a, _ = losses(model, stream([30, 41, 26], seed=1), s)
        b, _ = losses(model, np.concatenate([stream([19], seed=5), stream([30, 41, 26], seed=1)[30:]]), s)
        assert np.abs(a[31:] - b[20:]).max() <= TOL, batch  # documents 2 and 3, past the second BOS


def rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with gloo_rank(rank, world_size, init_file):
        local = {}

        class Recording(Dist):
            def all_reduce(self, t, op="sum"):
                if t.dtype == torch.float64 and t.numel() == 4:
                    local["sums"] = t.clone()  # the totals, before they are summed
                return super().all_reduce(t, op)

        r = evaluate_ttt(frontier_model(), RANK_TOKENS, random_tables(V), settings=RANK_SETTINGS,
                         d=Recording(rank=rank, world_size=world_size))
        torch.save({"result": dataclasses.asdict(r), "local": local["sums"]}, f"{out_dir}/rank{rank}.pt")


RANK_TOKENS = stream([40, 29, 51, 33, 60, 45, 22, 38], seed=2)
RANK_SETTINGS = SGD


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    mp.spawn(rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = evaluate_ttt(frontier_model(), RANK_TOKENS, random_tables(V), settings=RANK_SETTINGS, d=Dist())
    frozen = evaluate_ttt(frontier_model(), RANK_TOKENS, random_tables(V), d=Dist(),
                          settings=dataclasses.replace(RANK_SETTINGS, ttt_lora_lr=0.0, global_ttt_lr=0.0))
    assert abs(frozen.val_loss - single.val_loss) > 1e-3  # adaptation moves the score by far more than the bound
    for r in ranks:
        got = r["result"]
        assert (got["targets"], got["bytes"]) == (single.targets, single.bytes)  # forwards differ: idle rows
        # the same documents, in other rows of other batches, and the phases' gradients summed in another
        # order: rounding, no more
        assert got["val_loss"] == pytest.approx(single.val_loss, rel=1e-6)
    local_targets = [int(r["local"][1]) for r in ranks]
    assert min(local_targets) > 0 and sum(local_targets) == len(RANK_TOKENS) - 1  # the work really was split


# ---- the audit ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def val(tiny_data):
    data_dir, _ = tiny_data
    sp = load_sentencepiece(data_dir / "tokenizer.model")
    tokens = load_tokens(val_pattern(str(data_dir)), 512, 700)
    return sp, tokens, byte_tables(sp, 512)


# phases after documents 1 and 2; 16-target chunks and 3 rows keep the audit's 7 runs short
AUDIT_SETTINGS = dataclasses.replace(SGD, phased_ttt_prefix_docs=2, ttt_chunk_size=16, ttt_batch_size=3)


def audit_ttt(val, settings=AUDIT_SETTINGS, positions=3) -> dict:
    sp, tokens, tables = val
    model = randomized(GPTConfig(**{**TINY, "vocab_size": 512}, **ALL_ON), seed=2).eval()
    model.set_looping(True)
    ev = Audited("ttt", tokens, lambda toks, obs: evaluate_ttt(model, toks, tables, settings=settings, d=Dist(),
                                                               observer=obs), 512, model)
    checks, _ = audit(ev, expected_bytes(sp, tokens, None), positions=positions, samples=48, atol=TOL)
    return {c.name: c for c in checks}


def test_audit_passes_ttt(val):
    assert (val[1] == 1).sum() == 3  # documents enough for both phases
    checks = audit_ttt(val)
    assert all(c.ok for c in checks.values()), [c.line() for c in checks.values()]
    assert f"repeat:0 tolerance:{TOL:g} nats" in checks["causality"].detail  # a rerun is bit-identical
    detail = checks["score_before_update"].detail
    assert detail.startswith("updates:") and " violations:0 weights:unchanged" in detail
    assert int(detail.split()[0].split(":")[1]) > 20  # chunk steps and the two phases


def test_audit_catches_a_document_that_reads_its_bos_before_it_is_scored(val, monkeypatch):
    """The record's split gives a document's BOS to the previous document as its last target; a batch that
    adapts a document before the previous one reaches its end then trains on an unscored token."""
    def previous_owns_bos(tokens, bos_id):
        docs = find_documents(tokens, bos_id)
        docs[:-1, 1] += 1
        docs[:, 2] = -1
        return docs

    monkeypatch.setattr(ttt, "find_documents", previous_owns_bos)
    checks = audit_ttt(val, dataclasses.replace(AUDIT_SETTINGS, phased_ttt_prefix_docs=0), positions=1)
    assert not checks["score_before_update"].ok
    assert " violations:0 " not in checks["score_before_update"].detail


# ---- cost and the cap ---------------------------------------------------------------------------------

def test_flops_count_each_pass_and_each_phase_row():
    cfg = GPTConfig(**TINY)
    docs = find_documents(stream([17, 9, 30]), 1)  # 16, 8 and 29 targets: chunks of 8 -> 2, 1 and 4
    s = dataclasses.replace(SETTINGS, phased_ttt_prefix_docs=0)
    from pgolf.ttt_cost import window_flops
    chunk, phase = ttt_flops(cfg, s, docs)
    # a row per document in flight, as wide as the widest window: [doc0 c0, doc1 c0] 8 wide, trains; [doc0 c1,
    # doc2 c0] 16, trains (doc2); doc2 c1 16 and c2 24 train; doc2 c3 24 does not. One BOS pass of the B=2
    # rows, 17 wide (doc1 reads doc0).
    f = partial(window_flops, cfg)
    expected = 2 * f(17, 1) + 3 * 2 * f(8, 8) + 3 * 2 * f(16, 8) + 3 * f(16, 8) + 3 * f(24, 8) + f(24, 8)
    assert (chunk, phase) == (pytest.approx(expected), 0.0)
    _, phase = ttt_flops(cfg, dataclasses.replace(s, phased_ttt_prefix_docs=2, phased_ttt_num_phases=1,
                                                  global_ttt_chunk_tokens=8), docs)
    # the phase after document 2 trains on tokens 0..24 (24 targets): chunks of 8, the last skipped, rows of 24
    assert phase == 0.0  # every chunk is shorter than one 24-token row
    _, phase = ttt_flops(cfg, dataclasses.replace(s, phased_ttt_prefix_docs=2, phased_ttt_num_phases=1,
                                                  global_ttt_chunk_tokens=24, ttt_eval_seq_len=8,
                                                  ttt_chunk_size=8), docs)
    assert phase == pytest.approx(3 * 3 * window_flops(cfg, 8, 8))  # one 24-token chunk of 3 rows; the last skipped


def test_a_run_past_the_cap_is_refused_before_it_starts():
    lines = []
    s = dataclasses.replace(SETTINGS, eval_max_seconds=1e-6)
    with pytest.raises(ValueError, match=r"TTT is estimated at \d+s, past EVAL_MAX_SECONDS=1e-06"):
        check_cap(frontier_model(), s, stream([40, 29]), Dist(), None, lines.append)
    assert lines and lines[0].startswith("ttt_estimate: ")


def test_pgolf_eval_ttt_logs_the_challenge_lines(tiny_data, tmp_path, capsys, monkeypatch):
    from pgolf.cli import main
    from tests.test_eval import parse_exact, write_tiny_artifact

    data_dir, _ = tiny_data
    art = write_tiny_artifact(tmp_path / "final_model.int8.ptz")
    for k, v in dict(TTT_LORA_RANK=4, TTT_CHUNK_SIZE=16, TTT_EVAL_SEQ_LEN=32, TTT_BATCH_SIZE=2,
                     PHASED_TTT_PREFIX_DOCS=2, PHASED_TTT_NUM_PHASES=2, GLOBAL_TTT_CHUNK_TOKENS=64).items():
        monkeypatch.setenv(k, str(v))
    argv = ["eval", str(art), "--data", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.model"),
            "--seq-len", "32", "--stride", "32", "--max-tokens", "700", "--ttt"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sliding = parse_exact(out, "final_sliding_window")
    loss, bpb = parse_exact(out, "final_ttt")
    assert 0 < bpb and abs(bpb - sliding[1]) < 0.5  # a different evaluation of the same model, same bytes scale
    lines = out.splitlines()
    assert any(ln.startswith("ttt_estimate: ") and " cap:600s" in ln for ln in lines)
    assert any(ln.startswith("ttt_phase:2/2 docs:2 ") for ln in lines)
    assert any(ln.startswith("final_ttt val_loss:") and "lora_rank:4 chunk:16 ctx:32 " in ln for ln in lines)
    assert any(ln.startswith("ttt_time:") and " targets:699 " in ln for ln in lines)


def test_training_with_ttt_enabled_scores_it_after_the_round_trip(tiny_data, tmp_path):
    import json

    from tests.conftest import PYTHON, run_cmd, tiny_env

    data_dir, _ = tiny_data
    env = tiny_env(data_dir, tmp_path, RUN_ID="ttt", ITERATIONS=2, VAL_MAX_TOKENS=1025, TTT_ENABLED=1,
                   TTT_LORA_RANK=4, TTT_CHUNK_SIZE=16, TTT_EVAL_SEQ_LEN=64, TTT_BATCH_SIZE=4,
                   PHASED_TTT_PREFIX_DOCS=1, GLOBAL_TTT_CHUNK_TOKENS=128)
    run_cmd([PYTHON, "-m", "pgolf.train"], env)
    log = (tmp_path / "ttt" / "train.log").read_text()
    assert "\nfinal_ttt_exact val_loss:" in log and "\nttt_time:" in log and "\nttt_estimate: " in log
    final = [json.loads(ln) for ln in (tmp_path / "ttt" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["event"] == "final" and final["val_bpb"] == final["ttt_val_bpb"] != final["roundtrip_val_bpb"]
