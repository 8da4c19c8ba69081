"""Execution choices and the CUDA path's logic, proven on CPU: autocast/compile/thread defaults and their
reasons, NCCL or gloo, fused Adam (0-dim parameters included), every tensor of a step on the model's
device, the bf16 residual stream, the mean loss shown on multi-process runs, the tokenizer's BOS, and a
tiny run with COMPILE=1 AUTOCAST=bf16 through the compile warmup, the QAT switch and the compiled eval."""
from __future__ import annotations
import os

import pytest
import torch

from tests.conftest import tiny_env
from pgolf.config import resolve
from pgolf.dist import Dist, process_group_args
from pgolf.execution import COMPILE_MIN_CPU_FLOPS, Execution, apply_execution, busy_cpus, cpu_threads, plan_execution
from pgolf.model import GPT, GPTConfig
from pgolf.optim import fused_adam
from pgolf.runlog import checked_bos
from pgolf.runs import load_run
from pgolf.train import mean_over_ranks, run

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
ALL_ON = dict(mlp_negative_slope=0.5, xsa_last_n=4, rope_dims=4, ln_scale=True, skip_gates_enabled=True,
              parallel_start_layer=3, num_loops=1, loop_start=1, loop_end=2, sparse_attn_gate_enabled=True,
              gate_window=6, smear_gate_enabled=True, doc_mask=True, fused_ce_enabled=True)
QUIET = (1, "test")  # a thread choice, so plans never read this machine's load


@pytest.mark.parametrize("flags, autocast, why", [
    ({"avx512_bf16", "avx2"}, torch.bfloat16, "avx512_bf16"),
    ({"amx_bf16"}, torch.bfloat16, "amx_bf16"),
    ({"avx2", "avx512f"}, None, "no_native_bf16"),
])
def test_autocast_auto_follows_the_cpu_flags(flags, autocast, why):
    ex = plan_execution("0", "auto", CPU, flags=flags, threads=QUIET)
    assert (ex.autocast, ex.why["autocast"]) == (autocast, why)
    assert ex.ns_dtype == (autocast or torch.float32)  # Newton-Schulz follows autocast
    assert plan_execution("0", "off", CPU, flags={"amx_bf16"}, threads=QUIET).autocast is None
    assert plan_execution("0", "bf16", CPU, flags=set(), threads=QUIET).autocast == torch.bfloat16
    assert f"autocast={'bf16' if autocast else 'off'} reason:{why} " in ex.line()


def test_cuda_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    ex = plan_execution("auto", "auto", CUDA, train_flops=0.0)
    assert (ex.compile, ex.autocast, ex.ns_dtype, ex.threads) == (True, torch.bfloat16, torch.bfloat16, 0)
    assert ex.line().startswith("execution:compile=1 reason:cuda autocast=bf16 reason:cuda ns_dtype=bf16 threads=")
    assert process_group_args(CUDA) == {"backend": "nccl", "device_id": CUDA}
    assert process_group_args(CPU) == {"backend": "gloo"}
    assert fused_adam(CUDA) and not fused_adam(CPU)


def test_cuda_backend_switches(monkeypatch):
    """TF32 for fp32 matmuls, flash attention first, cuDNN attention off (as the reference); the memory-efficient
    kernel stays for document masks. Process-wide flags, so the test restores them."""
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cuda.flash_sdp_enabled(), b.cuda.cudnn_sdp_enabled(),
             b.cuda.mem_efficient_sdp_enabled())
    try:
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
        b.cuda.enable_cudnn_sdp(True)
        apply_execution(Execution(True, torch.bfloat16, torch.bfloat16, 0, {}), CPU)
        assert not b.cuda.matmul.allow_tf32 and b.cuda.cudnn_sdp_enabled()  # nothing changes for a CPU run
        apply_execution(Execution(True, torch.bfloat16, torch.bfloat16, 0, {}), CUDA)
        assert b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32 and b.cuda.flash_sdp_enabled()
        assert not b.cuda.cudnn_sdp_enabled() and b.cuda.mem_efficient_sdp_enabled()
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved[:2]
        b.cuda.enable_flash_sdp(saved[2]), b.cuda.enable_cudnn_sdp(saved[3]), b.cuda.enable_mem_efficient_sdp(saved[4])


def test_compile_auto_on_cpu_pays_only_for_long_runs():
    def plan(flops):
        return plan_execution("auto", "off", CPU, train_flops=flops, threads=QUIET)
    assert plan(COMPILE_MIN_CPU_FLOPS).compile and not plan(COMPILE_MIN_CPU_FLOPS * 0.99).compile
    assert plan(2e13).why["compile"] == "cpu_train_flops:2.00e+13>=1e+13"
    bench, smoke = (resolve(p, env={}) for p in ("frontier-bench", "smoke"))
    from pgolf.projection import step_flops
    assert plan(bench.iterations * step_flops(bench)).compile  # the CPU bench compiles
    assert not plan(smoke.iterations * step_flops(smoke)).compile  # the one-minute smoke run does not
    assert plan_execution("1", "off", CPU, threads=QUIET).compile and not plan_execution("0", "off", CPU).compile


def test_threads_leave_busy_cpus_alone():
    assert cpu_threads(2, 12.3, {}) == (1, "cpus:2_busy:12.3")  # shared and busy: one thread
    assert cpu_threads(2, 0.2, {}) == (2, "cpus:2_busy:0.2")  # idle: every core
    assert cpu_threads(8, 3.4, {})[0] == 5
    assert cpu_threads(8, 0.0, {"OMP_NUM_THREADS": "3"}) == (0, "OMP_NUM_THREADS")  # the user's choice wins
    assert cpu_threads(2, 0.97, {})[0] == 1  # another job spinning one core: do not oversubscribe it
    assert 0.0 <= busy_cpus(0.05) <= (os.cpu_count() or 1)


def test_fused_adam_takes_zero_dim_parameters():
    """The CUDA optimizer path (fused AdamW) over every parameter kind, 0-dim smear_lambda included, on CPU's
    fused kernel: the same update as the foreach form."""
    steps = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY, **ALL_ON))
        assert any(p.ndim == 0 for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
        model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
        opt.step()
        steps[fused] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(steps[False], steps[True]):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_step_creates_no_tensor_off_the_model_device():
    """Every buffer and every tensor made inside forward/backward follows the model's device: on the meta
    device any CPU-made tensor would fail to mix (the way a CPU tensor fails inside a CUDA step)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY, **ALL_ON))
    model.set_looping(True)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    x = torch.randint(0, 64, (2, 16), device="meta")
    loss = model(x, x)
    loss.backward()
    assert loss.device.type == "meta"


def test_residual_stream_is_bf16_under_autocast():
    """Like the reference (model cast to bf16, control tensors fp32), a block's input under autocast is
    bf16, not promoted to fp32 by the fp32 master embedding; without autocast it stays fp32."""
    model = GPT(GPTConfig(**TINY))
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x)
    model(x, x)
    assert seen == [torch.bfloat16, torch.float32]
    assert model.tok_emb.weight.dtype == torch.float32  # the master weights stay fp32


class TwoRanks(Dist):
    """A stand-in for two ranks whose all-reduce sums in place, as torch.distributed does."""

    def __init__(self, other: float):
        super().__init__(rank=0, world_size=2)
        self.other = other

    def all_reduce(self, t, op="sum"):
        return t.add_(self.other)


def test_logged_and_shown_loss_is_the_mean_over_ranks():
    loss = torch.tensor(2.0)
    assert mean_over_ranks(TwoRanks(4.0), loss) == 3.0
    assert loss.item() == 2.0  # the per-rank value the bar shows between log steps is untouched


def test_bos_comes_from_the_tokenizer_and_the_shards_must_agree(tiny_data):
    data_dir, _ = tiny_data
    cfg = resolve("baseline", env={}, flags=dict(data_path=str(data_dir), tokenizer_path=str(data_dir / "tokenizer.model")))
    val = torch.tensor([1, 7, 9]).numpy()
    assert checked_bos(cfg, val, 1) == 1
    with pytest.raises(ValueError, match=r"the val shards start with token 7, not the BOS id 1 of .*tokenizer.model"):
        checked_bos(cfg, val[1:], 1)
    with pytest.raises(ValueError, match=r"the train shards start with token 5, not the BOS id 1"):
        checked_bos(cfg, val, 5)
    cfg.bos_id = 2
    with pytest.raises(ValueError, match=r"BOS_ID=2 but .*tokenizer.model has BOS id 1"):
        checked_bos(cfg, val, 1)


@pytest.mark.slow
def test_compiled_bf16_run_with_warmup_qat_switch_and_compiled_eval(tiny_data, tmp_path):
    """COMPILE=1 AUTOCAST=bf16 on CPU end to end: the warmup primes the compiled step and restores weights,
    optimizer state and data (so the first steps match an eager bf16 run), QAT switches on mid-run inside
    the compiled graph, and the compiled eval scores the round trip."""
    data_dir, _ = tiny_data
    common = dict(ITERATIONS=4, WARMDOWN_ITERS=2, AUTOCAST="bf16", QUANT_FORMAT="int6_zstd", QAT=1,
                  QAT_START_FRAC=0.5, VAL_MAX_TOKENS=4097)
    env = {k: v for k, v in tiny_env(data_dir, tmp_path, **common).items() if k.isupper()}
    torch._dynamo.reset()
    run(resolve("baseline", env={**env, "RUN_ID": "compiled", "COMPILE": "1", "WARMUP_STEPS": "2"}))
    run(resolve("baseline", env={**env, "RUN_ID": "eager"}))
    compiled, eager = load_run(tmp_path / "compiled"), load_run(tmp_path / "eager")
    log = (tmp_path / "compiled" / "train.log").read_text()
    assert "warmup_step:2/2" in log and "qat:on step:2" in log
    assert "execution:compile=1 reason:COMPILE=1 autocast=bf16 reason:AUTOCAST=bf16 ns_dtype=bf16" in log
    assert compiled.series("train", "train_loss")[2] == pytest.approx(eager.series("train", "train_loss")[2], abs=0.03)
    assert compiled.final["val_bpb"] == pytest.approx(eager.final["val_bpb"], abs=0.02)


def test_projection_is_calibrated_on_the_records():
    import math

    from pgolf.projection import calibrate, mfu, peak_flops, projected_ms, step_flops

    utilization, rows = calibrate()
    assert [r["preset"] for r in rows] == ["baseline", "seed137", "seed170", "frontier"]
    assert [r["reported_ms"] for r in rows] == [43.5, 98.9, 61.8, 121.7]
    assert math.prod(r["predicted_ms"] / r["reported_ms"] for r in rows) == pytest.approx(1.0)  # geometric mean
    assert rows[2]["predicted_ms"] == pytest.approx(projected_ms(step_flops(resolve("seed170", env={})), utilization))
    assert 0.15 < utilization < 0.3 and all(abs(r["error_pct"]) < 50 for r in rows)
    assert mfu(1e8, 1e6, 8, 1e12) == pytest.approx(12.5)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("Tesla T4") is None
