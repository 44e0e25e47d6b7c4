"""LoRA (Hu et al. 2021): fine-tune a frozen layer W through a low-rank update.

    y = base(x) + scale * scaling * B(A(dropout(x))),    scaling = alpha / r

A (r x in) maps the input down to r numbers, B (out x r) maps them back up: a detour
beside the frozen layer whose weight update is dW = scale * scaling * B A, of rank <= r.
A starts random, B starts at zero, so training starts exactly at the base model; only A
and B (r * (in + out) numbers per layer) are trained and saved. merge() folds dW into W
for zero-overhead inference; unmerge() takes it out again. Both are explicit calls --
never a side effect of .eval().

An nn.Conv2d is handled the same way by reading its weight (out, in, k, k) as an
(out, in*k*k) matrix: A becomes a k x k convolution to r channels, B a 1 x 1 convolution back.

forward() is the definition above. forward_fused() computes the same numbers as
x (W + dW)^T + b, one matmul (or convolution) instead of three; set_fused(model, True)
switches to it, and a test proves both agree.

How an adapter is saved, checked on load and exported for peft: harness/adapters.py.
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

QKV = r"\.attn\.to_(q|k|v)$"
ATTN = r"\.attn\.to_(q|k|v|out)$"
FF = r"\.ff\.net\.(0|2)$"
CONV = r"\.conv(1|2)$"                                          # the ResnetBlocks' 3x3 convolutions
TARGET_PRESETS = {  # regexes on the qualified names of the UNet's nn.Linear / nn.Conv2d layers
    "qkv": [QKV],                                              # the article's choice
    "attn": [ATTN],                                            # q, k, v and the output projection
    "attn+ff": [ATTN, FF],
    "all-linear": [ATTN, FF, r"time_proj$", r"^time_mlp\.(0|2)$"],   # every nn.Linear
    "conv": [CONV],
    "attn+conv": [ATTN, CONV],
    "all": [r".*"],                                            # every nn.Linear and nn.Conv2d
}
LORA_TYPES = (nn.Linear, nn.Conv2d)


class LoraError(Exception):
    """A LoRA set-up or adapter file that does not fit; the message names what differs."""


class LoraLayer(nn.Module):
    """Wraps an nn.Linear or nn.Conv2d: frozen base weight and bias, trainable lora_A and lora_B."""

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        if r < 1:
            raise LoraError(f"rank r must be >= 1, got {r}")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise LoraError("LoRA on a grouped or non-zero-padded convolution is not supported")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight                                         # (out, in) or (out, in, k, k)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r   # rsLoRA: alpha / sqrt(r)
        self.scale = 1.0                    # run-time strength: 0 = base model, 1 = full adapter
        self.lora_A = nn.Parameter(torch.empty(r, w[0].numel(), device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))            # as nn.Linear does
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_scale = None            # the scale folded into W, or None when unmerged
        self.weight_before_merge = None     # W as it was before merge(): what unmerge() puts back
        self.fused = False                  # True: forward() runs forward_fused() (see set_fused)

    def forward(self, x):
        """base(x) + (scale * alpha / r) * B(A(dropout(x))): the frozen layer plus the low-rank detour."""
        if self.merged_scale is not None or self.scale == 0:
            return self.base(x)                                  # dW is in W already, or switched off
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if self.fused and not dropping:     # dropout acts on the detour's input only: no fused form
            return self.forward_fused(x)
        return self.base(x) + (self.scale * self.scaling) * self.apply_B(self.apply_A(self.dropout(x)))

    def apply_A(self, x):
        """Down to r numbers per position: (.., in) -> (.., r), or a k x k conv (B, in, H, W) -> (B, r, H', W')."""
        if isinstance(self.base, nn.Linear):
            return x @ self.lora_A.T
        c = self.base
        return F.conv2d(x, self.lora_A.view(self.r, *c.weight.shape[1:]), None, c.stride, c.padding, c.dilation)

    def apply_B(self, h):
        """Back up: (.., r) -> (.., out), or a 1 x 1 conv (B, r, H', W') -> (B, out, H', W')."""
        if isinstance(self.base, nn.Linear):
            return h @ self.lora_B.T
        return F.conv2d(h, self.lora_B[:, :, None, None])

    def forward_fused(self, x):
        """The same numbers as forward() without dropout: x W^T + s x A^T B^T = x (W + s B A)^T,
        one matmul or convolution instead of three (B A is tiny next to the activations)."""
        w = self.base.weight
        weight = w + self.delta_weight(self.scale).to(w.dtype)   # (out, in) or (out, in, k, k)
        c = self.base
        if isinstance(c, nn.Linear):
            return F.linear(x, weight, c.bias)
        return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation)

    def delta_weight(self, scale):
        """dW = scale * scaling * B @ A, computed in float32, in the shape of W."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * (self.scaling * scale)
        return delta.view(self.base.weight.shape)

    @torch.no_grad()
    def merge(self):
        """W <- W + scale * scaling * B A. Merging twice would add the update twice: refused."""
        if self.merged_scale is not None:
            raise LoraError("already merged; unmerge() first")
        w = self.base.weight
        self.weight_before_merge = w.detach().clone()    # unmerge() restores it bit for bit
        w.copy_((w.float() + self.delta_weight(self.scale)).to(w.dtype))
        self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self):
        """W <- the W from before merge(), exactly (W + dW - dW in float32 would be off by rounding)."""
        if self.merged_scale is None:
            raise LoraError("not merged")
        self.base.weight.copy_(self.weight_before_merge)
        self.weight_before_merge, self.merged_scale = None, None


def resolve_targets(targets):
    """A preset name, or comma-separated regular expressions on qualified module names."""
    if isinstance(targets, str):
        return TARGET_PRESETS.get(targets, [p for p in targets.split(",") if p])
    return list(targets)


def inject_lora(model, targets, r, alpha, dropout=0.0, use_rslora=False):
    """Replace the nn.Linear / nn.Conv2d modules whose qualified names match `targets` by LoraLayers.

    Returns the wrapped names. A pattern that matches no such layer is an error (a silent
    no-op adapter is the classic LoRA bug), and so is wrapping a layer twice.
    """
    patterns = resolve_targets(targets)
    if not patterns:
        raise LoraError(f"no LoRA targets in {targets!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise LoraError(f"target pattern {pattern!r} is not a valid regular expression ({e})") from e
    modules = dict(model.named_modules())
    if any(isinstance(m, LoraLayer) for m in modules.values()):
        raise LoraError("the model already has LoRA layers; wrapping them again is refused")
    names = []
    for pattern in patterns:
        found = [n for n, m in modules.items() if isinstance(m, LORA_TYPES) and re.search(pattern, n)]
        if not found:
            alone = f" (a preset name is used alone: --targets {pattern})" if pattern in TARGET_PRESETS else ""
            raise LoraError(f"target pattern {pattern!r} matches no nn.Linear or nn.Conv2d layer{alone}")
        names += [n for n in found if n not in names]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLayer(getattr(parent, child), r, alpha, dropout, use_rslora))
    return names


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def named_lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def mark_only_lora_trainable(model):
    """requires_grad on parameters (not modules): True for lora_A/lora_B, False for the rest."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def param_groups(model, lr, ratio_b=1.0):
    """Optimizer groups for the trainable LoRA tensors: A at lr, B at ratio_b * lr. LoRA+
    (Hayou et al. 2024) shows B should learn faster than A; ratio_b = 1 is plain LoRA."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if ratio_b == 1.0:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    return [{"params": [p for n, p in trainable if not n.endswith("lora_B")], "lr": lr},
            {"params": [p for n, p in trainable if n.endswith("lora_B")], "lr": lr * ratio_b}]


def lora_state_dict(model):
    """Only the LoRA tensors: what an adapter file holds."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


MAX_SCALE = 100.0   # |scale| beyond this is no style any more: the update swamps W and samples saturate


def check_scale(scale, what="LoRA scale"):
    """A run-time strength must be a finite number with |scale| <= MAX_SCALE."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise LoraError(f"{what} {scale}: must be a finite number between -{MAX_SCALE:g} and {MAX_SCALE:g}")
    return float(scale)


def set_scale(model, scale):
    """Set the run-time strength of every (unmerged) LoRA layer (|scale| <= MAX_SCALE)."""
    check_scale(scale)
    for layer in lora_layers(model):
        layer.scale = scale


def set_fused(model, fused=True):
    """Run every LoRA layer through forward_fused() (True) or the readable forward() (False).
    Same numbers; the fused form is one op per layer. Training with dropout always reads."""
    for layer in lora_layers(model):
        layer.fused = fused


def remove_lora(model):
    """Put the base layer back in place of each LoraLayer (keeping W as it is, merged or not)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base)
    return model


@torch.no_grad()
def update_stats(model):
    """What LoRA learned, per wrapped layer: the size of dW = scale * scaling * B A next to the
    base W (||dW||_F / ||W||_F), and the singular values of dW as an (out, in*k*k) matrix,
    largest first: at most r are non-zero, and how fast they fall shows how much of r is used."""
    stats = []
    for name, layer in named_lora_layers(model):
        merged = layer.merged_scale is not None
        delta = layer.delta_weight(layer.merged_scale if merged else layer.scale).flatten(1)  # (out, in*k*k)
        w = layer.base.weight.float().flatten(1) - (delta if merged else 0)               # W without dW
        stats.append({"name": name, "r": layer.r, "rel_norm": (delta.norm() / w.norm()).item(),
                      "singular_values": torch.linalg.svdvals(delta).tolist()})
    return stats
