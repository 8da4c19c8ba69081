"""Sliding-window evaluation: window plan, exactness against brute force, counts, bytes, ranks, `pgolf eval`."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pgolf.artifact import MAGIC, load_artifact, serialize
from pgolf.fileio import write_atomic
from pgolf.dist import Dist
from pgolf.eval import (ByteTables, Evaluator, beyond_context, byte_tables, evaluate, load_sentencepiece,
                        load_validation, window_plan)
from pgolf.model import GPT, GPTConfig
from tests.conftest import gloo_rank

VOCAB = 64


def tiny_gpt(vocab: int = VOCAB, seed: int = 0, layers: int = 2, dim: int = 32) -> GPT:
    """A tiny GPT whose zero-initialised projections get random weights, so outputs depend on context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, num_layers=layers, model_dim=dim, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.6 / math.sqrt(p.size(1)))
        model.tok_emb.weight.normal_(0.0, 1.0)
    return model.eval()


def random_stream(n: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


def random_tables(vocab: int = VOCAB, seed: int = 0) -> ByteTables:
    g = torch.Generator().manual_seed(seed)
    return ByteTables(torch.randint(0, 5, (vocab,), generator=g, dtype=torch.int32),
                      torch.rand(vocab, generator=g) < 0.5, torch.rand(vocab, generator=g) < 0.2)


def stream_bytes(tokens: np.ndarray, tables: ByteTables) -> int:
    t = torch.from_numpy(tokens.astype(np.int64))
    return int(tables.count(t[:-1], t[1:]).sum())


# ---- window plan -------------------------------------------------------------------------------

def test_window_plan_hand_examples():
    starts, ends, n = window_plan(11, seq_len=4, stride=2)  # 10 targets, on the stride grid
    assert starts.tolist() == [0, 2, 4, 6] and ends.tolist() == [4, 6, 8, 10] and n.tolist() == [4, 2, 2, 2]
    starts, ends, n = window_plan(10, seq_len=4, stride=3)  # 9 targets: final window scores only 2
    assert starts.tolist() == [0, 3, 5] and ends.tolist() == [4, 7, 9] and n.tolist() == [4, 3, 2]
    starts, ends, n = window_plan(6, seq_len=8, stride=4)  # shorter than one window
    assert starts.tolist() == [0] and ends.tolist() == [5] and n.tolist() == [5]
    with pytest.raises(ValueError, match="stride"):
        window_plan(10, seq_len=4, stride=5)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        window_plan(1, seq_len=4, stride=2)


def test_window_plan_tiles_every_target_once_with_enough_context():
    for num_tokens in range(2, 42):
        for seq_len in range(1, 13):
            for stride in range(1, seq_len + 1):
                starts, ends, n = window_plan(num_tokens, seq_len, stride)
                targets = num_tokens - 1
                scored = np.concatenate([np.arange(e - k + 1, e + 1) for e, k in zip(ends, n)])
                assert scored.tolist() == list(range(1, targets + 1))  # each target once, in order
                width = min(seq_len, targets)
                assert (ends - starts == width).all() and (starts >= 0).all() and ends[-1] == targets
                assert (n[1:] <= stride).all() and (n >= 1).all()
                expected_windows = 1 + math.ceil((targets - width) / stride)
                assert len(ends) == expected_windows
                for s, e, k in zip(starts, ends, n):
                    for j in range(e - k + 1, e + 1):
                        context = j - s  # input tokens the prediction of target j sees
                        assert context == j if j <= width else context >= seq_len - stride + 1


# ---- exactness -----------------------------------------------------------------------------------

def scoring_end(i: int, targets: int, seq_len: int, stride: int) -> int:
    """From the definition: the first window ends at min(L, N-1), each later one `stride` further,
    clipped to the stream's end; target i belongs to the first window ending at or after it."""
    first = min(seq_len, targets)
    if i <= first:
        return first
    return min(targets, first + math.ceil((i - first) / stride) * stride)


@torch.no_grad()
def brute_force(model: GPT, tokens: np.ndarray, tables: ByteTables, seq_len: int, stride: int):
    """Score every target in its own forward pass over exactly the context its window gives it."""
    targets, nats, nbytes = len(tokens) - 1, 0.0, 0
    t = torch.from_numpy(tokens.astype(np.int64))
    for i in range(1, targets + 1):
        end = scoring_end(i, targets, seq_len, stride)
        context = t[max(0, end - seq_len):i][None]
        logits = model.logits(model.hidden(context)[:, -1]).float()
        nats += F.cross_entropy(logits, t[i:i + 1], reduction="sum").item()
        nbytes += int(tables.count(t[i - 1:i], t[i:i + 1]).sum())
    return nats, targets, nbytes


@pytest.mark.parametrize("num_tokens,seq_len,stride,batch", [
    (50, 16, 5, 3),   # (N-1) - L = 33 is off the stride grid: a partial final window
    (12, 16, 4, 2),   # N < seq_len: one short window
    (41, 8, 8, 4),    # stride == seq_len
    (30, 8, 1, 7),    # stride 1: every target sees min(i, L) tokens
    (37, 12, 7, 1),
])
def test_sliding_matches_brute_force(num_tokens, seq_len, stride, batch):
    model, tables = tiny_gpt(), random_tables()
    tokens = random_stream(num_tokens, seed=num_tokens)
    r = evaluate(model, tokens, tables, seq_len=seq_len, stride=stride, batch_seqs=batch)
    nats, targets, nbytes = brute_force(model, tokens, tables, seq_len, stride)
    assert r.targets == targets == num_tokens - 1
    assert r.bytes == nbytes == stream_bytes(tokens, tables)
    assert r.val_loss * r.targets == pytest.approx(nats, rel=1e-5)
    assert r.val_bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_context_matters_so_the_check_can_fail():
    """Guards the brute-force test: with a different context the random model scores differently."""
    model, tables = tiny_gpt(), random_tables()
    tokens = random_stream(50, seed=50)
    exact, _, _ = brute_force(model, tokens, tables, 16, 5)
    shorter, _, _ = brute_force(model, tokens, tables, 8, 5)
    assert abs(exact - shorter) > 1e-3 * exact


def test_counts_over_many_geometries():
    model, tables = tiny_gpt(layers=1, dim=16), random_tables()
    for num_tokens in (2, 3, 9, 17, 64, 65, 100):
        tokens = random_stream(num_tokens, seed=num_tokens)
        total_bytes = stream_bytes(tokens, tables)
        for seq_len in (1, 4, 16, 64):
            for stride in sorted({s for s in (1, 3, seq_len // 2, seq_len) if 1 <= s <= seq_len}):
                r = evaluate(model, tokens, tables, seq_len=seq_len, stride=stride, batch_seqs=5)
                targets = num_tokens - 1
                width = min(seq_len, targets)
                windows = 1 + math.ceil((targets - width) / stride)
                assert (r.targets, r.bytes) == (targets, total_bytes), (num_tokens, seq_len, stride)
                assert r.token_forwards == windows * width
                assert r.forwards_per_token == pytest.approx(windows * width / num_tokens)


def test_padded_last_batch_scores_nothing_extra():
    """The CUDA path pads a short last batch (one compiled shape); padding rows must score nothing."""
    model, tables = tiny_gpt(), random_tables()
    tokens = random_stream(60, seed=9)  # 59 targets, L 16, s 5: 10 windows, batches of 4 -> last has 2
    plain = evaluate(model, tokens, tables, seq_len=16, stride=5, batch_seqs=4, pad_batches=False)
    padded = evaluate(model, tokens, tables, seq_len=16, stride=5, batch_seqs=4, pad_batches=True)
    assert (padded.targets, padded.bytes) == (plain.targets, plain.bytes) == (59, stream_bytes(tokens, tables))
    assert padded.val_loss == pytest.approx(plain.val_loss, rel=1e-6)
    assert (plain.token_forwards, padded.token_forwards) == (10 * 16, 12 * 16)  # padding is counted as cost


# ---- standard evaluation is the stride == seq_len case ----------------------------------------------

@torch.no_grad()
def test_stride_equal_seq_len_is_the_standard_eval():
    model, tables = tiny_gpt(), random_tables()
    seq_len, blocks = 16, 6
    tokens = random_stream(seq_len * blocks + 1, seed=3)
    r = evaluate(model, tokens, tables, seq_len=seq_len, stride=seq_len, batch_seqs=4)
    t = torch.from_numpy(tokens.astype(np.int64))
    x, y = t[:-1].view(blocks, seq_len), t[1:].view(blocks, seq_len)
    mean_loss = model(x, y).item()  # the reference's non-overlapping blocks, mean CE
    assert r.targets == blocks * seq_len and r.token_forwards == blocks * seq_len
    assert r.val_loss == pytest.approx(mean_loss, rel=1e-6)
    assert r.bytes == int(tables.count(x, y).sum())


def test_evaluator_standard_and_sliding_agree_at_stride_seq_len():
    model, tables = tiny_gpt(), random_tables()
    geometry = dict(seq_len=16, batch_tokens=8 * 16 * 4, eval_seq_len=0, stride=16, batch_seqs=4)
    aligned = random_stream(16 * 7 + 1, seed=4)
    ev = Evaluator(Dist(), aligned, tables, None, None, **geometry)
    std, sw = ev.standard(model), ev.sliding(model)
    assert (std.val_loss, std.val_bpb, std.targets, std.bytes) == (sw.val_loss, sw.val_bpb, sw.targets, sw.bytes)
    # Off the grid the standard eval drops the partial block; the sliding one scores it once more.
    ragged = random_stream(16 * 7 + 10, seed=4)
    ev = Evaluator(Dist(), ragged, tables, None, None, **geometry)
    std, sw = ev.standard(model), ev.sliding(model)
    assert (std.targets, sw.targets) == (16 * 7, 16 * 7 + 9)


# ---- bytes -----------------------------------------------------------------------------------------

HAND_TABLES = ByteTables(  # 0 BOS (boundary), 1 "a", 2 "▁the", 3 "▁x", 4 a byte token, 5 "é"
    base_bytes=torch.tensor([0, 1, 3, 1, 1, 2], dtype=torch.int32),
    has_leading_space=torch.tensor([False, False, True, True, False, False]),
    is_boundary=torch.tensor([True, False, False, False, False, False]),
)


def test_bytes_hand_example_uses_the_true_previous_token():
    tokens = np.array([0, 2, 1, 3, 0, 2, 5, 4, 3], dtype=np.uint16)
    # targets: ▁the after BOS 3, a 1, ▁x 1+1, BOS 0, ▁the after BOS 3, é 2, byte 1, ▁x 1+1  -> 14
    model = tiny_gpt(vocab=6)
    for seq_len, stride in ((4, 2), (4, 4), (3, 1), (8, 8), (2, 1)):
        r = evaluate(model, tokens, HAND_TABLES, seq_len=seq_len, stride=stride, batch_seqs=2)
        assert (r.targets, r.bytes) == (8, 14), (seq_len, stride)
    sidecar = np.array([9, 1, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint16)  # token 0 is never a target
    r = evaluate(model, tokens, None, seq_len=4, stride=3, batch_seqs=2, byte_counts=sidecar)
    assert r.bytes == 36


def test_bytes_of_the_synthetic_val_split_equal_its_text(tiny_data):
    from pgolf.data import load_tokens, val_pattern

    data_dir, meta = tiny_data
    tables = byte_tables(load_sentencepiece(data_dir / "tokenizer.model"), 512)
    tokens = load_tokens(val_pattern(str(data_dir)))
    assert stream_bytes(tokens, tables) == meta["val_bytes"]


# ---- ranks -----------------------------------------------------------------------------------------

RANK_CASE = dict(num_tokens=203, seq_len=24, stride=5, batch_seqs=4)


def rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with gloo_rank(rank, world_size, init_file):
        local = {}

        def reduce(t):
            local["sums"] = t.clone()
            dist.all_reduce(t)

        r = run_rank_case(rank, world_size, reduce)
        torch.save({"result": dataclasses.asdict(r), "local": local["sums"]}, f"{out_dir}/rank{rank}.pt")


def run_rank_case(rank: int, world_size: int, all_reduce):
    c = RANK_CASE
    return evaluate(tiny_gpt(), random_stream(c["num_tokens"], seed=7), random_tables(), seq_len=c["seq_len"],
                    stride=c["stride"], batch_seqs=c["batch_seqs"], rank=rank, world_size=world_size,
                    all_reduce=all_reduce)


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    mp.spawn(rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = run_rank_case(0, 1, None)
    targets = RANK_CASE["num_tokens"] - 1
    for r in ranks:
        got = r["result"]
        assert (got["targets"], got["bytes"], got["token_forwards"]) == (single.targets, single.bytes,
                                                                          single.token_forwards)
        assert got["val_loss"] == pytest.approx(single.val_loss, rel=1e-9)
        assert got["val_bpb"] == pytest.approx(single.val_bpb, rel=1e-9)
    local_targets = [int(r["local"][1]) for r in ranks]
    assert min(local_targets) > 0 and sum(local_targets) == targets  # the work really was split


# ---- pgolf eval ------------------------------------------------------------------------------------

def write_tiny_artifact(path, vocab: int = 512, extra_config: dict | None = None):
    model = tiny_gpt(vocab=vocab, seed=1)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    blob, _ = serialize(state, {**model.cfg.to_dict(), **(extra_config or {})}, "int8_zlib",
                        ["attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight"], [])
    write_atomic(path, blob)
    return path


def parse_exact(out: str, name: str) -> tuple[float, float]:
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{name}_exact "))
    fields = dict(kv.split(":") for kv in line.split()[1:])
    return float(fields["val_loss"]), float(fields["val_bpb"])


def test_pgolf_eval_scores_an_artifact(tiny_data, tmp_path, capsys, monkeypatch):
    from pgolf.cli import main as cli_main
    from pgolf.data import load_tokens, val_pattern

    monkeypatch.setenv("AUTOCAST", "off")  # fp32, to compare exactly with the in-process fp32 evaluation
    data_dir, _ = tiny_data
    art = write_tiny_artifact(tmp_path / "final_model.int8.ptz")
    argv = ["eval", str(art), "--data", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.model"),
            "--seq-len", "32", "--stride", "8", "--batch-seqs", "16", "--max-tokens", "1500"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "final_sliding_window val_loss:" in out and " stride:8 seq_len:32 eval_time:" in out
    assert "final_int8_zlib_roundtrip val_loss:" in out
    # The same numbers in-process: the dequantized model, the standard and the sliding geometry.
    state, cfg, _ = load_artifact(art)
    model = GPT(GPTConfig(**cfg))
    model.load_state_dict(state)
    tokens = load_tokens(val_pattern(str(data_dir)), 512, 1500)
    tables = byte_tables(load_sentencepiece(data_dir / "tokenizer.model"), 512)
    usable = (len(tokens) - 1) // 32 * 32 + 1
    std = evaluate(model, tokens[:usable], tables, seq_len=32, stride=32, batch_seqs=524_288 // (8 * 32))
    sw = evaluate(model, tokens, tables, seq_len=32, stride=8, batch_seqs=16)
    assert parse_exact(out, "final_int8_zlib_roundtrip") == pytest.approx((std.val_loss, std.val_bpb), abs=1e-8)
    assert parse_exact(out, "final_sliding_window") == pytest.approx((sw.val_loss, sw.val_bpb), abs=1e-8)
    assert f"final_sliding_window_stats targets:{1499} bytes:{sw.bytes} " in out


def test_pgolf_eval_clear_errors(tiny_data, tmp_path, capsys):
    from pgolf.cli import main as cli_main
    from pgolf.eval_artifact import main

    data_dir, _ = tiny_data
    common = ["--data", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.model"), "--seq-len", "32"]
    wrong_vocab = write_tiny_artifact(tmp_path / "v1024.ptz", vocab=1024)
    assert cli_main(["eval", str(wrong_vocab), *common]) == 2
    err = capsys.readouterr().err
    assert "tokenizer has 512 pieces but the model" in err and "vocab_size 1024" in err

    newer = tmp_path / "newer.ptz"
    buf = io.BytesIO()
    torch.save({"format": "int8_zlib", "version": 99, "model_config": {}, "tensors": {}}, buf)
    newer.write_bytes(MAGIC + b"zlib-9\0" + zlib.compress(buf.getvalue()))
    with pytest.raises(ValueError, match="v99 is not supported"):
        main([str(newer), *common])

    foreign = tmp_path / "foreign.ptz"
    foreign.write_bytes(b"\x80\x02 not an artifact")
    with pytest.raises(ValueError, match="not a pgolf artifact"):
        main([str(foreign), *common])

    truncated = tmp_path / "truncated.ptz"
    truncated.write_bytes(write_tiny_artifact(tmp_path / "whole.ptz").read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        main([str(truncated), *common])
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        main([str(tmp_path / "missing.ptz"), *common])

    future = write_tiny_artifact(tmp_path / "future.ptz", extra_config={"rotary_dims": 16})
    with pytest.raises(ValueError, match=r"does not know \(rotary_dims\)"):
        main([str(future), *common])

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    art = write_tiny_artifact(run_dir / "final_model.int8.ptz")
    (run_dir / "config.json").write_text(json.dumps({"num_layers": 3, "model_dim": 32, "train_seq_len": 32}))
    with pytest.raises(ValueError, match="num_layers 3 vs 2"):
        main([str(art), *common])


def test_pgolf_eval_honours_env_vars_with_the_usual_precedence(tiny_data, tmp_path, capsys, monkeypatch):
    """config.json < env < flags, like every command; the log says where the data path came from."""
    from pgolf.eval_artifact import main

    data_dir, _ = tiny_data
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    art = write_tiny_artifact(run_dir / "final_model.int8.ptz")
    tokenizer = str(data_dir / "tokenizer.model")
    (run_dir / "config.json").write_text(json.dumps({"data_path": str(tmp_path / "moved"), "tokenizer_path": tokenizer,
                                                     "train_seq_len": 32, "val_max_tokens": 1500}))
    with pytest.raises(Exception, match="moved"):  # the saved path alone no longer exists
        main([str(art), "--stride", "0"])
    monkeypatch.setenv("DATA_PATH", str(data_dir))
    monkeypatch.setenv("EVAL_STRIDE", "16")
    assert main([str(art)]) == 0
    out = capsys.readouterr().out
    assert f"data_path:{data_dir} from:env DATA_PATH" in out and f"tokenizer_path:{tokenizer} from:saved config" in out
    assert " stride:16 seq_len:32 " in out  # EVAL_STRIDE from the env, not the default 64
    assert main([str(art), "--stride", "8"]) == 0  # a flag beats the env
    assert " stride:8 seq_len:32 " in capsys.readouterr().out
    monkeypatch.setenv("NUM_LAYERS", "5")  # the artifact fixes the model: a clashing setting is refused
    with pytest.raises(ValueError, match=r"NUM_LAYERS=5 \(env NUM_LAYERS\) vs 2"):
        main([str(art)])


def test_scoring_beyond_the_training_context_warns():
    assert beyond_context(128, 128, extended=False) is None and beyond_context(128, 64, extended=False) is None
    assert beyond_context(128, 2048, extended=True) is None  # a context extension is on: expected
    warning = beyond_context(128, 2048, extended=False)
    assert warning.startswith("warning: scoring 2048-token windows, 16x the training context of 128 (TRAIN_SEQ_LEN)")
    assert "without a context extension such as ROPE_YARN" in warning


def test_pgolf_eval_seq_len_runs_the_sliding_eval_and_warns_past_the_training_context(tiny_data, tmp_path, capsys):
    from pgolf.eval_artifact import main

    data_dir, _ = tiny_data
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    art = write_tiny_artifact(run_dir / "final_model.int8.ptz")
    (run_dir / "config.json").write_text(json.dumps({"data_path": str(data_dir), "train_seq_len": 16, "eval_stride": 0,
                                                     "tokenizer_path": str(data_dir / "tokenizer.model"),
                                                     "val_max_tokens": 600}))
    assert main([str(art), "--seq-len", "32"]) == 0  # the run had no sliding eval: --seq-len asks for one
    out = capsys.readouterr().out
    assert "warning: scoring 32-token windows, 2x the training context of 16 (TRAIN_SEQ_LEN)" in out
    assert out.index("warning: scoring") < out.index("final_int8_zlib_roundtrip ")  # before the wait, not after
    assert " stride:32 seq_len:32 " in out
    assert main([str(art), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and " stride:16 seq_len:16 " in out
    assert main([str(art)]) == 0  # no --seq-len: the run's EVAL_STRIDE=0 still means no sliding eval
    assert "final_sliding_window" not in capsys.readouterr().out


def test_vocab_size_above_the_tokenizer_is_said_in_one_line(tiny_data):
    data_dir, _ = tiny_data
    tokenizer = str(data_dir / "tokenizer.model")
    lines = []
    load_validation(str(data_dir), tokenizer, 640, 100, lines.append)
    assert lines[0].startswith("vocab_padding:128 VOCAB_SIZE=640 tokenizer_pieces:512 (the rows above the tokenizer's")
    assert lines[0].endswith("set VOCAB_SIZE=512 to drop them)")
    lines.clear()
    load_validation(str(data_dir), tokenizer, 512, 100, lines.append)
    assert not any(line.startswith("vocab_padding") for line in lines)
