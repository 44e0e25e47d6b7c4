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
"""
import hashlib
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import atomic_write, not_a_regular_file, remove_stale_temps, shown, write_json
from config import LORA_MAX_ALPHA, LORA_MAX_R

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
            raise LoraError(f"target pattern {pattern!r} matches no nn.Linear or nn.Conv2d layer")
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


def write_safetensors(path, tensors, metadata):
    """`tensors` as a safetensors file, atomically. The bytes are made in memory and written into
    atomic_write's temp file: safetensors' save_file makes a temp file of its own (unlocked, unknown
    to remove_stale_temps) and renames it over ours."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, suffix=".safetensors")


def save_adapter(path, model, targets, r, alpha, use_rslora, model_config, fingerprint, style=""):
    """Write only the LoRA tensors as safetensors, with what load_adapter needs to check."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    layers = [n for n, _ in named_lora_layers(model)]
    meta = {"format": "sd-lora-mnist/1", "targets": json.dumps(resolve_targets(targets)), "r": str(r),
            "layers": json.dumps(layers),
            "alpha": str(alpha), "rslora": str(bool(use_rslora)), "model_config": json.dumps(model_config),
            "base_fingerprint": fingerprint, "style": style}
    write_safetensors(path, tensors, meta)


def read_adapter(path):
    """-> (tensors, metadata) of an adapter file, or a LoraError naming the file."""
    from safetensors import safe_open
    kind = not_a_regular_file(path)
    if kind:                                   # a FIFO would block the reader forever
        raise LoraError(f"{shown(path)}: is a {kind}, not an adapter file")
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
    for k, t in tensors.items():       # a result that cannot be right is an error, not a black grid
        if not t.is_floating_point():
            raise LoraError(f"{path}: tensor {k} has dtype {t.dtype}; LoRA weights are floating point")
        if not torch.isfinite(t).all():
            raise LoraError(f"{path}: tensor {k} holds non-finite values (nan or inf)")
    return tensors, meta


def load_adapter(model, path, model_config, fingerprint=None):
    """Inject LoRA as the adapter file describes and load its tensors, checking everything:
    the base model config, the base weights' fingerprint, missing/unexpected keys, shapes."""
    tensors, meta = read_adapter(path)
    if "layers" not in meta:
        raise LoraError(f"{path}: adapter predates this format (no 'layers' metadata); retrain it")
    try:
        stored = json.loads(meta["model_config"])
        layers, r, alpha = json.loads(meta["layers"]), int(meta["r"]), float(meta["alpha"])
        expected_fingerprint, rslora = meta["base_fingerprint"], meta["rslora"]
    except (KeyError, ValueError) as e:
        raise LoraError(f"{path}: adapter metadata is incomplete or malformed ({e})") from e
    problems = [what for what, ok in (
        ("model_config must be a JSON object", isinstance(stored, dict)),
        ("layers must be a list of layer names", isinstance(layers, list) and all(isinstance(n, str) for n in layers)),
        (f"r {r} must be between 1 and {LORA_MAX_R}", 1 <= r <= LORA_MAX_R),
        (f"alpha {alpha} must be a finite number in (0, {LORA_MAX_ALPHA:g}]",
         math.isfinite(alpha) and 0 < alpha <= LORA_MAX_ALPHA),
        (f"rslora {rslora!r} must be True or False", rslora in ("True", "False"))) if not ok]
    if problems:
        raise LoraError(f"{path}: adapter metadata is malformed: {'; '.join(problems)}")
    rslora = rslora == "True"
    model_config = json.loads(json.dumps(model_config))      # tuples -> lists, as stored
    if stored != model_config:
        diff = sorted(k for k in set(stored) | set(model_config) if stored.get(k) != model_config.get(k))
        raise LoraError(f"{path}: adapter was trained on another model (config differs in {diff})")
    fingerprint = fingerprint or base_fingerprint(model)
    if expected_fingerprint != fingerprint:
        raise LoraError(f"{path}: adapter was trained on other base weights "
                        f"(fingerprint {expected_fingerprint} != this checkpoint's {fingerprint})")
    inject_lora(model, ["^" + re.escape(n) + "$" for n in layers], r, alpha, use_rslora=rslora)  # exactly those
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


def save_update_figure(stats, path):
    """Two panels from update_stats(): the relative update size per layer, and each layer's
    singular values sigma_i / sigma_1 for i = 1..r (1 everywhere: all of rank r is used)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not stats:
        raise LoraError("no LoRA layers: no update to draw")
    names, y = [s["name"] for s in stats], range(len(stats))
    r = max(s["r"] for s in stats)
    ratios = torch.zeros(len(stats), r)                                # (layers, r)
    for i, s in enumerate(stats):
        sv = torch.tensor(s["singular_values"][:r])
        ratios[i, :len(sv)] = sv / sv[0] if sv[0] > 0 else sv
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 1.2 + 0.2 * len(stats)), sharey=True,
                                   gridspec_kw={"width_ratios": [2, 1]})
    ax1.barh(y, [100 * s["rel_norm"] for s in stats], color="C0")
    ax1.set(yticks=list(y), xlabel="||dW|| / ||W||  (%)", title="how much each layer changed")
    ax1.set_yticklabels(names, fontsize=7)
    ax1.invert_yaxis()                                                 # first layer on top
    im = ax2.imshow(ratios.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax2.set(xticks=range(r), xticklabels=[str(i + 1) for i in range(r)], xlabel="i",
            title="sigma_i / sigma_1 of dW")
    fig.colorbar(im, ax=ax2, fraction=0.08)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")
    plt.close(fig)


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")      # what export_peft writes, in this order


def check_peft_folder(out_dir, replace=False):
    """Refuse an out_dir that export_peft may not write into (see there); called before the work
    too, so a run that cannot export stops at once and not after its training."""
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise LoraError(f"{shown(out_dir)}: is a link or a file, not a folder of its own; refusing to write there")
    if replace:
        remove_stale_temps([os.path.join(out_dir, n) for n in PEFT_FILES])
    others = sorted(set(os.listdir(out_dir)) - set(PEFT_FILES if replace else ())) if os.path.isdir(out_dir) else []
    if others:
        raise LoraError(f"{shown(out_dir)}: holds other files ({shown(', '.join(others)[:80])}); "
                        "refusing to write an export beside them")


def export_peft(model, out_dir, replace=False):
    """Write the adapter as peft's save_pretrained does, for peft.PeftModel.from_pretrained(<the
    same base model>, out_dir): adapter_model.safetensors with keys
    base_model.model.<layer>.lora_A.weight / .lora_B.weight, and adapter_config.json. For a Conv2d
    peft keeps A as a k x k conv weight (r, in, k, k) and B as a 1 x 1 one (out, r, 1, 1).
    peft has no run-time strength: the adapter is written at scale 1.
    out_dir must be absent or empty; with replace=True (a run folder's own export, under its
    lock: --resume, --overwrite) it may also hold an earlier export's two files, which are
    replaced, and the temp files of a killed export, which are removed."""
    check_peft_folder(out_dir, replace)
    layers = named_lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers to export")
    first = layers[0][1]
    if any((m.r, m.alpha, m.use_rslora) != (first.r, first.alpha, first.use_rslora) for _, m in layers):
        raise LoraError("LoRA layers differ in r, alpha or rsLoRA; one peft config cannot describe them")
    tensors = {}
    for name, layer in layers:
        shape, key = layer.base.weight.shape, f"base_model.model.{name}"   # (out, in) or (out, in, k, k)
        if len(shape) == 4 and layer.base.dilation != (1, 1):
            raise LoraError(f"{name}: peft's LoRA convolution ignores dilation; cannot export it")
        ones = [1] * (len(shape) - 2)
        tensors[key + ".lora_A.weight"] = layer.lora_A.detach().reshape(layer.r, *shape[1:])    # (r, in[, k, k])
        tensors[key + ".lora_B.weight"] = layer.lora_B.detach().reshape(shape[0], layer.r, *ones)  # (out, r[, 1, 1])
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
              "target_modules": [n for n, _ in layers], "r": first.r, "lora_alpha": first.alpha,
              "use_rslora": first.use_rslora, "lora_dropout": getattr(first.dropout, "p", 0.0),
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}
    os.makedirs(out_dir, exist_ok=True)
    weights, config_file = (os.path.join(out_dir, n) for n in PEFT_FILES)
    write_safetensors(weights, tensors, {"format": "pt"})
    write_json(config_file, config)     # last: a folder with it is whole
