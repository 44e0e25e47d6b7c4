"""Every input and every path of the network matters, and each block computes its formula.

- UNet(x_t, t, y): the output moves with each of x_t, t and y, and each image's output
  depends on that image only.
- One loss on real digits gives every parameter a non-zero gradient (a dead path -- a
  dropped time embedding, a detached residual -- leaves some at exactly zero).
- CrossAttnBlock and ResnetBlock with their sub-layers zeroed are exactly the identity
  (the residual paths), and with them live they equal a reference written out here.
Inputs avoid saturation: >= 2 context tokens, non-zero images, moderate values.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_close

from config import DiffusionConfig
from conv_block import ResnetBlock
from cross_attn import CrossAttention, CrossAttnBlock
from dataset import load_dataset
from diffusion import Diffusion
from unet import UNet, timestep_embedding


def randomize(module, seed=0, std=0.3):
    """Replace every parameter by random values: no zero biases; norm gains 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(gain + torch.randn(p.shape, generator=g) * std)
    return module


def zero_(*layers):
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.zero_()


# ----- the time embedding -----

def test_timestep_embedding_is_the_sinusoid_formula():
    """[sin(t f_i), cos(t f_i)] with f_i = 10000^(-i / half), i = 0..half-1."""
    t = torch.tensor([0, 1, 7, 49])
    dim = 16
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * f[None]
    expected = torch.cat([args.sin(), args.cos()], dim=1)
    assert_close(timestep_embedding(t, dim).double(), expected, atol=1e-5)


# ----- the whole network -----

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(TINY).eval()


def inputs(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 28, 28, generator=g), torch.tensor([3, 17, 30, 45])[:B], torch.tensor([0, 4, 9, 10])[:B]


def rel_change(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_output_depends_on_x_t_t_and_y(model):
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        assert rel_change(model(x + 0.1 * torch.randn_like(x), t, y), out) > 1e-2, "x_t is ignored"
        for i in range(len(t)):              # each timestep and label, one at a time
            t2, y2 = t.clone(), y.clone()
            t2[i] = (t[i] + 11) % 50
            y2[i] = (y[i] + 1) % 11
            assert rel_change(model(x, t2, y)[i], out[i]) > 1e-3, f"t is ignored (image {i})"
            assert rel_change(model(x, t, y2)[i], out[i]) > 1e-3, f"y is ignored (image {i})"


def test_each_image_depends_on_itself_only(model):
    """GroupNorm, attention and the time/label embeddings work per image: no mixing in the batch."""
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        for i in range(len(x)):
            assert_close(model(x[i:i + 1], t[i:i + 1], y[i:i + 1])[0], out[i], atol=1e-5, msg=f"image {i}")
        perm = torch.tensor([2, 0, 3, 1])
        assert_close(model(x[perm], t[perm], y[perm]), out[perm], atol=1e-5, msg="permuted batch")


def real_batch():
    """One real digit of each class, timesteps across the schedule, two labels dropped."""
    x, y, _ = load_dataset("mnist-5k", split="train", verbose=False)
    idx = torch.arange(0, 4500, 450)[:10]                     # the split is sorted by class
    x0, y0 = x[idx], y[idx]
    assert set(y0.tolist()) == set(range(10))
    t = torch.linspace(0, 49, 10).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    drop = torch.tensor([False] * 8 + [True, True])
    return x0, y0, (t, noise, drop)


def dead_parameters(cfg, batch):
    """Names of the parameters whose gradient from one loss is zero (up to rounding: below
    1e-6 of the largest gradient), for a freshly initialised UNet(cfg)."""
    torch.manual_seed(0)
    model = UNet(cfg)
    x0, y0, randomness = batch
    Diffusion(DiffusionConfig(timesteps=50)).loss(model, x0, y0, randomness).backward()
    top = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    return model, [n for n, p in model.named_parameters()
                   if p.grad is None or p.grad.abs().max().item() <= 1e-6 * top]


@pytest.fixture(scope="module")
def batch():
    return real_batch()


def test_every_parameter_gets_a_gradient_from_one_loss(batch):
    """Every parameter of TINY is on the loss's path. (This caught GroupNorm with one channel
    per group erasing the time embedding at 8 channels: conv_block.norm keeps >= 2 per group.)"""
    model, dead = dead_parameters(TINY, batch)
    assert not dead, f"parameters with zero gradient: {dead}"
    # the label embedding: exactly the rows of the labels used (8 digits and the null label)
    used = set(batch[1][:8].tolist()) | {10}
    rows = (model.label_emb.weight.grad != 0).any(dim=1)
    assert {i for i in range(11) if rows[i]} == used


# ----- the cross-attention transformer block -----

def ref_attention(attn, x, ctx):
    """softmax(q k^T / sqrt(d)) v per head (heads split the channels), then to_out; float64."""
    B, N, C = x.shape
    h, dh = attn.heads, C // attn.heads
    lin = lambda layer, v: F.linear(v.double(), layer.weight.double(),
                                    None if layer.bias is None else layer.bias.double())
    q, k, v = lin(attn.to_q, x), lin(attn.to_k, ctx), lin(attn.to_v, ctx)
    heads = []
    for j in range(h):
        sl = slice(j * dh, (j + 1) * dh)
        w = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)).softmax(dim=-1)   # (B, N, L)
        heads.append(w @ v[..., sl])                                                   # (B, N, dh)
    return lin(attn.to_out, torch.cat(heads, dim=-1))


def test_cross_attention_is_multi_head_softmax_attention():
    torch.manual_seed(0)
    attn = CrossAttention(dim=8, context_dim=6, heads=2)
    x, ctx = torch.randn(3, 10, 8), torch.randn(3, 4, 6)
    out = attn(x, ctx).double()
    assert_close(out, ref_attention(attn, x, ctx), atol=1e-5)
    w = (attn.to_q(x)[..., :4] @ attn.to_k(ctx)[..., :4].transpose(1, 2) / 2).softmax(-1)
    assert w.max() < 0.99, "test set-up: the softmax must not saturate"


def ref_block(block, x, ctx):
    """tokens + attn(LN1(tokens), ctx), then + ff(LN2(.)), on (B, H*W, C) tokens; float64."""
    B, C, H, W = x.shape
    tok = x.double().flatten(2).transpose(1, 2)
    ln = lambda norm, v: F.layer_norm(v, (C,), norm.weight.double(), norm.bias.double(), norm.eps)
    tok = tok + ref_attention(block.attn, ln(block.norm1, tok).float(), ctx)
    ff = block.ff.net
    hidden = F.gelu(F.linear(ln(block.norm2, tok), ff[0].weight.double(), ff[0].bias.double()))
    tok = tok + F.linear(hidden, ff[2].weight.double(), ff[2].bias.double())
    return tok.transpose(1, 2).reshape(B, C, H, W)


def test_cross_attn_block_with_zeroed_sublayers_is_the_identity():
    torch.manual_seed(0)
    block = randomize(CrossAttnBlock(dim=8, context_dim=6, heads=2, ff_mult=2))
    x, ctx = torch.randn(2, 8, 5, 3), torch.randn(2, 3, 6)
    assert rel_change(block(x, ctx), x) > 1e-2                  # live: it changes the image
    zero_(block.attn.to_out, block.ff.net[2])                    # both residual branches output 0
    assert torch.equal(block(x, ctx), x), "zeroed sub-layers must leave exactly the residual path"


def test_cross_attn_block_equals_its_formula():
    torch.manual_seed(0)
    block = randomize(CrossAttnBlock(dim=8, context_dim=6, heads=2, ff_mult=2), std=0.4)
    x, ctx = torch.randn(2, 8, 5, 3), torch.randn(2, 3, 6)
    assert_close(block(x, ctx).double(), ref_block(block, x, ctx), atol=1e-4)
    # each residual branch on its own: the other zeroed
    only_attn = randomize(CrossAttnBlock(8, 6, 2, 2), seed=1)
    zero_(only_attn.ff.net[2])
    tok = x.flatten(2).transpose(1, 2)
    expected = (tok.double() + ref_attention(only_attn.attn, only_attn.norm1(tok), ctx)).transpose(1, 2).reshape(x.shape)
    assert_close(only_attn(x, ctx).double(), expected, atol=1e-4, msg="x + attn(LN(x))")


# ----- the ResnetBlock -----

def make_block(in_ch, out_ch, seed=0):
    torch.manual_seed(seed)
    return randomize(ResnetBlock(in_ch, out_ch, time_dim=12, context_dim=6, heads=2, ff_mult=1), seed).eval()


def block_inputs(in_ch, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, in_ch, 6, 6, generator=g), torch.randn(2, 12, generator=g),
            torch.randn(2, 3, 6, generator=g))


def ref_resnet_conv_part(b, x, t_emb):
    """conv2(SiLU(GN(conv1(SiLU(GN(x))) + time_proj(t)))) + skip(x): the part before attention."""
    h = b.conv1(F.silu(b.norm1(x)))
    h = h + b.time_proj(t_emb)[:, :, None, None]
    h = b.conv2(F.silu(b.norm2(h)))
    return h + b.skip(x)


@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (16, 32)])
def test_resnet_block_with_zeroed_sublayers_is_the_skip(in_ch, out_ch):
    b = make_block(in_ch, out_ch)
    x, t_emb, ctx = block_inputs(in_ch)
    zero_(b.conv2, b.transformer.attn.to_out, b.transformer.ff.net[2])
    out = b(x, t_emb, ctx)
    if in_ch == out_ch:
        assert torch.equal(out, x), "conv2 and the transformer zeroed: exactly the identity"
    else:
        assert_close(out, b.skip(x), atol=1e-6, msg="conv2 and the transformer zeroed: the 1x1 skip")


@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (16, 32)])
def test_resnet_block_equals_its_formula(in_ch, out_ch):
    b = make_block(in_ch, out_ch)
    x, t_emb, ctx = block_inputs(in_ch)
    h = ref_resnet_conv_part(b, x, t_emb)
    assert_close(b(x, t_emb, ctx), b.transformer(h, ctx), atol=1e-5, msg="transformer after the residual")
    zero_(b.transformer.attn.to_out, b.transformer.ff.net[2])
    assert_close(b(x, t_emb, ctx), h, atol=1e-5, msg="conv part")


def test_resnet_block_output_depends_on_the_time_embedding():
    b = make_block(16, 16)                          # 2 channels per GroupNorm group (see above)
    x, t_emb, ctx = block_inputs(16)
    zero_(b.transformer.attn.to_out, b.transformer.ff.net[2])    # the conv path alone
    out = b(x, t_emb, ctx)
    assert rel_change(b(x, t_emb + 0.5 * torch.randn_like(t_emb), ctx), out) > 1e-2


def test_resnet_block_output_depends_on_the_context():
    b = make_block(16, 32)
    x, t_emb, ctx = block_inputs(16)
    out = b(x, t_emb, ctx)
    assert rel_change(b(x, t_emb, ctx + torch.randn_like(ctx)), out) > 1e-2
