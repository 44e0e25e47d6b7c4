"""Look inside a trained model, and check the gradients of one you changed (see --help).

    python visualize.py                     figures into the checkpoint's run folder:
        attention_maps.png      cross-attention weight of each context token over the pixels
        attention_steering.png  |out(y) - out(null)| of the cross-attention: where the label steers
        one_token_trap.png      gradient norms of W_q, W_k, W_v with L tokens vs one token
        denoising.gif           x_t and the predicted x_0 over the sampling steps, digits 0..9
        img2img.png             a real digit redrawn as each label, at each strength (SDEdit)
        inpaint.png             the left half of real digits completed as each label (RePaint)
        blend.png               the context blended from 3 to 8 in 8 steps, same noise along a row
    python visualize.py --docs              ... and copies them into docs/
    python visualize.py --check [--lora F]  dead / non-finite gradients, adapter identities; exit 1 on a problem
"""
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line
import copy
import math
import os
import shutil
import sys
from dataclasses import fields, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import lora
from config import SampleConfig
from cross_attn import CrossAttention, capture_attention
from dataset import load_dataset, mnist_test_arrays
from diffusion import Diffusion
from harness.adapters import apply_adapters, load_adapter, read_adapter
from harness.cli import Parser, UsageError, config_from_args, explicit_flags, run_cli
from harness.dist import pick_device
from harness.files import (DEFAULT_CHECKPOINT, atomic_write, check_outputs, load_model, output_folder, pyplot,
                           remove_stale_temps, save_figure, shipped, shipped_unless_trained)
from harness.scripts import SampleError, add_sampling_flags, sample_config

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs")
FIGURES = ("attention", "trap", "film", "img2img", "inpaint", "blend", "negative")
NAMES = {"attention": ("attention_maps.png", "attention_steering.png"),
         "trap": ("one_token_trap.png",), "film": ("denoising.gif",),
         "img2img": ("img2img.png",), "inpaint": ("inpaint.png",), "blend": ("blend.png",),
         "negative": ("negative.png",)}
SAMPLING = frozenset(f.name for f in fields(SampleConfig))
USES = {"attention": SAMPLING | {"label"}, "trap": {"seed", "batch_size", "dataset", "data_dir"},    # flags each
        "film": SAMPLING, "img2img": SAMPLING,
        "inpaint": SAMPLING, "blend": SAMPLING, "negative": SAMPLING - {"negative"}}                  # figure reads
T_FRACTIONS = (0.9, 0.5, 0.1)      # where on the trajectory the attention is shown: t ~ 900, 500, 100 of 1000


class VisualizeError(UsageError):
    """Bad input to visualize.py; the message says which flag and why."""


# ----- sampling trajectory -----

def trajectory(model, diffusion, y, scfg):
    """Sample labels y (B,) -> (ts, frames): frames[i] (B, 1, 28, 28) is x_t at ts[i], frames[-1] = x_0."""
    g = torch.Generator(y.device).manual_seed(scfg.seed)
    _, frames = diffusion.sample(model, y, scfg, generator=g, trajectory=True)
    return diffusion.timesteps(scfg), frames


# ----- cross-attention maps and steering -----

def entropy_fraction(w, dim=-1):
    """Entropy of distributions along `dim` / log(size): 1 = uniform, 0 = all weight on one token."""
    return -(w * w.clamp_min(1e-12).log()).sum(dim) / math.log(w.shape[dim])


@torch.inference_mode()
def attention_at(model, diffusion, x_t, t, label):
    """At one x_t (1, 1, 28, 28), under `label` and under the null label (one batch of 2):
    -> x0 (2, 28, 28) predicted x_0, and one record per CrossAttention block:
       weights (2, L, H, W) mean over heads, head_entropy (2,) each head's entropy / log L
       (mean over heads and pixels), out (2, C, H, W) the attention sub-layer's output."""
    y = torch.tensor([label, diffusion.null_label], device=x_t.device)
    with capture_attention(model) as records:
        _, x0 = diffusion.predict_eps_x0(model, x_t.expand(2, -1, -1, -1), t, y, SampleConfig(guidance=1.0))
    blocks = []
    for r in records:
        w, out = r["weights"].float().cpu(), r["out"].float().cpu()    # (2, h, N, L), (2, N, C)
        H = math.isqrt(w.shape[2])
        blocks.append({"name": r["name"].removesuffix(".transformer.attn"), "H": H,
                       "weights": w.mean(1).transpose(1, 2).reshape(2, -1, H, H),
                       "head_entropy": entropy_fraction(w).mean((1, 2)),
                       "out": out.transpose(1, 2).reshape(2, -1, H, H)})
    return x0[:, 0].cpu(), blocks


def attention_study(model, diffusion, label, scfg):
    """Sample one `label` digit and look at its cross-attention at t ~ 0.9 T, 0.5 T, 0.1 T.
    -> list of {t, x_t (28, 28), x0 (2, 28, 28) [label, null], blocks} along the trajectory."""
    device = diffusion.betas.device
    ts, frames = trajectory(model, diffusion, torch.tensor([label], device=device), scfg)
    picks = sorted({min(range(len(ts)), key=lambda i: abs(ts[i] - f * diffusion.T)) for f in T_FRACTIONS})
    study = []
    for i in picks:
        x0, blocks = attention_at(model, diffusion, frames[i], ts[i], label)
        study.append({"t": ts[i], "x_t": frames[i][0, 0].cpu(), "x0": x0, "blocks": blocks})
    return study


def by_level(blocks):
    """{H: [blocks at that resolution]}, finest first (28, 14, 7)."""
    levels = {}
    for b in blocks:
        levels.setdefault(b["H"], []).append(b)
    return dict(sorted(levels.items(), reverse=True))


def steering(block):
    """|out(y) - out(null)| of one block's cross-attention, mean over channels: (H, W)."""
    return (block["out"][0] - block["out"][1]).abs().mean(0)


def attention_stats(study):
    """Per timestep and level, for the label (not the null label), min..max over the blocks there:
    entropy of the head-mean weights / log L (mean over pixels) and of each head's weights;
    token std: std over pixels of a token's head-mean weight (mean over tokens); steer:
    mean over pixels and channels of |out(y) - out(null)|, and its spatial contrast (std / mean
    over pixels); out: mean of |out(y)|, for scale."""
    rows = []
    for s in study:
        for H, blocks in by_level(s["blocks"]).items():
            w = torch.stack([b["weights"][0] for b in blocks])                    # (n, L, H, W)
            ent = entropy_fraction(w, dim=1).mean((1, 2))                          # (n,)
            std = w.flatten(2).std(-1).mean(1)                                     # (n,)
            steer = torch.stack([steering(b) for b in blocks]).flatten(1)          # (n, H*W)
            out = torch.stack([b["out"][0].abs().mean() for b in blocks])
            head_ent = torch.stack([b["head_entropy"][0] for b in blocks])
            rows.append({"t": s["t"], "level": H, "blocks": len(blocks),
                         **{k: (v.min().item(), v.max().item()) for k, v in
                            (("entropy", ent), ("head_entropy", head_ent), ("token_std", std),
                             ("steer", steer.mean(1)), ("steer_contrast", steer.std(1) / steer.mean(1).clamp_min(1e-12)),
                             ("out", out))}})
    return rows


def format_stats(rows):
    keys = ("entropy", "head_entropy", "token_std", "steer", "steer_contrast", "out")
    lines = ["   t  level  blocks  entropy/logL  per-head     token std    |out(y)-out(null)| "
             "(std/mean)    |out(y)|"]
    for r in rows:
        lines.append(f"{r['t']:4d}  {r['level']:2d}x{r['level']:<2d}  {r['blocks']:4d}    "
                     + "  ".join(f"{r[k][0]:.3f}-{r[k][1]:.3f}" for k in keys))
    return "\n".join(lines)


def plot_attention_maps(study, label, path):
    """Rows: (t, label) and (t, null); columns: predicted x_0, then each level's L token maps
    (head-mean, block-mean), on one diverging scale centred on 1/L (uniform attention)."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    levels = list(by_level(study[0]["blocks"]))
    L = study[0]["blocks"][0]["weights"].shape[1]
    maps = [[torch.stack([b["weights"][row] for b in blocks]).mean(0) for blocks in by_level(s["blocks"]).values()]
            for s in study for row in (0, 1)]                                     # [row][level] (L, H, W)
    d = max(max((m - 1 / L).abs().max().item() for m in row) for row in maps) or 1e-6
    norm = TwoSlopeNorm(vcenter=1 / L, vmin=1 / L - d, vmax=1 / L + d)
    cols = 1 + L * len(levels)
    fig, axes = plt.subplots(len(maps), cols, figsize=(0.8 * cols + 1.2, 0.8 * len(maps) + 0.7), squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.9, top=1 - 0.55 / (0.8 * len(maps) + 0.7), bottom=0.02,
                        wspace=0.06, hspace=0.06)
    for r, row in enumerate(maps):
        s, which = study[r // 2], r % 2
        axes[r, 0].imshow(s["x0"][which].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axes[r, 0].set_ylabel(f"t={s['t']}\n{'y=' + str(label) if which == 0 else 'null'}", fontsize=7)
        for j, m in enumerate(row):
            for k in range(L):
                im = axes[r, 1 + j * L + k].imshow(m[k].numpy(), cmap="RdBu_r", norm=norm, interpolation="nearest")
                if r == 0:
                    axes[r, 1 + j * L + k].set_title(f"{levels[j]}x{levels[j]} tok {k}", fontsize=6)
    axes[0, 0].set_title("pred. x_0", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_axes([0.915, 0.1, 0.012, 0.75])).ax.tick_params(labelsize=7)
    fig.suptitle(f"cross-attention weight of each of the L={L} context tokens over the pixels, mean over heads and "
                 f"blocks; digit {label} and the null label.\nColour centred on 1/L = {1 / L:.2f} (uniform "
                 f"attention), full range {1 / L - d:.3f}..{1 / L + d:.3f}", fontsize=8)
    save_figure(fig, path)


def plot_steering(study, label, path):
    """Rows: timesteps; columns: x_t, predicted x_0 for the label and for null, |x_0(y) - x_0(null)|,
    then per level |out(y) - out(null)| of the cross-attention (mean over channels and blocks),
    each level on its own min..max scale (shared over timesteps; the range is in its title)."""
    plt = pyplot()
    levels = list(by_level(study[0]["blocks"]))
    steer = [[torch.stack([steering(b) for b in blocks]).mean(0) for blocks in by_level(s["blocks"]).values()]
             for s in study]                                                      # [t][level] (H, W)
    lims = [(min(row[j].min().item() for row in steer), max(row[j].max().item() for row in steer))
            for j in range(len(levels))]
    cols = 4 + len(levels)
    fig, axes = plt.subplots(len(study), cols, figsize=(1.1 * cols + 0.3, 1.1 * len(study) + 0.75), squeeze=False)
    gray = dict(cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    for r, s in enumerate(study):
        axes[r, 0].imshow(s["x_t"].numpy(), **gray)
        axes[r, 0].set_ylabel(f"t={s['t']}", fontsize=8)
        axes[r, 1].imshow(s["x0"][0].numpy(), **gray)
        axes[r, 2].imshow(s["x0"][1].numpy(), **gray)
        axes[r, 3].imshow((s["x0"][0] - s["x0"][1]).abs().numpy(), cmap="magma", vmin=0, vmax=2, interpolation="nearest")
        for j, m in enumerate(steer[r]):
            axes[r, 4 + j].imshow(m.numpy(), cmap="magma", vmin=lims[j][0], vmax=max(lims[j][1], lims[j][0] + 1e-6),
                                  interpolation="nearest")
    for j, title in enumerate(["x_t", f"x_0 | {label}", "x_0 | null", "|x_0(y)-x_0(null)|\n(0..2)"]
                              + [f"{H}x{H} attn\n({lo:.3f}..{hi:.3f})" for H, (lo, hi) in zip(levels, lims)]):
        axes[0, j].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"where label {label} steers: predicted x_0 under the label and under null, and "
                 "|out(y) - out(null)| of the cross-attention\n(mean over channels and blocks per level; "
                 "each level on its own min..max scale, bright = the label changes this pixel more)", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


# ----- the one-token trap -----

def one_token_model(model):
    """A copy of `model` whose labels have one context token each: token 0 of their L.

    ModelConfig refuses context_tokens=1 -- that refusal is the point -- so the copy's config
    is a shallow copy edited after construction, bypassing __post_init__ on purpose, and its
    label embedding is rebuilt for one token. Every other weight is the original's.
    """
    one = copy.deepcopy(model)
    cfg = copy.copy(model.cfg)
    cfg.context_tokens = 1
    D = cfg.context_dim
    one.cfg = cfg
    one.label_emb = nn.Embedding(cfg.num_classes + 1, D).to(model.label_emb.weight.device)
    with torch.no_grad():
        one.label_emb.weight.copy_(model.label_emb.weight[:, :D])
    return one


def real_batch(dataset, data_dir, n, device, seed=0):
    """n real training digits, the same number of each label 0..9 (so every label row is used)."""
    x, y, _ = load_dataset(dataset, data_dir, "train", verbose=False)
    g = torch.Generator().manual_seed(seed)
    per = math.ceil(n / 10)
    idx = torch.cat([torch.nonzero(y == d)[:, 0][torch.randperm(int((y == d).sum()), generator=g)[:per]]
                     for d in range(10)])[:n]
    return x[idx].to(device), y[idx].to(device)


def batch_randomness(diffusion, x0, seed=0):
    """(t, noise, drop) for Diffusion.loss, seeded; every 8th label dropped to null, so the
    null label's tokens are in every batch however small p_uncond is."""
    g = torch.Generator(x0.device).manual_seed(seed)
    t, noise, drop = diffusion.draw(x0.shape[0], x0.shape[1:], x0.device, generator=g)
    drop[::8] = True
    return t, noise, drop


def qkv_grad_norms(model, diffusion, x0, y, randomness):
    """Backward of the diffusion loss on one batch -> {block: (|grad W_q|, |grad W_k|, |grad W_v|)}."""
    model.zero_grad(set_to_none=True)
    diffusion.loss(model, x0, y, randomness).backward()
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, CrossAttention):
            grads = [getattr(m, f"to_{p}").weight.grad for p in "qkv"]
            norms[name.removesuffix(".transformer.attn")] = tuple(0.0 if g is None else g.norm().item() for g in grads)
    model.zero_grad(set_to_none=True)
    return norms


def plot_trap(norms, one, L, path):
    """Grouped bars per block, log scale; an exact zero (not drawable on a log axis) is marked '0'."""
    plt = pyplot()
    blocks = list(norms)
    positive = [v for d in (norms, one) for vs in d.values() for v in vs if v > 0]
    lo, hi = min(positive) / 10, max(positive) * 3
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.7 * len(blocks) + 1.5), 5), sharex=True, sharey=True)
    x = np.arange(len(blocks))
    for ax, d, title in ((axes[0], norms, f"L = {L} context tokens (the model as trained)"),
                         (axes[1], one, "L = 1: the same weights, one token per label (token 0)")):
        for k, (p, colour) in enumerate(zip(("W_q", "W_k", "W_v"), ("C0", "C1", "C2"))):
            vals = np.array([d[b][k] for b in blocks])
            ax.bar(x + (k - 1) * 0.27, np.where(vals > 0, vals, np.nan), 0.27, color=colour, label=p)
            for i in np.flatnonzero(vals == 0):
                ax.text(x[i] + (k - 1) * 0.27, lo * 1.6, "0", ha="center", va="bottom", color=colour,
                        fontsize=8, fontweight="bold")
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("|gradient|", fontsize=8)
    axes[1].set_xticks(x, blocks, rotation=30, fontsize=7)
    fig.suptitle("the one-token trap: gradient norm of the cross-attention projections, one real batch\n"
                 "softmax over one key is identically 1, so W_q, W_k get 0 (or ~1e-10: rounding in the fused "
                 "attention backward)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    save_figure(fig, path)


# ----- the denoising film -----

def grey_gif_writer(levels=32):
    """matplotlib's PillowWriter, keeping each frame as `levels`-level greyscale: its RGB frames
    are quantised to a colour palette with dithering, which sprinkles noise over every grey
    pixel and makes the GIF ~10x larger. (Reaches into the writer's frame list.)"""
    from matplotlib.animation import PillowWriter
    step = 256 // levels

    class GreyGifWriter(PillowWriter):
        def grab_frame(self, **kwargs):
            super().grab_frame(**kwargs)
            self._frames[-1] = self._frames[-1].convert("L").point(lambda v: v // step * step)
    return GreyGifWriter(fps=10)


def denoising_film(model, diffusion, scfg, path, max_frames=26, hold=8, zoom=2, levels=16):
    """Animated GIF: top row x_t, bottom row the predicted x_0, one column per digit 0..9."""
    plt = pyplot()
    from matplotlib.animation import FuncAnimation
    device = diffusion.betas.device
    y = torch.arange(10, device=device)
    ts, frames = trajectory(model, diffusion, y, scfg)
    keep = sorted(set(np.linspace(0, len(ts) - 1, min(len(ts), max_frames)).round().astype(int).tolist()))
    strip = lambda x: torch.cat(list(torch.nn.functional.pad(x[:, 0].cpu(), (1, 1, 1, 1), value=0.0)), dim=1).numpy()
    shots = []
    with torch.inference_mode():
        for i in tqdm(keep, desc="film", leave=False, disable=None):
            _, x0 = diffusion.predict_eps_x0(model, frames[i], ts[i], y, scfg)
            shots.append((f"step {i + 1}/{len(ts)}, t = {ts[i]}", strip(frames[i]), strip(x0)))
    shots += [("done: x_0", strip(frames[-1]), strip(frames[-1]))] * hold     # hold the result
    # Exact pixel layout: each image pixel becomes zoom x zoom screen pixels (nearest), which
    # keeps the digits crisp and the GIF small.
    h, w = shots[0][1].shape                                                  # (30, 300)
    left, top, gap = 44, 22, 6
    W, H = left + zoom * w + 4, top + 2 * zoom * h + gap + 4
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    axes = [fig.add_axes([left / W, (H - top - (r + 1) * zoom * h - r * gap) / H, zoom * w / W, zoom * h / H])
            for r in range(2)]
    ims = [ax.imshow(img, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
           for ax, img in zip(axes, shots[0][1:])]
    for ax, name in zip(axes, ("x_t", "pred. x_0")):
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, fontsize=8)
    title = fig.text(0.5, 1 - 4 / H, shots[0][0], ha="center", va="top", fontsize=9)

    def show(k):
        title.set_text(shots[k][0])
        for im, img in zip(ims, shots[k][1:]):
            im.set_data(img)
        return ims

    anim = FuncAnimation(fig, show, frames=len(shots), blit=False)
    atomic_write(path, lambda tmp: anim.save(tmp, writer=grey_gif_writer(levels), dpi=100), suffix=".gif")
    plt.close(fig)
    return len(shots)


# ----- editing: img2img, inpainting, label blends -----

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
INPAINTED = (2, 4, 7)              # the real test digits whose left half is completed
BLEND, BLEND_STEPS, BLEND_ROWS = (3, 8), 8, 4
NEGATIVES, NEGATIVE_NOISES = ((7, 1), (9, 4), (4, 9)), 8   # (label, the digit it is steered away from); columns


def test_digit(label, device):
    """The first digit `label` of the official MNIST test set -> (1, 1, 28, 28) in [-1, 1]."""
    x, y = mnist_test_arrays()
    i = int(np.flatnonzero(y == label)[0])
    return torch.tensor(x[i], dtype=torch.float32, device=device)[None, None] / 127.5 - 1


def image_table(rows, row_names, col_names, title, path):
    """A table of digits: rows[i] (C, 1, 28, 28) in [-1, 1], named rows and columns."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(0.6 * len(rows[0]) + 1.1, 0.6 * len(rows) + 0.7),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            axes[r, c].imshow(img[0].cpu(), cmap="gray", vmin=-1, vmax=1)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(col_names[c], fontsize=7)
            if c == 0:
                axes[r, c].set_ylabel(row_names[r], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def editing_figure(fig, model, diffusion, scfg, path):
    """img2img: one real test 5 redrawn as each label 0..9 (columns) at each strength (rows).
    inpaint: the left half of real test digits (rows) completed as each label.
    blend: the context blended from 3 to 8 (columns), the same noise along each row.
    negative: a label guided away from "no label", then away from a similar digit (row pairs).
    Each sampler call starts from the same seed (--seed), so a row (img2img, inpaint) or column
    position (blend, negative) keeps its noise across the figure."""
    device = diffusion.betas.device
    labels = torch.arange(10, device=device)
    sample = lambda y, s, **edit: diffusion.sample(model, y, s, generator=torch.Generator(device).manual_seed(s.seed),
                                                  **edit)
    digits = [str(d) for d in range(10)]
    if fig == "img2img":
        five = test_digit(5, device)
        rows = [torch.cat([five, sample(labels, replace(scfg, strength=s), init=five.expand(10, -1, -1, -1))])
                for s in STRENGTHS]
        names, title = [f"s {s}" for s in STRENGTHS], "img2img: a real 5, noised to t = strength s T, redrawn as each label"
    elif fig == "inpaint":
        keep = torch.zeros(10, 1, 28, 28, device=device)
        keep[..., :14] = 1                                                   # the left half is kept
        rows = [torch.cat([test_digit(d, device) * keep[:1], sample(labels, scfg, init=test_digit(d, device)
                                                                     .expand(10, -1, -1, -1), mask=keep)])
                for d in INPAINTED]
        names, title = [f"real {d}" for d in INPAINTED], "inpainting: the left half kept, the rest drawn as each label"
    elif fig == "negative":
        rows, names = [], []
        for label, away in NEGATIVES:
            y = torch.full((NEGATIVE_NOISES,), label, device=device)
            rows += [sample(y, replace(scfg, negative=-1)), sample(y, replace(scfg, negative=away))]
            names += [f"{label}", f"{label}, not {away}"]
        digits = [f"noise {i}" for i in range(NEGATIVE_NOISES)]
        title = "negative label: guided away from 'no label', then from a digit"
    else:
        a = torch.linspace(0, 1, BLEND_STEPS, device=device)
        w = torch.zeros(BLEND_STEPS, model.cfg.num_classes + 1, device=device)
        w[:, BLEND[0]], w[:, BLEND[1]] = 1 - a, a
        cols = [sample(w[i].expand(BLEND_ROWS, -1), scfg) for i in range(BLEND_STEPS)]   # (rows, 1, 28, 28) each
        rows = [torch.stack([c[r] for c in cols]) for r in range(BLEND_ROWS)]
        digits = [f"{1 - v:.2f}/{v:.2f}" for v in a.tolist()]
        names, title = [f"noise {r}" for r in range(BLEND_ROWS)], f"label blend: context of {BLEND[0]} -> {BLEND[1]}"
    image_table(rows, names, (["input"] if fig in ("img2img", "inpaint") else []) + digits, title, path)


# ----- the check -----

def gradient_report(model, diffusion, x0, y, randomness, vanishing=1e-5):
    """Backward of the diffusion loss on one batch; every trainable parameter must get a
    finite gradient that is not zero. "Zero" includes norms below `vanishing` x the median
    tensor's: where the exact gradient is 0, float32 rounding leaves ~1e-7 of it or less (the
    fused attention backward over one context token; GroupNorm removing a constant), while
    the smallest live tensors of a trained model sit at ~4e-3 of the median (measured).
    -> (groups: {top-level module: (tensors, |grad| of the group)}, problems: [(name, what)])."""
    model.zero_grad(set_to_none=True)
    loss = diffusion.loss(model, x0, y, randomness)
    loss.backward()
    problems = [] if torch.isfinite(loss) else [("loss", f"non-finite ({loss.item()})")]
    norms = {n: None if p.grad is None else p.grad.float().norm().item()
             for n, p in model.named_parameters() if p.requires_grad}
    finite = sorted(v for v in norms.values() if v is not None and math.isfinite(v) and v > 0)
    floor = vanishing * finite[len(finite) // 2] if finite else 0.0
    groups = {}
    for name, norm in norms.items():
        if norm is None:
            problems.append((name, "no gradient (not connected to the loss)"))
        elif not math.isfinite(norm):
            problems.append((name, "non-finite gradient"))
        elif norm <= floor:
            problems.append((name, f"gradient zero (|grad| = {norm:.1e}, median tensor {floor / vanishing:.1e})"))
        parts = name.split(".")
        group = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        n, sq = groups.get(group, (0, 0.0))
        groups[group] = (n + 1, sq + (norm or 0.0) ** 2)
    model.zero_grad(set_to_none=True)
    return {k: (n, math.sqrt(sq)) for k, (n, sq) in groups.items()}, problems


@torch.no_grad()
def adapter_checks(model, path, model_config, x_t, t, y, tol=1e-4):
    """Load the adapter onto `model` (unmerged, scale 1) and check LoRA's identities.
    -> [(check, measured, ok)]; tolerances are relative to the size of the output."""
    tensors, _ = read_adapter(path)
    base = model(x_t, t, y)
    apply_adapters(model, [path], [1.0], model_config)
    state, layers = lora.lora_state_dict(model), lora.lora_layers(model)
    loaded = set(state) == set(tensors) and all(torch.equal(state[k].cpu(), v) for k, v in tensors.items())
    size = 1.0 + base.abs().max().item()
    results = [(f"{len(tensors)} adapter tensors loaded as stored ({len(layers)} layers)", "", loaded)]
    lora.set_scale(model, 0.0)
    results.append(("scale 0 == base model, max |diff|", (model(x_t, t, y) - base).abs().max().item(), None))
    lora.set_scale(model, 1.0)
    f1 = model(x_t, t, y)
    for layer in layers:
        layer.merge()
    merged = model(x_t, t, y)
    for layer in layers:
        layer.unmerge()
    results.append(("merged vs unmerged output, max |diff|", (merged - f1).abs().max().item(), None))
    results.append(("after unmerge vs before merge, max |diff|", (model(x_t, t, y) - f1).abs().max().item(), None))
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0])) for m in layers]
    model(x_t, t, y)
    for h in hooks:
        h.remove()
    worst = 0.0
    for layer in layers:       # each layer's output is linear in its scale: f(s) = f(0) + s (f(1) - f(0))
        out = {}
        for s in (0.0, 1.0, 0.5, 2.0, -1.0):
            layer.scale = s
            out[s] = layer(inputs[layer])
        layer.scale = 1.0
        ref = 1.0 + out[0.0].abs().max().item()
        worst = max(worst, max((out[s] - out[0.0] - s * (out[1.0] - out[0.0])).abs().max().item() / ref
                               for s in (0.5, 2.0, -1.0)))
    results.append(("each layer linear in scale (s = 0.5, 2, -1), max rel. dev.", worst, worst <= tol))
    results = [(c, v, ok if ok is not None else v <= tol * size) for c, v, ok in results]
    lora.set_scale(model, 0.5)
    half = model(x_t, t, y)
    lora.set_scale(model, 1.0)
    info = (half - (base + f1) / 2).abs().max().item()
    results.append(("(info) whole network at s = 0.5 vs midpoint of s = 0 and 1: not linear, max |diff|",
                    info, True))
    return results


def run_check(args, device):
    model, diff_cfg, ckpt = load_model(args.checkpoint, device)
    if args.lora:                             # a missing, foreign or other base's adapter before any work
        load_adapter(copy.deepcopy(model), args.lora, ckpt["config"]["model"])
    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    x0, y = real_batch(args.dataset, args.data_dir, args.batch_size, device, args.seed)
    randomness = batch_randomness(diffusion, x0, args.seed)
    print(f"check: {args.checkpoint}, one batch of {len(x0)} real digits ({args.dataset}), diffusion loss backward")
    groups, problems = gradient_report(model, diffusion, x0, y, randomness)
    for group, (n, norm) in groups.items():
        print(f"  {group:<12} {n:3d} tensors  |grad| {norm:.3e}")
    failed = bool(problems)
    if args.lora:
        t, noise, _ = randomness
        x_t = diffusion.q_sample(x0, t, noise)
        print(f"adapter: {args.lora}")
        for check, value, ok in adapter_checks(model, args.lora, ckpt["config"]["model"], x_t, t, y):
            print(f"  {'ok  ' if ok else 'FAIL'} {check}" + ("" if value == "" else f" {value:.2e}"))
            failed |= not ok
        lora.mark_only_lora_trainable(model)         # now the adapter's own gradients
        _, lora_problems = gradient_report(model, diffusion, x0, y, randomness)
        problems += lora_problems
        failed |= bool(lora_problems)
    for name, what in problems:
        print(f"  DEAD {name}: {what}")
    print("check: FAILED" if failed else "check: ok, every trainable parameter gets a finite, non-zero gradient")
    return 1 if failed else 0


# ----- lora_finetune.py's figures -----

def side_by_side(models, titles, diffusion, path, n=6, seed=0, scales=None):
    """One panel per model (or per LoRA scale): rows are digits 0..9, same noise in every panel."""
    plt = pyplot()
    from torchvision.utils import make_grid
    panels = []
    for model, scale in zip(models, scales or [None] * len(models)):
        if scale is not None:
            lora.set_scale(model, scale)
        device = next(model.parameters()).device
        y = torch.arange(10, device=device).repeat_interleave(n)
        x = diffusion.sample(model, y, generator=torch.Generator(device).manual_seed(seed))
        panels.append(make_grid((x.cpu() + 1) / 2, nrow=n, padding=1, pad_value=0.5)[0])
    if scales is not None:
        lora.set_scale(models[0], 1.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 3.9))
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def finetune_figures(base_model, tuned, diffusion, out, lcfg):
    """Base vs tuned samples, and (LoRA) the same noise at growing adapter strength."""
    kind = "full" if lcfg.full else "lora"
    compare = os.path.join(out, "base_vs_tuned.png")
    side_by_side([base_model, tuned], ["base model", f"{kind} ({lcfg.style})"], diffusion, compare)
    print(compare)
    if not lcfg.full:
        sweep = os.path.join(out, "strength_sweep.png")
        scales = [0.0, 0.25, 0.5, 0.75, 1.0]
        side_by_side([tuned] * 5, [f"scale {s}" for s in scales], diffusion, sweep, n=3, scales=scales)
        update = os.path.join(out, "lora_update.png")
        save_update_figure(lora.update_stats(tuned), update)
        print(sweep)
        print(update)


def save_update_figure(stats, path):
    """Two panels from update_stats(): the relative update size per layer, and each layer's
    singular values sigma_i / sigma_1 for i = 1..r (1 everywhere: all of rank r is used)."""
    plt = pyplot()
    if not stats:
        raise lora.LoraError("no LoRA layers: no update to draw")
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
    save_figure(fig, path, dpi=100)



# ----- the script -----

def parse_args(argv=None):
    p = Parser(description="Figures that look inside a trained model (cross-attention maps, where the "
                           "label steers, the one-token trap, the denoising film), or --check its gradients.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"(default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--label", type=int, default=3, help="digit 0..9 for the attention figures (default: 3)")
    p.add_argument("--figures", default=",".join(FIGURES), help=f"which, comma-separated (default: {','.join(FIGURES)})")
    p.add_argument("--docs", nargs="?", const=DOCS, default=None, metavar="DIR",
                   help=f"also copy the figures into DIR (default when given: {DOCS})")
    p.add_argument("--check", action="store_true", help="instead of figures: gradient check (exit 1 on a dead "
                   "or non-finite parameter), with --lora also the adapter's identities")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="adapter (.safetensors) to check with --check (one)")
    p.add_argument("--dataset", default="mnist-5k", choices=["mnist", "mnist-5k", "folder"],
                   help="real digits for the gradient batches (default: mnist-5k, offline)")
    p.add_argument("--data-dir", default="data", help="MNIST root or image folder (default: data)")
    p.add_argument("--batch-size", type=int, default=64, help="digits in the gradient batch (default: 64)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    add_sampling_flags(p, "sampling (attention, film and editing figures)")
    args = p.parse_args(argv)
    args.given = explicit_flags(p, argv)
    return args


def check_flags(args):
    """visualize.py's flags, checked before any work. -> the figures asked for."""
    if not 0 <= args.label <= 9:
        raise VisualizeError(f"--label {args.label}: must be a digit 0..9")
    figures = [f for f in args.figures.split(",") if f]
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown or not figures:
        raise VisualizeError(f"--figures {args.figures}: choose from {','.join(FIGURES)}")
    twice = sorted({f for f in figures if figures.count(f) > 1})
    if twice:
        raise VisualizeError(f"--figures {args.figures}: {', '.join(twice)} listed twice")
    if args.docs == "":
        raise VisualizeError("--docs is empty: name a folder (or give --docs alone for docs/)")
    if args.lora and not args.check:
        raise VisualizeError("--lora is checked with --check (the figures show the base model)")
    if len(args.lora) > 1:
        raise VisualizeError(f"--lora given {len(args.lora)} times: --check checks one adapter; run it once per adapter")
    args.lora = args.lora[0] if args.lora else None
    figure_only = sorted(args.given & ({"figures", "docs", "label"} | {f.name for f in fields(SampleConfig)}))
    if args.check and figure_only:
        raise VisualizeError(f"--check draws no figure: {', '.join('--' + f.replace('_', '-') for f in figure_only)} "
                             "would change nothing (drop them, or leave out --check)")
    if args.batch_size < 2:
        raise VisualizeError(f"--batch-size {args.batch_size}: must be >= 2")
    if not args.check:
        check_figure_flags(args, figures)
    try:                    # the flags checked before any work; a missing --guidance is the checkpoint's
        config_from_args(SampleConfig, args, guidance=SampleConfig.guidance if args.guidance is None
                         else args.guidance, steps=args.steps or SampleConfig.steps)
    except ValueError as e:
        raise VisualizeError(str(e)) from None
    return figures


def drawn_digits(fig, label):
    """The digits a figure draws with guidance (a --negative among them would be drawn unguided)."""
    return {"attention": {label}, "blend": set(BLEND), "negative": set(), "trap": set()}.get(fig, set(range(10)))


def check_figure_flags(args, figures):
    """A flag that none of the chosen figures reads, or a --negative equal to a digit one of them
    draws, would change nothing: refused in one line."""
    idle = sorted((args.given & set().union(*USES.values())) - set().union(*(USES[f] for f in figures)))
    if idle:
        flags = ", ".join("--" + f.replace("_", "-") for f in idle)
        raise VisualizeError(f"--figures {','.join(figures)}: {flags} would change nothing in "
                             f"{'that figure' if len(figures) == 1 else 'those figures'} (drop them)")
    for fig in figures:
        if args.negative in drawn_digits(fig, args.label):
            raise VisualizeError(f"--negative {args.negative}: the {fig} figure draws that digit, and guidance from a "
                                 "digit to itself is zero; pick another digit (or other --figures)")


def figure_outputs(args, figures):
    """The figures' folder (beside the checkpoint; the shipped weights: runs/weights) and file names,
    checked with their --docs copies before any work. -> (folder, names)"""
    folder = os.path.abspath(output_folder(args.checkpoint))
    if args.docs and os.path.realpath(args.docs) == os.path.realpath(folder):
        raise VisualizeError(f"--docs {args.docs}: is where the figures are written anyway (beside the checkpoint); "
                             "give another folder")
    names = [n for fig in figures for n in NAMES[fig]]
    check_outputs([("figure", os.path.join(folder, n)) for n in names]
                  + [("--docs", os.path.join(args.docs, n)) for n in names if args.docs],
                  {"--checkpoint": args.checkpoint}, create=shipped(args.checkpoint))
    if shipped(args.checkpoint):
        os.makedirs(folder, exist_ok=True)
    return folder, names


def main(argv=None):
    """The figures of the README's "How it works" (or, with --check, the gradient check)."""
    args = parse_args(argv)
    figures = check_flags(args)
    if not 0 <= args.threads <= 4096:
        raise UsageError(f"--threads {args.threads}: must be between 0 (torch's default) and 4096")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.check:
        return run_check(args, device)

    args.checkpoint = shipped_unless_trained(args.checkpoint, DEFAULT_CHECKPOINT)
    model, diff_cfg, _ = load_model(args.checkpoint, device)      # a missing checkpoint first
    try:
        scfg = sample_config(args, diff_cfg, model.cfg.num_classes)
    except SampleError as e:
        raise VisualizeError(str(e)) from None
    if "negative" in figures and scfg.guidance <= 1:
        raise VisualizeError(f"--figures negative at guidance {scfg.guidance:g}: no step is guided away from anything, "
                             "so its rows would equal the plain ones; give --guidance above 1")
    folder, names = figure_outputs(args, figures)
    remove_stale_temps([os.path.join(d, n) for d in (folder, args.docs) if d for n in names])   # a killed run's
    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    written = []
    for fig in tqdm(figures, desc="figures", disable=None):
        out = [os.path.join(folder, n) for n in NAMES[fig]]
        if fig == "attention":
            study = attention_study(model, diffusion, args.label, scfg)
            plot_attention_maps(study, args.label, out[0])
            plot_steering(study, args.label, out[1])
            print(f"cross-attention of digit {args.label} (entropy 1 = uniform over the "
                  f"L={model.cfg.context_tokens} tokens; min-max over the blocks of a level):")
            print(format_stats(attention_stats(study)))
        elif fig == "trap":
            x0, y = real_batch(args.dataset, args.data_dir, args.batch_size, device, args.seed)
            randomness = batch_randomness(diffusion, x0, args.seed)
            norms = qkv_grad_norms(model, diffusion, x0, y, randomness)
            one = qkv_grad_norms(one_token_model(model), diffusion, x0, y, randomness)
            plot_trap(norms, one, model.cfg.context_tokens, out[0])
            print(f"gradient norms |W_q| |W_k| |W_v|, L={model.cfg.context_tokens} vs L=1, one batch of {len(x0)}:")
            for b in norms:
                print(f"  {b:<8} " + " ".join(f"{v:.2e}" for v in norms[b]) + "   |   "
                      + " ".join(f"{v:.2e}" for v in one[b]))
        elif fig == "film":
            denoising_film(model, diffusion, scfg, out[0])
        else:
            editing_figure(fig, model, diffusion, scfg, out[0])
        written += out
    for path in written:
        print(path)
        if args.docs:
            dst = os.path.join(args.docs, os.path.basename(path))
            atomic_write(dst, lambda tmp: shutil.copyfile(path, tmp), suffix=os.path.splitext(path)[1])
            print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
