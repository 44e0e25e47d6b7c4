"""The cross-attention transformer block: where the label steers the image.

Stable Diffusion's change to the DDPM UNet is this block. Image tokens ask the questions
(queries); the conditioning context -- here L learned tokens per digit label -- supplies the
answers (keys, values). A feed-forward layer follows, each sub-layer with a pre-norm and a
residual, and the block hands back an image of exactly the shape it received.

capture_attention() lets a reader look inside without changing a number: see visualize.py.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention: queries from x (B, N, C), keys/values from context (B, L, D).

    q/k/v/out are plain nn.Linear so LoRA can wrap them. L must be >= 2: over a single
    context token the softmax is identically 1, the output no longer depends on q or k,
    and W_q, W_k receive exactly zero gradient.
    """

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, C = x.shape
        L = context.shape[1]
        h = self.heads
        q = self.to_q(x).view(B, N, h, C // h).transpose(1, 2)        # (B, h, N, C/h)
        k = self.to_k(context).view(B, L, h, C // h).transpose(1, 2)  # (B, h, L, C/h)
        v = self.to_v(context).view(B, L, h, C // h).transpose(1, 2)  # (B, h, L, C/h)
        out = F.scaled_dot_product_attention(q, k, v)                 # softmax(q k^T / sqrt(d)) v
        out = out.transpose(1, 2).reshape(B, N, C)                    # (B, N, C)
        return self.to_out(out)


def attention_weights(attn, x, context):
    """softmax(q k^T / sqrt(d)) of a CrossAttention, written out: (B, h, N, L), each pixel's
    weights summing to 1 over the L context tokens. These are the weights that
    F.scaled_dot_product_attention applies, fused, inside CrossAttention.forward."""
    B, N, C = x.shape
    L, h = context.shape[1], attn.heads
    q = attn.to_q(x).view(B, N, h, C // h).transpose(1, 2)             # (B, h, N, C/h)
    k = attn.to_k(context).view(B, L, h, C // h).transpose(1, 2)       # (B, h, L, C/h)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // h), dim=-1)   # (B, h, N, L)


@contextmanager
def capture_attention(model):
    """Record what every CrossAttention in `model` does, for as long as the `with` lasts.

    Yields a list; each CrossAttention call appends {"name": qualified module name,
    "weights": (B, h, N, L) attention weights, "out": (B, N, C) the sub-layer's output}.
    Forward hooks only read the module's inputs and output and recompute the weights beside
    it (one extra q and k projection): forward() is untouched, so the model's outputs are
    bit-identical with capture on or off.
    """
    records = []

    def hook(name):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs["x"]
            context = args[1] if len(args) > 1 else kwargs["context"]
            with torch.no_grad():
                weights = attention_weights(module, x, context)
            records.append({"name": name, "weights": weights, "out": out.detach()})
        return record

    handles = [m.register_forward_hook(hook(name), with_kwargs=True)
               for name, m in model.named_modules() if isinstance(m, CrossAttention)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear, applied to each image token."""

    def __init__(self, dim, mult):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttnBlock(nn.Module):
    """Transformer block over the pixels of a feature map, conditioned on a context.

    (B, C, H, W) image + (B, L, D) context -> (B, C, H, W) image. Shape-preserving, so it
    can sit inside any ResnetBlock without changing the rest of the UNet.
    """

    def __init__(self, dim, context_dim, heads, ff_mult):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, context_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, context):
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)                         # (B, H*W, C)
        tokens = tokens + self.attn(self.norm1(tokens), context)      # cross-attention + residual
        tokens = tokens + self.ff(self.norm2(tokens))                 # feed-forward + residual
        return tokens.transpose(1, 2).reshape(B, C, H, W)             # back to (B, C, H, W)
