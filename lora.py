"""LoRA (Hu et al. 2021): fine-tune a frozen layer W through a low-rank update.

    y = x W^T + b  +  scale * scaling * dropout(x) A^T B^T,    scaling = alpha / r

Without dropout this is computed as x (W + scale * scaling * B A)^T + b: the same numbers
through one matmul (or convolution) instead of three, which is faster for small layers.
A (r x in) starts random, B (out x r) starts at zero, so training starts exactly at the base
model; only A and B (r * (in + out) numbers per layer) are trained and saved. merge() folds
the update into W for zero-overhead inference; unmerge() takes it out again. Both are
explicit calls -- never a side effect of .eval().

An nn.Conv2d is handled the same way by reading its weight (out, in, k, k) as an
(out, in*k*k) matrix: A becomes a k x k convolution to r channels, B a 1 x 1 convolution back.
"""
import hashlib
import json
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import atomic_write

ATTN = r"\.attn\.to_(q|k|v|out)$"
PRESETS = {  # regexes on the qualified names of the UNet's nn.Linear / nn.Conv2d layers
    "attn": [ATTN],                                            # the article's choice
    "attn+ff": [ATTN, r"\.ff\.net\.(0|2)$"],
    "all-linear": [ATTN, r"\.ff\.net\.(0|2)$", r"time_proj$", r"^time_mlp\.(0|2)$"],   # every nn.Linear
    "conv": [r"\.conv(1|2)$"],                                  # the ResnetBlocks' 3x3 convolutions
    "attn+conv": [ATTN, r"\.conv(1|2)$"],
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
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r   # rsLoRA: alpha / sqrt(r)
        self.scale = 1.0                    # run-time strength: 0 = base model, 1 = full adapter
        self.lora_A = nn.Parameter(torch.empty(r, w[0].numel(), device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))            # as nn.Linear does
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_scale = None            # the scale folded into W, or None when unmerged

    def forward(self, x):
        if self.merged_scale is not None or self.scale == 0:
            return self.base(x)
        s = self.scaling * self.scale
        if self.training and isinstance(self.dropout, nn.Dropout):   # dropout needs its own path
            return self.base(x) + self.low_rank(self.dropout(x)) * s
        # x W^T + s x A^T B^T = x (W + s B A)^T: the same numbers through one matmul or
        # convolution instead of three (measured faster on this small model; B A is tiny).
        return self.base_op(x, self.base.weight + self.delta_weight(self.scale).to(self.base.weight.dtype))

    def base_op(self, x, weight):
        """The wrapped layer's operation with another weight: F.linear or F.conv2d."""
        c = self.base
        if isinstance(c, nn.Linear):
            return F.linear(x, weight, c.bias)
        return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation)

    def low_rank(self, x):
        """x A^T B^T: through r numbers per position (per pixel, for a convolution)."""
        if isinstance(self.base, nn.Linear):
            return x @ self.lora_A.T @ self.lora_B.T
        c = self.base
        h = F.conv2d(x, self.lora_A.view(self.r, *c.weight.shape[1:]), None, c.stride, c.padding, c.dilation)
        return F.conv2d(h, self.lora_B[:, :, None, None])                # (B, out, H', W')

    def delta_weight(self, scale):
        """scale * scaling * B @ A, computed in float32, in the shape of W."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * (self.scaling * scale)
        return delta.view(self.base.weight.shape)

    @torch.no_grad()
    def merge(self):
        """W <- W + scale * scaling * B A. Merging twice would add the update twice: refused."""
        if self.merged_scale is not None:
            raise LoraError("already merged; unmerge() first")
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight(self.scale)).to(w.dtype))
        self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self):
        """W <- W - (the update merged earlier)."""
        if self.merged_scale is None:
            raise LoraError("not merged")
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight(self.merged_scale)).to(w.dtype))
        self.merged_scale = None


def resolve_targets(targets):
    """A preset name, or comma-separated regular expressions on qualified module names."""
    if isinstance(targets, str):
        return PRESETS.get(targets, [p for p in targets.split(",") if p])
    return list(targets)


def inject_lora(model, targets, r, alpha, dropout=0.0, use_rslora=False, types=LORA_TYPES):
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
        found = [n for n, m in modules.items() if isinstance(m, types) and re.search(pattern, n)]
        if not found:
            raise LoraError(f"target pattern {pattern!r} matches no nn.Linear or nn.Conv2d layer")
        names += [n for n in found if n not in names]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLayer(getattr(parent, child), r, alpha, dropout, use_rslora))
    return names


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


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


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_scale(model, scale):
    """Set the run-time strength of every (unmerged) LoRA layer."""
    for layer in lora_layers(model):
        layer.scale = scale


def base_fingerprint(model):
    """SHA-256 of the base weights (LoRA tensors left out, wrapper names undone): an adapter
    records the base it was trained on, and refuses any other."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.replace(".base.", ".").encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(path, model, targets, r, alpha, use_rslora, model_config, fingerprint, style=""):
    """Write only the LoRA tensors as safetensors, with what load_adapter needs to check."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    meta = {"format": "sd-lora-mnist/1", "targets": json.dumps(resolve_targets(targets)), "r": str(r),
            "layers": json.dumps(layers),
            "alpha": str(alpha), "rslora": str(bool(use_rslora)), "model_config": json.dumps(model_config),
            "base_fingerprint": fingerprint, "style": style}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), suffix=".safetensors")


def read_adapter(path):
    """-> (tensors, metadata) of an adapter file, or a LoraError naming the file."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise LoraError(f"{path}: adapter not found (run `python lora_finetune.py` first)")
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise LoraError(f"{path}: not a readable safetensors adapter ({e})") from e
    if meta.get("format") != "sd-lora-mnist/1":
        raise LoraError(f"{path}: not a LoRA adapter of this project (no sd-lora-mnist metadata)")
    return tensors, meta


def load_adapter(model, path, model_config, fingerprint=None):
    """Inject LoRA as the adapter file describes and load its tensors, checking everything:
    the base model config, the base weights' fingerprint, missing/unexpected keys, shapes."""
    tensors, meta = read_adapter(path)
    try:
        stored = json.loads(meta["model_config"])
        targets, r, alpha = json.loads(meta["targets"]), int(meta["r"]), float(meta["alpha"])
        expected_fingerprint, rslora = meta["base_fingerprint"], meta["rslora"] == "True"
    except (KeyError, ValueError) as e:
        raise LoraError(f"{path}: adapter metadata is incomplete or malformed ({e})") from e
    model_config = json.loads(json.dumps(model_config))      # tuples -> lists, as stored
    if stored != model_config:
        diff = sorted(k for k in set(stored) | set(model_config) if stored.get(k) != model_config.get(k))
        raise LoraError(f"{path}: adapter was trained on another model (config differs in {diff})")
    fingerprint = fingerprint or base_fingerprint(model)
    if expected_fingerprint != fingerprint:
        raise LoraError(f"{path}: adapter was trained on other base weights "
                        f"(fingerprint {expected_fingerprint} != this checkpoint's {fingerprint})")
    if "layers" in meta:     # the exact layers it was trained on
        inject_lora(model, ["^" + re.escape(n) + "$" for n in json.loads(meta["layers"])], r, alpha, use_rslora=rslora)
    else:                    # files from before LoRA on convolutions: their patterns meant nn.Linear
        inject_lora(model, targets, r, alpha, use_rslora=rslora, types=nn.Linear)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoraError(f"{path}: adapter keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise LoraError(f"{path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)  # strict=False is safe: keys checked just above
    return model


def remove_lora(model):
    """Put the base layer back in place of each LoraLayer (keeping W as it is, merged or not)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base)
    return model


def apply_adapters(model, paths, scales, model_config, merge=False):
    """Load one or several adapters onto a base model, each at its own strength.

    One adapter stays unmerged unless merge=True. Several are composed by merging them
    one after the other: W + sum_i scale_i * scaling_i * B_i A_i.
    """
    fingerprint = base_fingerprint(model)
    for path, scale in zip(paths, scales):
        load_adapter(model, path, model_config, fingerprint)
        set_scale(model, scale)
        if merge or len(paths) > 1:
            for layer in lora_layers(model):
                layer.merge()
            if len(paths) > 1:
                remove_lora(model)
    return model
