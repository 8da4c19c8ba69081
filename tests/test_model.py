import math

import torch

from pgolf.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2)


def randomize(model: GPT) -> GPT:
    """Give the zero-initialised projections weights so outputs depend on every layer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.05)
    return model


def test_baseline_parameter_count_matches_the_reference():
    n = sum(p.numel() for p in GPT(GPTConfig()).parameters())
    per_block = 512 * 512 * 2 + 512 * 256 * 2 + 512 * 1024 * 2 + 8 + 512 * 4
    assert n == 9 * per_block + 1024 * 512 + 4 * 512 == 17_059_912


def test_mlp_mult_three_gives_hidden_1536():
    model = GPT(GPTConfig(mlp_mult=3.0))
    assert model.blocks[0].mlp.fc.weight.shape == (1536, 512)
    assert sum(p.numel() for p in model.parameters()) == 21_778_504


def test_shapes_and_unet_skips():
    model = GPT(TINY)
    x = torch.randint(0, 64, (2, 10))
    assert model.hidden(x).shape == (2, 10, 32)
    assert model.logits(model.hidden(x)).shape == (2, 10, 64)
    assert model.skip_weights.shape == (1, 32)  # 3 layers: 1 encoder, 2 decoder, 1 skip
    assert model.blocks[0].attn.c_k.weight.shape == (16, 32)  # GQA: 2 KV heads of dim 8


def test_output_projections_start_at_zero_and_embedding_is_tied():
    model = GPT(TINY)
    for block in model.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
    assert model.lm_head is None
    assert torch.allclose(model.tok_emb.weight.std(), torch.tensor(0.005), rtol=0.1)


def test_causality():
    model = randomize(GPT(TINY))
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 64
    a, b = model.hidden(x), model.hidden(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_initial_loss_is_log_vocab_and_softcap_bounds_logits():
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, logit_softcap=2.0))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    assert abs(model(x, y).item() - math.log(64)) < 0.05
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000)
    assert model.logits(model.hidden(x)).abs().max() <= 2.0


def test_gradients_reach_every_parameter():
    model = randomize(GPT(TINY))
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    model(x, y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
