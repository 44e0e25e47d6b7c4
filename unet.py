"""The denoiser: a DDPM UNet whose every ResnetBlock carries a cross-attention transformer.

UNet(x_t, t, y) -> prediction (noise or v, see diffusion.py), all (B, 1, 28, 28). It knows
nothing of noise schedules. The label y in 0..9 becomes L context tokens; y = 10 is the
"null" label used for classifier-free guidance.
"""
import math

import torch
from torch import nn

from conv_block import ResnetBlock, norm


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in "Attention is all you need"."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]                                         # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=1)                                # (B, dim)


class UNet(nn.Module):
    """Encoder 28 -> 14 -> 7, middle, decoder 7 -> 14 -> 28 with skip connections."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        widths = [ch * m for m in cfg.channel_mults]
        time_dim = 4 * ch
        block = lambda i, o: ResnetBlock(i, o, time_dim, cfg.context_dim, cfg.attn_heads,
                                         cfg.ff_mult, cfg.dropout)

        self.time_mlp = nn.Sequential(nn.Linear(ch, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim), nn.SiLU())
        # Each label (and the null label) owns L learned context tokens of width D.
        self.label_emb = nn.Embedding(cfg.num_classes + 1, cfg.context_tokens * cfg.context_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Encoder: num_res_blocks blocks per level, each output kept for a skip connection.
        self.down = nn.ModuleList()
        skip_widths, w = [ch], ch
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(w, width))
                w = width
                skip_widths.append(w)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(w, w, 3, stride=2, padding=1))  # halve H, W
                skip_widths.append(w)

        self.mid = nn.ModuleList([block(w, w), block(w, w)])

        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(w + skip_widths.pop(), width))
                w = width
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(w, w, 3, padding=1)))  # double H, W

        self.norm_out = norm(w)
        self.conv_out = nn.Conv2d(w, cfg.in_channels, 3, padding=1)

    def context(self, y):
        """Labels (B,) in 0..num_classes -> context tokens (B, L, D). Weights over the labels
        (B, num_classes + 1) give the same blend of their tokens: what cross-attention sees."""
        emb = y @ self.label_emb.weight if y.is_floating_point() else self.label_emb(y)   # (B, L * D)
        return emb.view(len(y), self.cfg.context_tokens, self.cfg.context_dim)

    def forward(self, x, t, y):
        t_emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))  # (B, 4C)
        ctx = self.context(y)                                                 # (B, L, D)
        h = self.conv_in(x)                                                   # (B, C, 28, 28)
        skips = [h]
        for layer in self.down:
            h = layer(h, t_emb, ctx) if isinstance(layer, ResnetBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, t_emb, ctx)
        for layer in self.up:
            if isinstance(layer, ResnetBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), t_emb, ctx)
            else:
                h = layer(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))          # (B, 1, 28, 28)


def count_params(model):
    """Number of parameters (all, not only trainable ones)."""
    return sum(p.numel() for p in model.parameters())
