import numpy as np
import pytest
import torch

from pgolf.data import (HEADER_BYTES, DistributedTokenLoader, ShardError, TokenStream, load_tokens, read_shard,
                        read_shard_header, write_shard)


def test_shard_round_trip_exact_bytes(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 42], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * 5 == 1034
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, 5]
    assert raw[HEADER_BYTES:HEADER_BYTES + 4] == b"\x01\x00\x05\x00"  # little-endian uint16
    np.testing.assert_array_equal(read_shard(path), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_shards_name_the_file(tmp_path):
    good = tmp_path / "a.bin"
    write_shard(good, np.arange(10, dtype=np.uint16))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-2])
    with pytest.raises(ShardError, match="truncated.bin: header says 10 tokens"):
        read_shard(truncated)
    magic = tmp_path / "magic.bin"
    data = bytearray(good.read_bytes())
    data[0] ^= 1
    magic.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="magic.bin: magic/version"):
        read_shard_header(magic)
    with pytest.raises(ShardError, match=r"a.bin: token 9 at offset 9 is >= vocab size 9"):
        read_shard(good, vocab_size=9)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\0" * 10)
    with pytest.raises(ShardError, match="tiny.bin: 10 bytes is shorter"):
        read_shard(tiny)
    with pytest.raises(ShardError, match="no files match"):
        load_tokens(str(tmp_path / "nothing_*.bin"))
    with pytest.raises(ShardError, match="must fit in uint16"):
        write_shard(tmp_path / "big.bin", np.array([70000]))


def test_stream_checks_the_ids_it_hands_out(tmp_path):
    """Ids are range-checked as they are taken, naming the shard and the offset in it."""
    write_shard(tmp_path / "s_000000.bin", np.array([1, 2, 3], dtype=np.uint16))
    write_shard(tmp_path / "s_000001.bin", np.array([4, 9, 5], dtype=np.uint16))
    stream = TokenStream(str(tmp_path / "s_*.bin"), vocab_size=9)
    assert stream.take(4).tolist() == [1, 2, 3, 4]
    with pytest.raises(ShardError, match=r"s_000001.bin: token 9 at offset 1 is >= vocab size 9"):
        stream.take(2)


def test_stream_reads_sorted_shards_and_wraps(tmp_path):
    write_shard(tmp_path / "s_000001.bin", np.array([3, 4, 5], dtype=np.uint16))
    write_shard(tmp_path / "s_000000.bin", np.array([1, 2], dtype=np.uint16))
    stream = TokenStream(str(tmp_path / "s_*.bin"))
    assert stream.take(4).tolist() == [1, 2, 3, 4]
    assert stream.take(4).tolist() == [5, 1, 2, 3]  # wraps to the first shard


def test_one_and_two_ranks_consume_the_same_tokens_per_step(tmp_path):
    write_shard(tmp_path / "t_000000.bin", np.arange(5000, dtype=np.uint16))
    pattern, cpu = str(tmp_path / "t_*.bin"), torch.device("cpu")
    single = DistributedTokenLoader(pattern, 0, 1, cpu)
    ranks = [DistributedTokenLoader(pattern, r, 2, cpu) for r in range(2)]
    global_tokens, seq = 512, 16
    for _ in range(3):  # several steps
        xs1 = [single.next_batch(global_tokens, seq, 8)[0] for _ in range(8)]
        xs2 = [ranks[r].next_batch(global_tokens, seq, 4)[0] for _ in range(4) for r in range(2)]
        assert sum(x.numel() for x in xs1) == sum(x.numel() for x in xs2) == global_tokens
        # Same multiset of sequences per optimizer step (the order of micro-batches differs).
        key = lambda xs: sorted(map(tuple, torch.cat(xs).tolist()))
        assert key(xs1) == key(xs2)


def test_loader_targets_are_inputs_shifted_by_one(tmp_path):
    write_shard(tmp_path / "t_000000.bin", np.arange(1000, dtype=np.uint16))
    x, y = DistributedTokenLoader(str(tmp_path / "t_*.bin"), 1, 2, torch.device("cpu")).next_batch(256, 32, 4)
    assert x.shape == y.shape == (1, 32)
    assert x[0, 0].item() == 33  # rank 1's slice starts after rank 0's local+1 = 33 tokens
    assert torch.equal(y, x + 1)


def test_synthetic_entropy_is_read_from_the_corpus(tiny_data, tmp_path):
    from pgolf.data import synthetic_entropy

    data_dir, meta = tiny_data
    assert synthetic_entropy(str(data_dir)) == meta["entropy_bits_per_byte"]
    assert synthetic_entropy(str(tmp_path)) is None  # real data has no synth.json
    (tmp_path / "synth.json").write_text("{}")
    with pytest.raises(ShardError, match="synth.json: no entropy_bits_per_byte in it"):
        synthetic_entropy(str(tmp_path))
