"""Generate digits from a trained checkpoint: `python sample.py --label 7` (see --help).

Rebuilds the UNet from the checkpoint's config, loads its EMA weights and samples with
DDIM (default) or DDPM, steered by classifier-free guidance.
"""
import math
import os
import sys

import numpy as np
import torch

from checkpoint import DEFAULT_CHECKPOINT, CheckpointError, atomic_write, load_model
from config import Parser
from diffusion import Diffusion
from lora import LoraError, apply_adapters
from train import TrainingError, pick_device

SAMPLE_DEFAULTS = {"sampler": "ddim", "steps": 50, "guidance": 2.0, "eta": 0.0, "seed": 0}


class SampleError(Exception):
    """Bad sampling input; the message says which flag and why."""


def add_sampling_flags(p):
    """Flags shared by sample.py and evaluate.py, so their defaults cannot drift apart."""
    d = SAMPLE_DEFAULTS
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"(default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=d["sampler"],
                   help="ddim: few deterministic steps; ddpm: all T ancestral steps (default: ddim)")
    p.add_argument("--steps", type=int, default=d["steps"], help="DDIM steps (default: 50)")
    p.add_argument("--guidance", type=float, default=d["guidance"],
                   help="classifier-free guidance scale w; 1 = no guidance (default: 2.0)")
    p.add_argument("--eta", type=float, default=d["eta"], help="DDIM noise: 0 deterministic, 1 ~ DDPM")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA adapter (.safetensors) to apply; repeat to compose several")
    p.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                   help="strength of each --lora, in order (default: 1.0 each)")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the weights (no extra cost per step)")


def load_model_for_sampling(args, device):
    """The checkpoint's EMA model, with the --lora adapters applied. -> (model, diffusion config, ckpt)."""
    model, diff_cfg, ckpt = load_model(args.checkpoint, device)
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise SampleError(f"{len(args.lora_scale)} --lora-scale for {len(args.lora)} --lora: give one per adapter")
    scales = args.lora_scale or [1.0] * len(args.lora)
    if any(not math.isfinite(s) for s in scales):
        raise SampleError("--lora-scale must be finite")
    if args.lora:
        apply_adapters(model, args.lora, scales, ckpt["config"]["model"], merge=args.merge)
    return model, diff_cfg, ckpt


def check_sampling_args(args, timesteps):
    """Refuse what would crash or silently produce garbage."""
    if not 1 <= args.steps <= timesteps:
        raise SampleError(f"--steps {args.steps}: must be between 1 and {timesteps}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise SampleError(f"--guidance {args.guidance}: must be a finite number >= 0")
    if not 0 <= args.eta <= 1:   # also refuses nan
        raise SampleError(f"--eta {args.eta}: must be between 0 (deterministic DDIM) and 1")


def parse_label(text):
    """'7' -> [7]; 'all' -> [0..9]; anything else is an error."""
    if text == "all":
        return list(range(10))
    if not (text.isdigit() and 0 <= int(text) <= 9):
        raise SampleError(f"--label {text}: must be a digit 0..9 or 'all'")
    return [int(text)]


def generate(model, diff_cfg, labels, n, args, device, trajectory=False):
    """n samples of each label -> (images (N, 1, 28, 28) in [-1, 1], labels (N,), frames or None)."""
    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    y = torch.tensor(labels, device=device).repeat_interleave(n)
    g = torch.Generator(device).manual_seed(args.seed)
    out = diffusion.sample(model, y, args.sampler, args.steps, args.guidance, args.eta,
                           generator=g, trajectory=trajectory)
    x, frames = out if trajectory else (out, None)
    return x, y, frames


def to_uint8(x):
    """[-1, 1] float (N, 1, 28, 28) -> uint8 (N, 28, 28)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def save_trajectory(frames, path, n_cols=10, max_rows=10):
    """One row per sample, x_T on the left to x_0 on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    idx = np.linspace(0, len(frames) - 1, min(n_cols, len(frames))).round().astype(int)
    rows = min(max_rows, frames[0].shape[0])
    fig, axes = plt.subplots(rows, len(idx), figsize=(len(idx), rows + 0.4), squeeze=False)
    for r in range(rows):
        for c, i in enumerate(idx):
            axes[r, c].imshow(frames[i][r, 0].clamp(-1, 1).cpu(), cmap="gray", vmin=-1, vmax=1)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(f"step {i}", fontsize=7)
    fig.suptitle("denoising trajectory: x_T (left) to x_0 (right)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80), suffix=".png")
    plt.close(fig)


def parse_args(argv=None):
    p = Parser(description="Sample digits from a trained checkpoint.")
    p.add_argument("--label", default="7", help="digit 0..9, or 'all' for a 10-row grid (default: 7)")
    p.add_argument("--n", type=int, default=10, help="samples per label (default: 10)")
    p.add_argument("--out", default=None, help="PNG path (default: <checkpoint folder>/sample_<label>.png)")
    p.add_argument("--npz", default=None, help="also save images uint8 (N,28,28) and labels (N,) here")
    p.add_argument("--show-steps", action="store_true", help="also save the denoising trajectory figure")
    add_sampling_flags(p)
    return p.parse_args(argv)


def check_writable(path, flag):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SampleError(f"{flag} {path}: folder {folder} does not exist or is not writable")


def main(argv=None):
    args = parse_args(argv)
    labels = parse_label(args.label)
    if args.n < 1:
        raise SampleError(f"--n {args.n}: must be >= 1")
    device = pick_device(args.device)
    model, diff_cfg, _ = load_model_for_sampling(args, device)    # a missing checkpoint first
    check_sampling_args(args, diff_cfg.timesteps)
    out = args.out or os.path.join(os.path.dirname(args.checkpoint), f"sample_{args.label}.png")
    check_writable(out, "--out")
    if args.npz:
        check_writable(args.npz, "--npz")

    x, y, frames = generate(model, diff_cfg, labels, args.n, args, device, trajectory=args.show_steps)
    from torchvision.utils import save_image
    nrow = args.n if len(labels) > 1 else min(args.n, 10)
    atomic_write(out, lambda tmp: save_image((x + 1) / 2, tmp, format="png", nrow=nrow,
                                             padding=2, pad_value=0.5), suffix=".png")
    print(out)
    if args.npz:
        atomic_write(args.npz, lambda tmp: np.savez(tmp, images=to_uint8(x), labels=y.cpu().numpy()),
                     suffix=".npz")
        print(args.npz)
    if args.show_steps:
        steps_path = os.path.splitext(out)[0] + "_steps.png"
        save_trajectory(frames, steps_path)
        print(steps_path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SampleError, CheckpointError, TrainingError, LoraError) as e:
        sys.exit(f"sample.py: error: {e}")
