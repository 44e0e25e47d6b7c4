"""The ResnetBlock of the DDPM UNet, with Stable Diffusion's transformer inside it.

GroupNorm -> SiLU -> conv, add the time embedding, GroupNorm -> SiLU -> conv, residual;
then the cross-attention transformer block. Because that block keeps the image shape,
putting it inside the ResnetBlock is the whole change from DDPM to SD: the rest of the UNet
does not notice.
"""
from torch import nn

from cross_attn import CrossAttnBlock


def norm(channels):
    """GroupNorm: batch-size independent, so LoRA fine-tuning cannot drift it. 8 groups, but
    never fewer than 2 channels per group: a group of one channel would subtract the
    per-channel time bias added just before norm2, and the block would not see t at all."""
    return nn.GroupNorm(min(8, channels // 2), channels)


class ResnetBlock(nn.Module):
    """(B, C_in, H, W), time embedding (B, T_dim), context (B, L, D) -> (B, C_out, H, W)."""

    def __init__(self, in_ch, out_ch, time_dim, context_dim, heads, ff_mult, dropout=0.0):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)      # "where is t": one bias per channel
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()
        self.transformer = CrossAttnBlock(out_ch, context_dim, heads, ff_mult)

    def forward(self, x, t_emb, context):
        h = self.conv1(self.act(self.norm1(x)))                       # (B, C_out, H, W)
        h = h + self.time_proj(t_emb)[:, :, None, None]               # broadcast over H, W
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        h = h + self.skip(x)                                          # residual
        return self.transformer(h, context)                           # same shape out
