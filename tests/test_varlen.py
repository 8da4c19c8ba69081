"""Document masking through a variable-length attention kernel, FlashAttention's flash_attn_varlen_func on
CUDA. No GPU here, so a reference kernel with the same signature stands in: causal SDPA per document. It
is also registered as a torch custom op with a shape-only (fake) implementation, the way FlashAttention
registers its own, so the training step's graph compiles with fullgraph=True as it would on CUDA."""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf import execution
from pgolf.config import resolve
from pgolf.execution import attach_attention_kernel, flash_varlen_kernel
from pgolf.layers import document_segments, varlen_boundaries
from pgolf.model import GPTConfig
from pgolf.train import run
from tests.test_frontier import ALL_ON, TINY, randomized
from tests.conftest import tiny_env


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True):
    """flash_attn_varlen_func's contract: q (N, H, D), k/v (N, Hkv, D); causal attention inside each
    [cu[i], cu[i+1]), empty ranges allowed; no range longer than max_seqlen."""
    bounds = cu_seqlens_q.tolist()
    assert causal and cu_seqlens_k.tolist() == bounds and bounds[-1] == q.size(0)
    assert max(e - s for s, e in zip(bounds, bounds[1:])) <= max_seqlen_q
    pieces = []
    for s, e in zip(bounds, bounds[1:]):
        if e > s:
            head_major = lambda t: t[s:e].transpose(0, 1)[None]  # noqa: E731  (L, h, D) -> (1, h, L, D)
            y = F.scaled_dot_product_attention(head_major(q), head_major(k), head_major(v), is_causal=True,
                                               enable_gqa=True)
            pieces.append(y[0].transpose(0, 1))
    return torch.cat(pieces)


@torch.library.custom_op("pgolf_test::varlen", mutates_args=())
def varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    return reference_varlen(q, k, v, cu, cu, max_len, max_len)


@varlen_op.register_fake
def _(q, k, v, cu, max_len):
    return torch.empty_like(q)


@torch.library.custom_op("pgolf_test::varlen_backward", mutates_args=())
def varlen_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                       max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # custom ops run below autograd; functorch's vjp brings its own
    _, vjp = torch.func.vjp(lambda *qkv: reference_varlen(*qkv, cu, cu, max_len, max_len), q, k, v)
    return tuple(g.contiguous() for g in vjp(grad))


@varlen_backward_op.register_fake
def _(grad, q, k, v, cu, max_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.max_len = inputs[4]


def _backward(ctx, grad):
    return (*varlen_backward_op(grad, *ctx.saved_tensors, ctx.max_len), None, None)


varlen_op.register_autograd(_backward, setup_context=_setup)


def op_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True):
    return varlen_op(q, k, v, cu_seqlens_q, max_seqlen_q)


def batch(seed: int, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x, y = torch.randint(2, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    x.view(-1)[starts] = 1  # BOS at these flat positions
    return x, y


def test_boundaries_are_row_starts_and_bos():
    ids = torch.tensor([[4, 1, 5, 1, 1], [1, 7, 7, 8, 2], [3, 3, 1, 3, 3]])
    cu = varlen_boundaries(ids, bos_id=1)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 1, 3, 4, 5, 10, 12, 15]
    # the documents SDPA's block mask keeps apart: one segment per range, and a new one at each start
    seg, bounds = document_segments(ids, 1).flatten().tolist(), cu.tolist()
    assert all(len(set(seg[s:e])) == 1 for s, e in zip(bounds, bounds[1:]))
    assert all(seg[i] != seg[i - 1] or i % 5 == 0 for i in bounds[1:-1])


def test_varlen_kernel_gives_the_block_mask_attention_and_gradients():
    sdpa = randomized(GPTConfig(**TINY, **ALL_ON))
    sdpa.set_looping(True)
    varlen = copy.deepcopy(sdpa)
    varlen.use_varlen_kernel(reference_varlen)
    x, y = batch(0, [3, 9, 20, 21])
    assert varlen.document_layout(x).tolist() == [0, 3, 9, 16, 20, 21, 32]
    want = torch.autograd.grad(sdpa(x, y), list(sdpa.parameters()))
    loss = varlen(x, y)
    assert abs(loss.item() - sdpa(x, y).item()) < 1e-5
    for (name, _), g, w in zip(varlen.named_parameters(), torch.autograd.grad(loss, list(varlen.parameters())), want):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4), name
    cross = copy.deepcopy(sdpa)  # a kernel that ignores the boundaries is caught: documents see each other
    cross.use_varlen_kernel(lambda q, k, v, cq, ck, mq, mk, causal: reference_varlen(
        q, k, v, torch.tensor([0, q.size(0)], dtype=torch.int32), torch.tensor([0, q.size(0)], dtype=torch.int32),
        q.size(0), q.size(0)))
    assert abs(cross(x, y).item() - loss.item()) > 1e-3


def test_training_step_with_the_varlen_op_compiles_fullgraph():
    """The model compiled with fullgraph=True around a kernel that is a custom op, as FlashAttention's is:
    cu_seqlens are built inside the graph (a data-dependent size), for any number of documents."""
    torch._dynamo.reset()
    sdpa = randomized(GPTConfig(**TINY, **ALL_ON))
    sdpa.set_looping(True)
    varlen = copy.deepcopy(sdpa)
    varlen.use_varlen_kernel(op_kernel)
    compiled = torch.compile(varlen, fullgraph=True, dynamic=False)
    for x, y in (batch(0, [3, 9, 20, 21]), batch(1, [5])):
        loss = compiled(x, y)
        assert abs(loss.item() - sdpa(x, y).item()) < 1e-4
        loss.backward()
        want = torch.autograd.grad(sdpa(x, y), list(sdpa.parameters()))
        for (name, p), w in zip(varlen.named_parameters(), want):
            assert torch.allclose(p.grad, w, atol=1e-5, rtol=1e-3), name
        varlen.zero_grad(set_to_none=True)


def test_the_kernel_is_flash_attention_on_cuda_when_installed(monkeypatch):
    fa3, fa2 = types.ModuleType("flash_attn_interface"), types.ModuleType("flash_attn")
    fa3.flash_attn_varlen_func, fa2.flash_attn_varlen_func = object(), object()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    assert flash_varlen_kernel(cuda) is fa3.flash_attn_varlen_func and flash_varlen_kernel(cpu) is None
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # not installed: import raises
    assert flash_varlen_kernel(cuda) is fa2.flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert flash_varlen_kernel(cuda) is None
    model = randomized(GPTConfig(**TINY, doc_mask=True))
    assert attach_attention_kernel(model, cpu) == "sdpa_block_mask"
    assert attach_attention_kernel(randomized(GPTConfig(**TINY)), cpu) == "causal"


@pytest.mark.slow
def test_a_run_with_the_varlen_kernel_trains_and_scores_as_the_block_mask(tiny_data, tmp_path, monkeypatch):
    """End to end with the kernel in the compiled (fullgraph) training step and in the round trip's fresh
    model: both runs log the kernel they used and score the same."""
    data_dir, _ = tiny_data
    results = {}
    torch._dynamo.reset()
    for name, kernel in (("sdpa", None), ("varlen", op_kernel)):
        monkeypatch.setattr(execution, "flash_varlen_kernel", lambda device, k=kernel: k)
        env = tiny_env(data_dir, tmp_path, DOC_MASK=1, RUN_ID=name, ITERATIONS=4, COMPILE=1)
        final = run(resolve("baseline", env=env))
        log = (Path(final["run_dir"]) / "train.log").read_text()
        results[name] = final["roundtrip_val_bpb"]
        assert ("attention_kernel:flash_varlen:tests.test_varlen" in log) == (kernel is not None)
    assert results["varlen"] == pytest.approx(results["sdpa"], abs=1e-4)
