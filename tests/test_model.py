"""The network: shapes through every block, the conditioning path, gradients, learning."""
from dataclasses import replace

import torch
from conftest import TINY

from config import DiffusionConfig
from conv_block import ResnetBlock
from cross_attn import CrossAttention, CrossAttnBlock
from diffusion import Diffusion
from unet import UNet, timestep_embedding


def test_cross_attn_block_keeps_image_shape():
    block = CrossAttnBlock(dim=16, context_dim=8, heads=4, ff_mult=2)
    x, ctx = torch.randn(3, 16, 7, 5), torch.randn(3, 4, 8)
    assert block(x, ctx).shape == (3, 16, 7, 5)


def test_cross_attention_uses_the_context():
    attn = CrossAttention(dim=8, context_dim=6, heads=2)
    x = torch.randn(2, 10, 8)
    a, b = attn(x, torch.randn(2, 3, 6)), attn(x, torch.randn(2, 3, 6))
    assert (a - b).abs().max() > 1e-3


def test_resnet_block_shapes():
    block = ResnetBlock(8, 16, time_dim=32, context_dim=8, heads=2, ff_mult=1)
    out = block(torch.randn(2, 8, 14, 14), torch.randn(2, 32), torch.randn(2, 3, 8))
    assert out.shape == (2, 16, 14, 14)


def test_unet_shapes_and_every_block_has_attention():
    for cfg in (TINY, replace(TINY, channel_mults=(1, 2, 2)), replace(TINY, num_res_blocks=2)):
        model = UNet(cfg)
        out = model(torch.randn(5, 1, 28, 28), torch.randint(0, 50, (5,)), torch.randint(0, 11, (5,)))
        assert out.shape == (5, 1, 28, 28)
        blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
        assert blocks and all(isinstance(b.transformer, CrossAttnBlock) for b in blocks)


def test_timestep_embedding_distinguishes_steps():
    e = timestep_embedding(torch.tensor([0, 1, 500]), 16)
    assert e.shape == (3, 16) and (e[0] - e[1]).abs().max() > 1e-2


def test_label_changes_output():
    model = UNet(TINY)
    x, t = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1), torch.tensor([10, 10])
    out = model(x, t, torch.tensor([3, 7]))
    assert (out[0] - out[1]).abs().max() > 1e-4


def _grad_of(model, name):
    return dict(model.named_parameters())[name].grad


def test_wq_wk_receive_gradients():
    """With L >= 2 context tokens every W_q and W_k gets a non-zero gradient."""
    model = UNet(TINY)
    d = Diffusion(DiffusionConfig(timesteps=50, p_uncond=0.0, sample_guidance=1.0))
    d.loss(model, torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)).backward()
    names = [n for n, _ in model.named_parameters() if n.endswith(("to_q.weight", "to_k.weight"))]
    assert len(names) == 2 * sum(isinstance(m, ResnetBlock) for m in model.modules())
    for n in names:
        assert _grad_of(model, n).abs().max() > 0, f"{n} got zero gradient"


def test_single_context_token_starves_wq_wk():
    """The bug the config refuses: over ONE key the softmax is 1, so W_q, W_k get exactly 0."""
    attn = CrossAttention(dim=8, context_dim=4, heads=2)
    attn(torch.randn(2, 10, 8), torch.randn(2, 1, 4)).square().sum().backward()
    g_v = attn.to_v.weight.grad.abs().max()
    assert g_v > 1e-2     # numerically ~1e-8 (softmax rounding), analytically exactly zero:
    assert attn.to_q.weight.grad.abs().max() < 1e-6 * g_v and attn.to_k.weight.grad.abs().max() < 1e-6 * g_v


def test_overfit_one_batch():
    """Fixed x_0, t and noise: fifty Adam steps cut the loss by a large factor (16x by step 30)."""
    torch.manual_seed(0)
    model = UNet(TINY)
    d = Diffusion(DiffusionConfig(timesteps=50))
    x0, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4)
    t, noise = torch.tensor([5, 15, 25, 40]), torch.randn(4, 1, 28, 28)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = (model(d.q_sample(x0, t, noise), t, y) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"{losses[0]:.3f} -> {losses[-1]:.3f}"
