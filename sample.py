"""Generate digits from a trained checkpoint: `python sample.py --label 7` (see --help).

The UNet is rebuilt from the checkpoint's config with its EMA weights (and any --lora adapters:
harness/scripts.py, open_sampling); generate() then draws digits with DPM-Solver++ (default), DDIM
or DDPM, steered by classifier-free guidance (diffusion.py) -- from noise, or from an --init image
(img2img, inpainting with --mask).
"""
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line
import sys

import numpy as np
import torch
from tqdm import tqdm

from config import MAX_IMAGES, SampleConfig
from harness.cli import run_cli
from harness.files import atomic_write, pyplot, save_figure
from harness.scripts import GRID_MAX, SampleError, open_sampling

MAX_BATCH = 1000       # images per network batch, whatever --n: memory stays bounded (a CPU splits further)


def model_sampling(diff_cfg, **fields):
    """A model's default SampleConfig: the guidance its run chose (sample_guidance), the rest as
    SampleConfig says."""
    return SampleConfig(guidance=diff_cfg.sample_guidance, **fields)


def generate(model, diffusion, labels, n, scfg, trajectory=False, progress=False, init=None, mask=None):
    """n samples of each label -> (images (N, 1, 28, 28) in [-1, 1], labels (N,), frames or None).

    labels: digits, or label weights (a blend, see UNet.context). The N = n * len(labels) images
    (at most MAX_IMAGES) go through the network in batches of at most MAX_BATCH, all drawing their
    noise from one generator seeded with scfg.seed: a request of up to MAX_BATCH images is a single
    batch, the same images as unbatched. init, mask (1, 1, 28, 28): img2img / inpainting of that
    image (Diffusion.sample). frames (trajectory=True): the x_t of the first batch. progress: a bar
    over the denoising steps of all batches, with an ETA.
    """
    device = diffusion.betas.device
    y = torch.tensor(labels, device=device).repeat_interleave(n, dim=0)        # (N,) or (N, K + 1)
    if len(y) > MAX_IMAGES:
        raise SampleError(f"{len(y):,} images asked for: at most {MAX_IMAGES:,} per request")
    g = torch.Generator(device).manual_seed(scfg.seed)
    batches = y.split(MAX_BATCH)
    xs, frames = [], None
    steps = len(batches) * len(diffusion.timesteps(scfg))
    with tqdm(total=steps, desc=f"sampling {len(y)} images", unit="step", disable=None if progress else True) as bar:
        for yb in batches:
            edit = {} if init is None else {"init": init.expand(len(yb), -1, -1, -1),
                                            "mask": None if mask is None else mask.expand(len(yb), -1, -1, -1)}
            out = diffusion.sample(model, yb, scfg, generator=g, trajectory=trajectory and not xs,
                                   on_step=bar.update, **edit)
            x, frames = out if trajectory and not xs else (out, frames)
            xs.append(x)
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
    plt = pyplot()
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
    save_figure(fig, path, dpi=80)


def main(argv=None):
    """Load the model (harness), draw the digits, write the grid (and the npz, the trajectory)."""
    s = open_sampling(argv)       # flags checked, model (+ LoRA) loaded, outputs checked before any work
    args, labels = s.args, s.labels
    x, y, frames = generate(s.model, s.diffusion, labels, args.n, s.scfg, trajectory=args.show_steps,
                            progress=True, init=s.init, mask=s.mask)
    per_label = min(args.n, GRID_MAX)                               # the grid: the first GRID_MAX of each label
    grid = x.reshape(len(labels), args.n, *x.shape[1:])[:, :per_label].reshape(-1, *x.shape[1:])
    save_grid(grid, s.out, nrow=per_label if len(labels) > 1 else min(args.n, 10))
    print(s.out)
    if args.npz:
        atomic_write(args.npz, lambda tmp: np.savez(tmp, images=to_uint8(x), labels=y.cpu().numpy()),
                     suffix=".npz")
        print(args.npz)
    if args.show_steps:
        save_trajectory(frames, s.steps_path)
        print(s.steps_path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
