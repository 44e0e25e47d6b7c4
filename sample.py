"""Generate digits from a trained checkpoint: `python sample.py --label 7` (see --help).

Rebuilds the UNet from the checkpoint's config, loads its EMA weights and samples with
DDIM (default) or DDPM, steered by classifier-free guidance.
"""
import os
import sys

import numpy as np
import torch

from tqdm import tqdm

from checkpoint import (DEFAULT_CHECKPOINT, CheckpointError, atomic_write, check_outputs, load_model,
                        remove_stale_temps, shown)
from config import MAX_IMAGES, Parser, SampleConfig, add_config_flags, config_from_args
from device import DeviceError, pick_device, run_cli
from diffusion import Diffusion, SamplingError
from lora import MAX_SCALE, LoraError, apply_adapters, check_scale, set_fused

MAX_BATCH = 1000       # images per network batch, whatever --n: memory stays bounded (a CPU splits further)
GRID_MAX = 100         # images per label in the PNG grid (the npz holds them all)


class SampleError(Exception):
    """Bad sampling input; the message says which flag and why."""


def add_model_flags(p):
    """The model to sample from (checkpoint, device, LoRA adapters): shared with evaluate.py."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"(default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA adapter (.safetensors) to apply; repeat to compose several")
    p.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                   help=f"strength of each --lora, in order (default: 1.0 each); |S| <= {MAX_SCALE:g}: "
                        "beyond that the update swamps the base weights and the samples saturate")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the weights (no extra cost per step)")


def add_sampling_flags(p, group="sampling"):
    """SampleConfig's flags. --guidance stays None unless given: the checkpoint then decides."""
    add_config_flags(p, SampleConfig, group)
    p.set_defaults(guidance=None)


def model_sampling(diff_cfg, **fields):
    """A model's default SampleConfig: the guidance its run chose (sample_guidance), the rest as SampleConfig says."""
    return SampleConfig(guidance=diff_cfg.sample_guidance, **fields)


def sample_config(args, diff_cfg, **overrides):
    """The SampleConfig of the parsed flags, checked against the model's T. Without --guidance,
    the guidance the model's run chose for it (DiffusionConfig.sample_guidance; 2 by default)."""
    if args.guidance is None:
        overrides.setdefault("guidance", diff_cfg.sample_guidance)
    try:
        scfg = config_from_args(SampleConfig, args, **overrides)
        scfg.check_steps(diff_cfg.timesteps)
    except ValueError as e:
        raise SampleError(str(e)) from e
    return scfg


def load_model_for_sampling(args, device):
    """The checkpoint's EMA model with the --lora adapters applied. -> (model, diffusion, ckpt)."""
    model, diff_cfg, ckpt = load_model(args.checkpoint, device)
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise SampleError(f"{len(args.lora_scale)} --lora-scale for {len(args.lora)} --lora: give one per adapter")
    scales = [check_scale(s, "--lora-scale") for s in args.lora_scale] or [1.0] * len(args.lora)
    if args.lora:
        apply_adapters(model, args.lora, scales, ckpt["config"]["model"], merge=args.merge)
        set_fused(model, True)                   # unmerged: x (W + dW)^T, one op per layer (same numbers)
    return model, Diffusion(diff_cfg, model.cfg.num_classes).to(device), ckpt


def parse_label(text):
    """'7' -> [7]; 'all' -> [0..9]; anything else is an error."""
    if text == "all":
        return list(range(10))
    if text not in [str(d) for d in range(10)]:
        raise SampleError(f"--label {shown(text)}: must be a digit 0..9 or 'all'")
    return [int(text)]


def generate(model, diffusion, labels, n, scfg, trajectory=False, progress=False):
    """n samples of each label -> (images (N, 1, 28, 28) in [-1, 1], labels (N,), frames or None).

    The N = n * len(labels) images (at most MAX_IMAGES) go through the network in batches of
    at most MAX_BATCH, all drawing their noise from one generator seeded with scfg.seed: a
    request of up to MAX_BATCH images is a single batch, the same images as unbatched. frames
    (trajectory=True): the x_t of the first batch. progress: a progress bar over the batches.
    """
    device = diffusion.betas.device
    y = torch.tensor(labels, device=device).repeat_interleave(n)
    if len(y) > MAX_IMAGES:
        raise SampleError(f"{len(y):,} images asked for: at most {MAX_IMAGES:,} per request")
    g = torch.Generator(device).manual_seed(scfg.seed)
    xs, frames = [], None
    with tqdm(total=len(y), desc="sampling", unit="img", disable=None if progress and len(y) > MAX_BATCH else True) as bar:
        for yb in y.split(MAX_BATCH):
            out = diffusion.sample(model, yb, scfg.sampler, scfg.steps, scfg.guidance, scfg.eta,
                                   generator=g, trajectory=trajectory and not xs,
                                   guidance_interval=scfg.guidance_interval,
                                   guidance_rescale=scfg.guidance_rescale)
            x, frames = out if trajectory and not xs else (out, frames)
            xs.append(x)
            bar.update(len(yb))
    return (xs[0] if len(xs) == 1 else torch.cat(xs)), y, frames


def save_grid(x, path, nrow):
    """Images (N, 1, 28, 28) in [-1, 1] -> one PNG grid, nrow images per row."""
    from torchvision.utils import save_image
    atomic_write(path, lambda tmp: save_image((x + 1) / 2, tmp, format="png", nrow=nrow, padding=2,
                                              pad_value=0.5), suffix=".png")


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
    p.add_argument("--n", type=int, default=10,
                   help=f"samples per label (default: 10; at most {MAX_IMAGES:,} images in all)")
    p.add_argument("--out", default=None, help="PNG path (default: <checkpoint folder>/sample_<label>.png); "
                   f"the grid shows the first {GRID_MAX} samples of each label")
    p.add_argument("--npz", default=None, help="also save images uint8 (N,28,28) and labels (N,) here")
    p.add_argument("--show-steps", action="store_true", help="also save the denoising trajectory figure")
    add_model_flags(p)
    add_sampling_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    labels = parse_label(args.label)
    if not 1 <= args.n <= MAX_IMAGES // len(labels):
        raise SampleError(f"--n {args.n}: must be between 1 and {MAX_IMAGES // len(labels):,} "
                          f"(at most {MAX_IMAGES:,} images per request)")
    device = pick_device(args.device)
    model, diffusion, _ = load_model_for_sampling(args, device)    # a missing checkpoint first
    scfg = sample_config(args, diffusion.cfg)
    out = args.out or os.path.join(os.path.dirname(args.checkpoint), f"sample_{args.label}.png")
    steps_path = os.path.splitext(out)[0] + "_steps.png" if args.show_steps else None
    check_outputs({"--out": out, "--npz": args.npz, "--show-steps figure": steps_path},
                  {"--checkpoint": args.checkpoint, "--lora adapter": args.lora})     # before any work
    remove_stale_temps([out, args.npz, steps_path])                  # a killed earlier run's, of these names only

    x, y, frames = generate(model, diffusion, labels, args.n, scfg, trajectory=args.show_steps, progress=True)
    per_label = min(args.n, GRID_MAX)                               # the grid: the first GRID_MAX of each label
    grid = x.reshape(len(labels), args.n, *x.shape[1:])[:, :per_label].reshape(-1, *x.shape[1:])
    save_grid(grid, out, nrow=per_label if len(labels) > 1 else min(args.n, 10))
    print(out)
    if args.npz:
        atomic_write(args.npz, lambda tmp: np.savez(tmp, images=to_uint8(x), labels=y.cpu().numpy()),
                     suffix=".npz")
        print(args.npz)
    if args.show_steps:
        save_trajectory(frames, steps_path)
        print(steps_path)
    return 0


ERRORS = (SampleError, CheckpointError, DeviceError, LoraError, SamplingError)


def cli(argv=None):
    """main() as a command: every expected failure is one line on stderr and a non-zero exit."""
    return run_cli("sample.py", main, ERRORS, argv)


if __name__ == "__main__":
    sys.exit(cli())
