"""Each script's flags and safe set-up, so that the script itself shows only its idea.

open_training / open_finetune: flags -> configs, the run folder checked and locked (harness/run.py),
on --resume the stored configuration and checkpoint, the data on the device; what they return
also restores a resumed run's state into the freshly built model and optimiser (begin()).
open_sampling: sample.py's flags, the model with its adapters, the outputs checked. The flags
shared by sample.py, evaluate.py and visualize.py are here too.
"""
import argparse
import hashlib
import json
import os
import resource
from dataclasses import asdict, fields, replace
from types import SimpleNamespace

import numpy as np
import torch

import lora
from config import (DEFAULT_STEPS, MAX_IMAGES, PRESETS, STYLE_RECIPES, DiffusionConfig, LoraConfig, ModelConfig,
                    SampleConfig, TrainConfig, config_from_dict)
from dataset import apply_style, load_dataset
from diffusion import Diffusion
from harness.adapters import PEFT_FILES, apply_adapters, base_fingerprint, check_peft_folder, export_peft
from harness.cli import HELP, Parser, UsageError, add_config_flags, config_from_args, explicit_flags
from harness.dist import pick_device
from harness.files import (DEFAULT_CHECKPOINT, CheckpointError, check_finite, check_fits, check_folder_data_dir,
                           check_outputs, configs_from_checkpoint, dataset_of, load_checkpoint, load_model,
                           load_state, output_folder, remove_stale_temps, save_checkpoint, shipped,
                           shipped_unless_trained, shown, write_json)
from harness.run import (TrainingError, memory_format, open_run, place_data, restore_loop_state, resume_command,
                         run_length)
from lora import MAX_SCALE, check_scale, set_fused
from unet import count_params

TRAIN_FILES = ("loss.png", "samples.png", "eval_curve.csv", "eval_curve.png")   # in --out besides ckpt.pt
STEP_GRIDS = r"samples_\d{6,}\.png"           # and --sample-every's grids, one per step


def train_args(argv=None):
    """train.py's flags: one per config field, the presets, --resume / --overwrite / --figures."""
    p = Parser(prog="train.py", description="Train the label-conditioned Stable-Diffusion-style UNet on MNIST.")
    add_config_flags(p, ModelConfig, "model")
    add_config_flags(p, DiffusionConfig, "diffusion")
    add_config_flags(p, TrainConfig, "training")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: the defaults below (700 steps of 32: 22.4k images, ~2 min on 2 cores); long: the "
                        "previous default (1,470 steps of 64, lr 2e-3, EMA 0.995, uniform t: 94k images); "
                        "gpu: a wider, deeper model and longer run (9,360 steps of 256: 40 epochs of full MNIST)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its stored configuration; "
                        "--device, --threads, --max-steps, --steps, --epochs, --ckpt-every, --log-every, "
                        "--sample-every, --eval-every and --eval-n may change (a larger --steps or --epochs extends "
                        "a run, even a finished one: the LR schedule re-spans the new length); other flags that "
                        "contradict the stored run are refused")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the sample grid and loss curve at the end (--no-figures: skip them, for sweeps)")
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.given = explicit_flags(p, argv)          # --resume refuses those that contradict the stored run
    one_of_each(args)
    if "preset" in args.given:                    # ... and a preset stands for all the flags it sets but
        # its sampling default, so that a run stored before sample_guidance existed still resumes
        args.given |= set(PRESETS[preset]) - {"sample_guidance"}
    return args


def one_of_each(args):
    """A run's length is --steps or --epochs, and it is resumed or started again: never both."""
    if {"steps", "epochs"} <= set(args.given):
        raise UsageError("--steps and --epochs both size the run: give one of them")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts it again: give one of them")


def run_plan(n_images, tcfg):
    """The run's length as the progress line says it: "700 steps of 32 = 22,400 images (4.98 epochs)"."""
    total = run_length(n_images, tcfg)[1]
    images = total * tcfg.batch_size
    return f"{total:,} steps of {tcfg.batch_size} = {images:,} images ({images / n_images:.2f} epochs)"


def load_training_data(tcfg, dist):
    """Rank 0 resolves --dataset auto (downloading MNIST) before the other ranks look."""
    if dist.main:
        x, y, name = load_dataset(tcfg.dataset, tcfg.data_dir, split="train")
    name = dist.share(name if dist.main else None)
    if not dist.main:
        x, y, name = load_dataset(name, tcfg.data_dir, split="train", verbose=False)
    if len(x) < tcfg.batch_size:
        raise TrainingError(f"--batch-size {tcfg.batch_size} is larger than the dataset ({len(x)} images)")
    return x, y, name


def data_fingerprint(x, y):
    """16 hex digits of SHA-256 over the training images and labels: --resume from a moved data
    folder checks that it holds the same digits."""
    h = hashlib.sha256(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def check_folder_there(ckpt, is_folder, flag, folder):
    """--resume of a run on a folder of digits that has moved: say which flag gives its new place."""
    if ckpt is not None and is_folder and not os.path.isdir(folder):
        raise TrainingError(f"--resume: this run's {flag} {shown(folder)} is not there any more; pass {flag} with "
                            "its new place (its digits are checked against the run's)")


def check_same_digits(ckpt, flag, folder, x, y, verb):
    """The fingerprint of digits x, y; on --resume they must be the digits the run recorded."""
    fingerprint = data_fingerprint(x, y)
    if ckpt is not None and ckpt.get("data_fingerprint", fingerprint) != fingerprint:
        raise TrainingError(f"{flag} {shown(folder)}: these are not the digits this run {verb} on ({len(x):,} "
                            f"images, fingerprint {fingerprint}, the run's {ckpt['data_fingerprint']}); pass the "
                            "run's own folder")
    return fingerprint


def stored_figures(args, ckpt):
    """On --resume without --figures / --no-figures, the run's own choice: a --no-figures run stays one."""
    if ckpt is not None and "figures" not in args.given and isinstance(ckpt.get("figures"), bool):
        args.figures = ckpt["figures"]


class TrainingRun(SimpleNamespace):
    """What train.py needs to start: args, dist, device, the three configs, the checkpoint path
    (and the checkpoint itself on --resume), the locked run folder `run`, the data x, y on the
    device and its name, and `config`, the dict every checkpoint stores."""

    def begin(self, model, state):
        """Print the set-up; on --resume load weights, EMA and loop state (optimiser, schedule, RNG,
        step, losses)."""
        if self.dist.main:
            print(json.dumps(self.config))
            print(f"data: {self.data_name}, {len(self.x):,} training images | run: {run_plan(len(self.x), self.tcfg)}")
            print(f"model: {count_params(model):,} "
                  f"parameters | device: {self.device}, {torch.get_num_threads()} threads | processes: "
                  f"{self.dist.world}")
        if self.ckpt is not None:
            load_state(model, self.ckpt["model"], self.ckpt_path)
            load_state(state["ema"].module, self.ckpt["ema"], self.ckpt_path, "ema")
            restore_loop_state(state, self.ckpt, self.ckpt_path, verbose=self.dist.main)


def open_training(argv=None):
    """train.py's set-up: flags -> configs, the run folder (locked; use the result's .run in a
    `with`), on --resume the stored configuration, the data on the device. -> a TrainingRun."""
    args = train_args(argv)
    try:
        tcfg = config_from_args(TrainConfig, args)
        model_cfg, diff_cfg = config_from_args(ModelConfig, args), config_from_args(DiffusionConfig, args)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    folders = {"--data-dir folder": tcfg.data_dir} if tcfg.dataset == "folder" else {}
    dist, tcfg, ckpt_path, ckpt, run = open_run(tcfg, args.resume, args.overwrite, "ckpt.pt", TRAIN_FILES,
                                                 folders=folders, given=args.given, old_pattern=STEP_GRIDS,
                                                 sections={"model": model_cfg, "diffusion": diff_cfg})
    stored_figures(args, ckpt)
    try:
        if ckpt is not None:      # the stored configuration wins; only where/how long to run comes from flags
            model_cfg, diff_cfg = configs_from_checkpoint(ckpt, ckpt_path)
            for key in ("model", "ema"):  # before the model the stored config describes is allocated
                check_fits(model_cfg, ckpt.get(key), ckpt_path, key)
        check_folder_there(ckpt, tcfg.dataset == "folder", "--data-dir", tcfg.data_dir)
        x, y, name = load_training_data(tcfg, dist)
        fingerprint = check_same_digits(ckpt, "--data-dir", tcfg.data_dir, x, y, "trained")
        x, y = place_data(x, y, dist.device, tcfg)
    except BaseException:
        run.close()
        raise
    config = {"model": asdict(model_cfg), "diffusion": asdict(diff_cfg), "train": asdict(tcfg)}
    return TrainingRun(resume_hint=resume_command("train.py", tcfg, figures=args.figures), args=args, dist=dist,
                       device=dist.device, tcfg=tcfg, model_cfg=model_cfg, diff_cfg=diff_cfg, ckpt_path=ckpt_path,
                       ckpt=ckpt, run=run, x=x, y=y, data_name=name, config=config, data_fingerprint=fingerprint,
                       memory_format=memory_format(tcfg))


# ----- sample.py, evaluate.py, visualize.py -----

GRID_MAX = 100         # images per label in sample.py's PNG grid (the npz holds them all)


class SampleError(UsageError):
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


EDIT_FIELDS = ("strength", "jumps")     # SampleConfig fields only an --init image gives a meaning


def add_sampling_flags(p, group="sampling", editing=False, sampler="ddim"):
    """SampleConfig's flags (with editing: also --strength and --jumps, which need an --init image).
    --guidance stays None unless given: the checkpoint then decides; --steps too: the sampler's
    DEFAULT_STEPS then."""
    add_config_flags(p, SampleConfig, group, defaults={"sampler": sampler}, skip=() if editing else EDIT_FIELDS)
    p.set_defaults(guidance=None, steps=None)     # None: not given (ddpm refuses --steps; see sample_config)


def sample_config(args, diff_cfg, num_classes, **overrides):
    """The SampleConfig of the parsed flags, checked against the model's T and labels. Without
    --guidance, the guidance the model's run chose for it (DiffusionConfig.sample_guidance; 2 by default)."""
    if not -1 <= args.negative < num_classes:
        raise SampleError(f"--negative {args.negative}: must be a digit 0..{num_classes - 1} (or -1 for none)")
    if args.steps is not None and args.sampler == "ddpm":
        raise SampleError(f"--steps {args.steps}: --sampler ddpm runs all {diff_cfg.timesteps} steps of the model's T; "
                          "--steps is for ddim and dpmpp")
    swept = "guidance" in overrides and args.guidance is None          # a sweep: w varies, some w = 1
    if args.steps is None:
        overrides.setdefault("steps", min(DEFAULT_STEPS.get(args.sampler, SampleConfig.steps), diff_cfg.timesteps))
    if args.guidance is None:
        overrides.setdefault("guidance", diff_cfg.sample_guidance)
    try:
        scfg = config_from_args(SampleConfig, args, **overrides)
        scfg.check_steps(diff_cfg.timesteps)
    except ValueError as e:
        raise SampleError(str(e)) from e
    if diff_cfg.p_uncond == 0 and scfg.guidance != 1:
        raise SampleError(f"guidance {scfg.guidance:g}: this model was trained with --p-uncond 0, so it never learned "
                          "the unconditional output guidance pushes away from; sample it with --guidance 1")
    if scfg.guidance == 0 and scfg.negative >= 0:
        raise SampleError(f"--negative {scfg.negative} at guidance 0 draws that digit itself (out(neg) + 0 (out(y) - "
                          "out(neg)) = out(neg)) for every label; a negative label needs guidance above 1")
    if not swept:
        check_guidance_applies(scfg, diff_cfg)
    return scfg


def check_guidance_applies(scfg, diff_cfg):
    """--negative and --guidance-rescale act only where guidance runs: refused when no sampled step
    is guided (w = 1, or a guidance interval that holds none of the steps)."""
    diffusion = Diffusion(diff_cfg)
    guided = [t for t in diffusion.timesteps(scfg) if diffusion.guidance_at(t, scfg) != 1.0]
    given = [f for f, on in (("--negative", scfg.negative >= 0), ("--guidance-rescale", scfg.guidance_rescale > 0),
                             ("--guide-from / --guide-to", (scfg.guide_from, scfg.guide_to) != (0.0, 1.0))) if on]
    if not guided and given:
        why = ("guidance 1 runs the plain conditional model" if scfg.guidance == 1.0 else
               f"none of the {len(diffusion.timesteps(scfg))} sampled steps has {scfg.guide_from} <= t/T < {scfg.guide_to}")
        raise SampleError(f"{', '.join(given)} would change nothing: {why} (no step is guided)")


def check_each_adapter_once(paths):
    """Refuse one adapter file given twice (by another name, a link or a hard link too): the two
    would be composed into one at double strength, which --lora-scale says plainly."""
    seen = {}
    for path in paths:
        key = (os.stat(path).st_dev, os.stat(path).st_ino) if os.path.isfile(path) else path
        if key in seen:
            raise SampleError(f"--lora {path}: is the same file as --lora {seen[key]}; give it once "
                              "(--lora-scale sets its strength)")
        seen[key] = path


def load_model_for_sampling(args, device):
    """The checkpoint's EMA model with the --lora adapters applied. -> (model, diffusion, ckpt)."""
    if args.merge and not args.lora:
        raise SampleError("--merge folds --lora adapters into the weights: give --lora FILE (or drop --merge)")
    args.checkpoint = shipped_unless_trained(args.checkpoint, DEFAULT_CHECKPOINT)
    model, diff_cfg, ckpt = load_model(args.checkpoint, device)
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise SampleError(f"{len(args.lora_scale)} --lora-scale for {len(args.lora)} --lora: give one per adapter")
    scales = [check_scale(s, "--lora-scale") for s in args.lora_scale] or [1.0] * len(args.lora)
    if 0.0 in scales:
        raise SampleError("--lora-scale 0 turns its adapter off (scale 0 is the base model): drop that --lora "
                          "and its scale")
    check_each_adapter_once(args.lora)
    if args.lora:
        apply_adapters(model, args.lora, scales, ckpt["config"]["model"], merge=args.merge)
        set_fused(model, True)                   # unmerged: x (W + dW)^T, one op per layer (same numbers)
    return model, Diffusion(diff_cfg, model.cfg.num_classes).to(device), ckpt


def parse_label(text, num_classes=10):
    """'7' -> [7]; 'all' -> [0..9]; '3:0.5,8:0.5' -> [weights over the num_classes + 1 labels]:
    a blend of the two labels' context tokens (weights >= 0 that sum to 1)."""
    if text == "all":
        return list(range(num_classes))
    if text in [str(d) for d in range(num_classes)]:
        return [int(text)]
    if ":" not in text:
        raise SampleError(f"--label {shown(text)}: must be a digit 0..9, 'all', or a blend such as 3:0.5,8:0.5")
    weights = [0.0] * (num_classes + 1)
    for part in text.split(","):
        digit, _, w = part.partition(":")
        if digit not in [str(d) for d in range(num_classes)] or weights[int(digit)] or w != w.strip():
            item = shown(part) if part else "an empty item"
            raise SampleError(f"--label {shown(text)}: {item} must be digit:weight (no spaces), each digit "
                              "0..9 once")
        try:
            weights[int(digit)] = float(w)
        except ValueError:
            raise SampleError(f"--label {shown(text)}: weight {shown(w)} is not a number") from None
        if not 0 < weights[int(digit)] <= 1:
            raise SampleError(f"--label {shown(text)}: weight {shown(w)} must be in (0, 1]")
    if abs(sum(weights) - 1) > 1e-6:
        raise SampleError(f"--label {shown(text)}: the weights sum to {sum(weights):g}, not 1")
    if max(weights) == 1.0:                      # 3:1 is the label 3 (the same context, bit for bit)
        return [weights.index(1.0)]
    return [weights]


def label_name(text):
    """The --label text as a file-name part: '3:0.5,8:0.5' -> 'blend_3-0.5_8-0.5'."""
    return "blend_" + text.replace(":", "-").replace(",", "_") if ":" in text else text


def load_edit_images(args, device):
    """--init and --mask -> (init (1, 1, 28, 28) in [-1, 1], mask (1, 1, 28, 28) of 1 = keep) or
    None each. The init image is read as a digit (dataset.load_image); the mask, white = keep,
    must have the init image's size."""
    from PIL import Image, ImageOps

    from dataset import DataError, grey_levels, load_image
    if args.init is None:
        for flag, given in (("--mask", args.mask), ("--strength", args.strength != 1.0), ("--jumps", args.jumps)):
            if given:
                raise SampleError(f"{flag} edits an image: give it with --init IMAGE")
        return None, None
    if args.jumps and args.mask is None:
        raise SampleError("--jumps resamples an inpainting: give it with --mask MASK")
    try:
        init = torch.tensor(load_image(args.init), dtype=torch.float32) / 127.5 - 1      # (28, 28) in [-1, 1]
        if args.mask is None and args.strength == 1.0:
            raise SampleError("--init at --strength 1 starts from pure noise: nothing of the image would be left; "
                              "give --strength below 1 (e.g. 0.6), or a --mask")
        if args.mask is None:
            return init[None, None].to(device), None
        with Image.open(args.init) as a:
            size = ImageOps.exif_transpose(a).size                     # as load_image turned it
        load_image(args.mask)                     # the same checks: a regular, readable image
        with Image.open(args.mask) as m:
            m = ImageOps.exif_transpose(m)
            if m.size != size:
                raise SampleError(f"--mask {shown(args.mask)}: {m.size[0]}x{m.size[1]} pixels, but --init is "
                                  f"{size[0]}x{size[1]}: the mask must have the image's size")
            keep = Image.fromarray(grey_levels(m, args.mask)).resize((28, 28), Image.NEAREST)
    except DataError as e:
        raise SampleError(str(e)) from e
    mask = torch.from_numpy(np.asarray(keep) > 127).float()                            # (28, 28), 1 = keep
    if mask.all() or not mask.any():
        raise SampleError(f"--mask {shown(args.mask)}: keeps {'every' if mask.any() else 'no'} pixel (white = keep, at "
                          "28x28), so " + ("nothing would be drawn" if mask.any() else "--init would be ignored; for "
                                           "img2img drop --mask and give --strength below 1"))
    return init[None, None].to(device), mask[None, None].to(device)


def sample_args(argv=None):
    """sample.py's flags: what to draw, where to write it, the model, the sampler."""
    p = Parser(prog="sample.py", description="Sample digits from a trained checkpoint.")
    p.add_argument("--label", default="7", help="digit 0..9, 'all' for a 10-row grid, or a blend of labels' contexts "
                   "such as 3:0.5,8:0.5 (weights summing to 1) (default: 7)")
    p.add_argument("--n", type=int, default=10,
                   help=f"samples per label (default: 10; at most {MAX_IMAGES:,} images in all)")
    p.add_argument("--out", default=None, help="PNG path (default: sample_<label>.png beside the checkpoint, or beside "
                   "the first --lora adapter, as sample_<label>_<adapter>.png when it sits beside the checkpoint; "
                   "runs/weights/ for the shipped weights); "
                   f"the grid shows the first {GRID_MAX} samples of each label")
    p.add_argument("--npz", default=None, help="also save images uint8 (N,28,28) and labels (N,) here (a .npz)")
    p.add_argument("--show-steps", action="store_true", help="also save the denoising trajectory figure")
    p.add_argument("--init", default=None, metavar="IMAGE",
                   help="img2img: start from this digit image (any size; read like MNIST, white on black), noised "
                        "to t = --strength T, and redraw it as --label")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="inpainting with --init: white pixels of this image (the --init image's size) are kept, "
                        "the rest is drawn")
    add_model_flags(p)
    add_sampling_flags(p, editing=True, sampler="dpmpp")       # 10 steps: DDIM 50's digits (docs/sampling.md)
    return p.parse_args(argv)



# ----- lora_finetune.py -----

# Fine-tuning needs far fewer steps and a gentler start than training from scratch. LoRA
# learns more slowly than full fine-tuning: 840 steps (12 epochs of the 4,500 styled digits),
# and t_power 2 spends 75% of the steps on the noisier half of the process, where a digit's
# overall shape is decided.
FINETUNE_DEFAULTS = {"out": "", "steps": 840, "batch_size": 64, "lr": 2e-3, "warmup_steps": 20,
                     "ema_decay": 0.99, "t_power": 2.0, "ckpt_every": 200, "eval_n": 20}
LORA_FROM_FLAGS = ("fused", "export_peft")   # on --resume, from the command line when given: how, not what
FINETUNE_FILES = ("loss.png", "summary.json", "base_vs_tuned.png")   # in --out besides the checkpoint (+ below)
ADAPTER_FILES = ("adapter.safetensors", "lora_update.png", "strength_sweep.png", "peft")


def finetune_args(argv=None):
    """lora_finetune.py's flags: the base checkpoint, LoraConfig's and TrainConfig's fields, the data."""
    p = Parser(prog="lora_finetune.py",
               description="LoRA fine-tuning of a trained checkpoint on a new handwriting style.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"base model (default: {DEFAULT_CHECKPOINT})")
    recipes = recipe_helps()                      # --r, --lr, ...: each style's value next to the plain one
    add_config_flags(p, LoraConfig, "LoRA", helps=recipes)
    add_config_flags(p, TrainConfig, "training", defaults=FINETUNE_DEFAULTS,   # no step grids or curve here
                     skip=("dataset", "sample_every", "eval_every"),
                     helps={**recipes, "data_dir": "where the base's training digits are, which --style restyles: "
                                                   "the MNIST root (and evaluate.py's classifier cache), or a folder "
                                                   "base's own folder (your style's digits: --style-dir)",
                            "out": "run folder (default: runs/lora-<style>, or runs/full-<style> with --full)"})
    p.add_argument("--dataset", choices=["styled", "folder"], default="styled",
                   help="styled: the base's training digits in --style; folder: your digits in --style-dir")
    p.add_argument("--resume", action="store_true",
                   help="continue the fine-tuning run in --out with its stored configuration; as in train.py, "
                        "--max-steps and a larger --steps or --epochs extend it (the LR schedule re-spans the new "
                        "length), "
                        "and flags that contradict the stored run are refused")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the loss curve, base-vs-tuned, strength-sweep and update figures (--no-figures: skip them)")
    args = p.parse_args(argv)
    args.given = explicit_flags(p, argv)          # --resume refuses those that contradict the stored run
    one_of_each(args)
    lora_only = sorted(args.given & {"targets", "r", "alpha", "lora_dropout", "rslora", "lr_ratio_b", "export_peft"})
    if args.full and lora_only:
        raise UsageError(f"--full trains every weight, with no adapter: {', '.join('--' + f.replace('_', '-') for f in lora_only)}"
                         " would change nothing (drop them)")
    return args


def recipe_helps():
    """--help of the flags a style's recipe sets: the plain default, then each style's value."""
    plain = {**{f.name: f.default for f in fields(LoraConfig)}, **FINETUNE_DEFAULTS}
    names = sorted({name for recipe in STYLE_RECIPES.values() for name in recipe})
    text = lambda v: f"{v:g}" if isinstance(v, float) else str(v)          # noqa: E731
    return {name: f"{HELP[name]} (default: " + "; ".join(
        f"{text(recipe[name])} for --style {style}" for style, recipe in STYLE_RECIPES.items() if name in recipe)
        + f"; else {text(plain[name])}: config.STYLE_RECIPES)" for name in names}


def apply_recipe(args, style):
    """The style's recipe (config.STYLE_RECIPES) for every flag not given; not for --full, the
    baseline, nor on --resume, where the stored run's settings win."""
    if not (args.full or args.resume):
        for name, value in STYLE_RECIPES[style].items():
            if name not in args.given:
                setattr(args, name, value)


def stored_base(run_checkpoint, default):
    """The base checkpoint a fine-tuning run recorded (its absolute path), so that `--out DIR
    --resume` needs no --checkpoint; `default` when the run has none to show."""
    if not os.path.isfile(run_checkpoint):
        return default                                 # open_run says "--resume: no checkpoint"
    config = load_checkpoint(run_checkpoint)["config"]
    base = config.get("base") if isinstance(config, dict) else None
    if not (isinstance(base, str) and base):
        return default
    if not os.path.isfile(base):
        raise TrainingError(f"--resume: the base this run was fine-tuned from, {shown(base)}, is not there "
                            "any more; pass --checkpoint with its new path")
    return base


def stored_full(run_checkpoint, default):
    """Whether the fine-tuning run in that checkpoint is a --full one (`default` when unknown)."""
    try:
        config = load_checkpoint(run_checkpoint)["config"] if os.path.isfile(run_checkpoint) else None
    except CheckpointError:                           # open_run says what is wrong, in its own order
        return default
    lora_config = config.get("lora") if isinstance(config, dict) else None
    full = lora_config.get("full") if isinstance(lora_config, dict) else None
    return full if isinstance(full, bool) else default


def load_finetune_data(lcfg, data_dir, base_dataset):
    """Styled training digits (the base saw them only unstyled), or the user's folder."""
    if lcfg.style == "folder":
        return load_dataset("folder", lcfg.style_dir)[:2]
    x, y, _ = load_dataset(base_dataset, data_dir, "train", verbose=False)
    return apply_style(x, lcfg.style), y


class FinetuneRun(SimpleNamespace):
    """What lora_finetune.py needs to start (see open_finetune), and its safe ends: begin()
    before the loop, save_result() and summary() after it."""

    def prepare_data(self, base_ckpt):
        """The styled digits on the device; few-shot folders train on one batch of all of them."""
        self.base_data = dataset_of(base_ckpt)        # the base's data, styled (or unused)
        lcfg, resume = self.lcfg, self.resume
        if lcfg.style != "folder":
            check_folder_data_dir(base_ckpt, self.tcfg.data_dir)    # a folder base's digits: named
        check_folder_there(resume, lcfg.style == "folder", "--style-dir", lcfg.style_dir)
        x, y = load_finetune_data(lcfg, self.tcfg.data_dir, self.base_data)
        self.data_fingerprint = check_same_digits(resume, "--style-dir", lcfg.style_dir, x, y, "was tuned")
        asked = self.tcfg.batch_size                  # stored as given, so the same flags resume the run
        self.tcfg = replace(self.tcfg, dataset=self.base_data, batch_size=min(asked, len(x)))
        self.config = {"lora": asdict(self.lcfg), "train": asdict(replace(self.tcfg, batch_size=asked)),
                       "base": os.path.abspath(self.args.checkpoint)}
        self.x, self.y = place_data(x, y, self.device, self.tcfg)

    def begin(self, model, state, params, trained):
        """Print the set-up; on --resume check the run against this base and load its trained
        tensors and loop state."""
        self.fingerprint = base_fingerprint(model)
        self.trainable, self.total = sum(p.numel() for p in params), sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        if self.dist.main:
            lcfg = self.lcfg
            what = ("full fine-tuning" if lcfg.full else f"LoRA r={lcfg.r} alpha={lcfg.alpha} on "
                    f"{len(lora.lora_layers(model))} layers ({lcfg.targets})")
            print(f"base: {self.args.checkpoint} | data: {lcfg.style}, {len(self.x):,} images | {what} | "
                  f"lr {self.tcfg.lr:g}, t-power {self.tcfg.t_power:g}")
            print(f"run: {run_plan(len(self.x), self.tcfg)}")
            print(f"trainable {self.trainable:,} / {self.total:,} = {100 * self.trainable / self.total:.1f}%")
        resume, path = self.resume, self.ckpt_path
        if resume is not None:
            if resume.get("base_fingerprint") != self.fingerprint:
                raise TrainingError(f"{path}: was fine-tuned from other base weights than {self.args.checkpoint}")
            for module, key in ((model, "model"), (state["ema"].module, "ema")):
                if set(resume[key]) != set(trained(module)):
                    raise TrainingError(f"{path}: {key} tensors do not match this set-up")
                check_finite(resume[key], path, key)
                module.load_state_dict(resume[key], strict=False)  # keys checked just above
            restore_loop_state(state, resume, path, verbose=self.dist.main)

    def save_full_model(self, tuned, base_ckpt, step):
        """--full: the tuned weights as a checkpoint that sample.py reads like train.py's. -> its path."""
        path, sd = os.path.join(self.tcfg.out, "ckpt.pt"), tuned.state_dict()
        save_checkpoint(path, {"model": sd, "ema": sd, "config": base_ckpt["config"], "data": self.base_data,
                               "step": step, "finetuned": {"style": self.lcfg.style, "style_dir": self.lcfg.style_dir}})
        return path

    def export_peft(self, tuned):
        """--export-peft: the adapter in peft's format, in <out>/peft (ours, under the run's lock)."""
        if self.lcfg.export_peft:
            folder = os.path.join(self.tcfg.out, "peft")
            export_peft(tuned, folder, replace=True)
            print(f"peft adapter: {folder} (PeftModel.from_pretrained(UNet(cfg), that folder))")

    def start_summary(self, out_file, steps, seconds):
        """Print the speed and the file's size against the base. -> the start of summary.json."""
        size, base_size = os.path.getsize(out_file), os.path.getsize(self.args.checkpoint)
        ms_per_step = 1000 * seconds / max(1, steps - self.first_step)
        trainable, total = self.trainable, self.total
        print(f"trained {steps - self.first_step} steps in {seconds / 60:.1f} min ({ms_per_step:.0f} ms/step; "
              f"step {steps})")
        print(f"saved {out_file}: {size / 1024:.1f} KiB vs base checkpoint {base_size / 1024:.1f} KiB "
              f"({100 * size / base_size:.1f}%) and base weights {4 * total / 1024:.1f} KiB "
              f"({100 * size / (4 * total):.1f}%) | trainable {trainable:,} / {total:,} "
              f"= {100 * trainable / total:.1f}%")
        return {"config": self.config, "steps": steps, "ms_per_step": ms_per_step, "trainable": trainable,
                "total_params": total, "file_bytes": size, "base_checkpoint_bytes": base_size,
                "peak_rss_mb_training": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def write_summary(self, summary):
        path = os.path.join(self.tcfg.out, "summary.json")
        write_json(path, summary)
        print(path)


def open_finetune(argv=None):
    """lora_finetune.py's set-up: flags -> configs, the run folder (locked; use .run in a `with`),
    on --resume the stored configuration and the base it was tuned from. -> a FinetuneRun."""
    args = finetune_args(argv)
    try:
        folder = args.dataset == "folder" or bool(args.style_dir)        # the user's digits
        style = "folder" if folder and not (args.resume and not args.style_dir) else args.style   # --resume: stored
        apply_recipe(args, style)
        lcfg, tcfg = config_from_args(LoraConfig, args, style=style), config_from_args(TrainConfig, args, dataset="auto")
    except ValueError as e:
        raise TrainingError(str(e)) from e
    tcfg = replace(tcfg, out=tcfg.out or os.path.join("runs", f"{'full' if lcfg.full else 'lora'}-{lcfg.style}"))
    if args.resume and "checkpoint" not in args.given:       # the base the run was fine-tuned from
        args.checkpoint = stored_base(os.path.join(tcfg.out, "finetune_ckpt.pt"), args.checkpoint)
    if args.resume and "full" not in args.given:             # what the run writes: LoRA's files, or --full's
        lcfg = replace(lcfg, full=stored_full(os.path.join(tcfg.out, "finetune_ckpt.pt"), lcfg.full))
    writes = FINETUNE_FILES + (("ckpt.pt",) if lcfg.full else ADAPTER_FILES)
    given = args.given - {"dataset", "style_dir"} - set(LORA_FROM_FLAGS)   # checked below, by their own names
    dist, tcfg, ckpt_path, resume, run = open_run(
        tcfg, args.resume, args.overwrite, "finetune_ckpt.pt", writes, inputs={"--checkpoint": args.checkpoint},
        folders={"--style-dir": lcfg.style_dir} if lcfg.style_dir else {}, given=given, sections={"lora": lcfg},
        write_folders={} if lcfg.full else {"peft": PEFT_FILES}, kind="fine-tuning",
        known=FINETUNE_FILES + ("ckpt.pt",) + ADAPTER_FILES + tuple(os.path.join("peft", n) for n in PEFT_FILES))
    stored_figures(args, resume)
    try:
        if resume is not None:  # the stored configuration wins, as in train.py, but for how it is computed/exported
            lcfg = replace(config_from_dict(LoraConfig, resume["config"]["lora"]),
                           **{name: getattr(lcfg, name) for name in LORA_FROM_FLAGS if name in args.given})
            if args.given & {"dataset", "style_dir"} and folder != (lcfg.style == "folder"):
                flag = "--style-dir" if "style_dir" in args.given else f"--dataset {args.dataset}"
                tuned_on = "a folder of digits (--style-dir)" if lcfg.style == "folder" else f"{lcfg.style} digits"
                raise TrainingError(f"{flag}: this run was tuned on {tuned_on}; drop {flag} to continue it "
                                    "(or start a new run with another --out)")
            if "style_dir" in args.given and lcfg.style == "folder":    # a moved folder: checked in prepare_data
                lcfg = replace(lcfg, style_dir=args.style_dir)
        if lcfg.export_peft and dist.main:            # not after the training: refused now, if at all
            check_peft_folder(os.path.join(tcfg.out, "peft"), replace=True)
    except BaseException:
        run.close()
        raise
    hint = resume_command("lora_finetune.py", tcfg, "--checkpoint", os.path.abspath(args.checkpoint),
                          figures=args.figures)
    return FinetuneRun(args=args, dist=dist, device=dist.device, tcfg=tcfg, lcfg=lcfg, ckpt_path=ckpt_path,
                       resume=resume, run=run, memory_format=memory_format(tcfg), resume_hint=hint,
                       first_step=resume["step"] if resume is not None else 0)


class SamplingRun(SimpleNamespace):
    """sample.py's checked inputs: args, labels, the model (+ adapters), its diffusion, the
    SampleConfig, and the output paths (checked before any work)."""


def same_folder(a, b):
    """Do files a and b sit in one folder (so their default outputs would share it)?"""
    return os.path.dirname(os.path.realpath(a)) == os.path.dirname(os.path.realpath(b))


def open_sampling(argv=None):
    """sample.py's set-up: flags, the model with its --lora adapters, the SampleConfig, and the
    outputs checked against the inputs (and a killed earlier run's temp files removed)."""
    args = sample_args(argv)
    if args.out == "":
        raise SampleError("--out is empty: name a PNG file (or leave --out out for the default)")
    labels = parse_label(args.label)
    if args.npz and not isinstance(labels[0], int):
        raise SampleError("--npz stores labels 0..9 for evaluate.py; a blend has none: leave --npz out")
    if not 1 <= args.n <= MAX_IMAGES // len(labels):
        raise SampleError(f"--n {args.n}: must be between 1 and {MAX_IMAGES // len(labels):,} "
                          f"(at most {MAX_IMAGES:,} images per request)")
    device = pick_device(args.device)
    model, diffusion, _ = load_model_for_sampling(args, device)    # a missing checkpoint first
    scfg = sample_config(args, diffusion.cfg, model.cfg.num_classes)
    if scfg.negative in labels:
        raise SampleError(f"--negative {scfg.negative} is also a --label: guidance from a digit to itself is zero "
                          "(out(neg) + w (out(y) - out(neg)) = out(y)); pick another digit")
    init, mask = load_edit_images(args, device)
    beside = args.lora[0] if args.lora else args.checkpoint     # a LoRA grid goes beside its adapter
    name = "sample_" + label_name(args.label) + ("_inpaint" if mask is not None else "_img2img" if init is not None else "")
    if args.lora and not shipped(beside) and same_folder(beside, args.checkpoint):    # the base's grid is there
        name += "_" + "+".join(os.path.splitext(os.path.basename(a))[0] for a in args.lora)
    out = args.out or os.path.join(output_folder(beside), name + ".png")
    steps_path = os.path.splitext(out)[0] + "_steps.png" if args.show_steps else None
    new_folder = not args.out and shipped(beside)                   # runs/weights/, made once the checks pass
    check_outputs({"--out" if args.out else "the default output": out, "--npz": args.npz,
                   "--show-steps figure": steps_path},
                  {"--checkpoint": args.checkpoint, "--lora adapter": args.lora, "--init": args.init,
                   "--mask": args.mask}, create=new_folder)          # before any work
    for flag, path, ext in (("--out", args.out, ".png"), ("--npz", args.npz, ".npz")):
        if path and not path.lower().endswith(ext):                  # e.g. a run's summary.json: not a grid's name
            raise SampleError(f"{flag} {path}: sample.py writes {ext[1:].upper()} there; give a name ending in {ext}")
    if new_folder:
        os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_temps([out, args.npz, steps_path])                  # a killed earlier run's, of these names only
    return SamplingRun(args=args, labels=labels, model=model, diffusion=diffusion, scfg=scfg, out=out,
                       steps_path=steps_path, init=init, mask=mask)
