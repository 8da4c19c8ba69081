"""SWA: the running fp32 average of known tensors, and its wiring in a tiny training run."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pgolf.averaging import SWA
from pgolf.config import resolve
from pgolf.train import run
from tests.conftest import tiny_env


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 3))
        self.h = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def set_all(model: Tiny, w: list, h: float, steps: int) -> None:
    with torch.no_grad():
        model.w.copy_(torch.tensor(w))
        model.h.fill_(h)
        model.steps.fill_(steps)


def test_swa_average_of_known_tensors():
    model, swa = Tiny(), SWA()
    swa.apply(model)  # before any checkpoint: a no-op
    assert torch.equal(model.w, torch.zeros(2, 3))
    for k, (w, h) in enumerate([([[1, 2, 3], [4, 5, 6]], 1.0), ([[3, 2, 1], [0, 0, 0]], 2.0),
                                ([[2, 2, 2], [2, 2, 0]], 4.5)]):
        set_all(model, w, h, steps=k)
        swa.add(model)
    assert swa.count == 3
    assert swa.sums["w"].dtype == torch.float32 and swa.sums["h"].dtype == torch.float32
    set_all(model, [[9] * 3] * 2, 9.0, steps=7)
    swa.apply(model)
    assert torch.equal(model.w, torch.tensor([[2.0, 2.0, 2.0], [2.0, 7 / 3, 2.0]]))
    assert model.h.dtype == torch.bfloat16 and torch.equal(model.h, torch.full((4,), 2.5, dtype=torch.bfloat16))
    assert int(model.steps) == 7  # integer buffers are not averaged


def test_swa_in_a_training_run(tiny_data, tmp_path, monkeypatch):
    """6 steps, warmdown 3, SWA every step: lr_mul < 1 on steps 5 (0.667) and 6 (0.333): 2 checkpoints.
    The weights exported are the mean of exactly the checkpoints taken."""
    import pgolf.train

    taken = []

    class RecordingSWA(SWA):
        def add(self, model):
            taken.append({k: v.detach().float().clone() for k, v in model.state_dict().items()})
            super().add(model)

    monkeypatch.setattr(pgolf.train, "SWA", RecordingSWA)
    data_dir, _ = tiny_data
    env = tiny_env(data_dir, tmp_path, RUN_ID="swa", ITERATIONS=6, WARMDOWN_ITERS=3, SWA_EVERY=1,
                   QUANT_FORMAT="int6_zstd", QAT=1, VAL_MAX_TOKENS=4097,
                   TRAIN_BATCH_TOKENS=1024)
    final = run(resolve("baseline", env={k: v for k, v in env.items() if k.isupper()}))
    log = (Path(tmp_path) / "swa" / "train.log").read_text()
    assert final["swa_checkpoints"] == len(taken) == 2
    assert "swa:start step:5 lr_mul:0.6667" in log and "swa:applied checkpoints:2" in log
    averaged = torch.load(Path(tmp_path) / "swa" / "final_model.pt")  # what the export quantized
    for name, t in averaged.items():
        mean = sum(c[name] for c in taken) / len(taken)
        assert torch.allclose(t.float(), mean, atol=1e-7), name
    assert not torch.equal(taken[0]["blocks.0.attn.c_q.weight"], taken[1]["blocks.0.attn.c_q.weight"])
    last_val = re.search(r"^step:6/6 val_loss:\S+ val_bpb:(\S+) ", log, re.M)
    post = re.search(r"^post_swa_exact val_loss:\S+ val_bpb:(\S+)$", log, re.M)
    assert post and last_val and float(post.group(1)) != pytest.approx(float(last_val.group(1)), abs=1e-6)
    assert re.search(r"^final_int6_roundtrip_exact val_loss:\S+ val_bpb:\S+$", log, re.M)
    assert log.index("swa:applied") < log.index("final_int6_roundtrip")
