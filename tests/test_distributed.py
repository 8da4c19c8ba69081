"""Two gloo processes train exactly like one process on the same global batch."""
import json

import pytest

from tests.conftest import PYTHON, run_cmd, tiny_env


def events(path, name):
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == name]


@pytest.mark.slow
def test_two_processes_match_one(tiny_data, tmp_path):
    data_dir = tiny_data[0]
    common = dict(ITERATIONS=6, VAL_LOSS_EVERY=3, VAL_MAX_TOKENS=4097, MUON_VARIANT="normuon")
    run_cmd([PYTHON, "-m", "pgolf.train"], tiny_env(data_dir, tmp_path, RUN_ID="one", **common))
    run_cmd([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgolf.train"],
            tiny_env(data_dir, tmp_path, RUN_ID="two", **common))
    one, two = tmp_path / "one" / "metrics.jsonl", tmp_path / "two" / "metrics.jsonl"
    assert events(two, "config")[0]["run_id"] == "two"
    l1 = [e["train_loss"] for e in events(one, "train")]
    l2 = [e["train_loss"] for e in events(two, "train")]
    assert len(l1) == len(l2) == 6
    for a, b in zip(l1, l2):
        assert abs(a - b) < 2e-5 * abs(a)
    v1, v2 = events(one, "val"), events(two, "val")
    assert [e["step"] for e in v1] == [e["step"] for e in v2] == [0, 3, 6]
    for a, b in zip(v1, v2):
        assert abs(a["val_bpb"] - b["val_bpb"]) < 2e-5
    f1, f2 = events(one, "final")[0], events(two, "final")[0]
    assert abs(f1["roundtrip_val_bpb"] - f2["roundtrip_val_bpb"]) < 2e-5
    assert f1["bytes_code"] == f2["bytes_code"]
