"""Train the label-conditioned diffusion model: `python train.py` (see --help).

The set-up of a run from scratch: flags -> configs, the run folder, the data, a fresh UNet
and its optimiser; then loop.py's flat training loop (shared with lora_finetune.py), a
sample grid, the loss curve and a short evaluation of the EMA weights.
"""
import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import evaluate
from checkpoint import (CheckpointError, atomic_write, check_fits, configs_from_checkpoint, load_state,
                        save_checkpoint)
from config import (PRESETS, DiffusionConfig, ModelConfig, Parser, TrainConfig, add_config_flags,
                    config_from_args, explicit_flags)
from dataset import DataError, load_dataset
from device import DeviceError, run_cli
from diffusion import Diffusion, SamplingError
from loop import (TrainingError, after_fit, fit, loop_state_dict, memory_format, new_loop_state, place_data,
                  open_run, restore_loop_state, resume_command, run_length)
from sample import generate, model_sampling, save_grid
from unet import UNet, count_params

RUN_FILES = ("loss.png", "samples.png", "eval_curve.csv", "eval_curve.png")   # written in --out besides ckpt.pt
STEP_GRIDS = r"samples_\d{6,}\.png"           # and --sample-every's grids, one per step


def parse_args(argv=None):
    p = Parser(description="Train the label-conditioned Stable-Diffusion-style UNet on MNIST.")
    add_config_flags(p, ModelConfig, "model")
    add_config_flags(p, DiffusionConfig, "diffusion")
    add_config_flags(p, TrainConfig, "training")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: the defaults below (on mnist-5k: 22.4k images, ~2 min on 2 cores); long: the previous "
                        "default (21 epochs of 64, lr 2e-3, EMA 0.995, uniform t: 94k images on mnist-5k); "
                        "gpu: a wider, deeper model "
                        "and longer run for full MNIST")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its stored configuration; "
                        "--device, --threads, --max-steps, --epochs, --ckpt-every, --log-every, --sample-every, "
                        "--eval-every and --eval-n may change (a larger --epochs extends a run, even a finished "
                        "one: the LR schedule re-spans the new length); other flags that contradict the stored "
                        "run are refused")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the sample grid and loss curve at the end (--no-figures: skip them, for sweeps)")
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.given = explicit_flags(p, argv)          # --resume refuses those that contradict the stored run
    if "preset" in args.given:                    # ... and a preset stands for all the flags it sets but
        # its sampling default, so that a run stored before sample_guidance existed still resumes
        args.given |= set(PRESETS[preset]) - {"sample_guidance"}
    return args


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


def save_sample_grid(model, diffusion, path, n_per_label=10):
    """One row per digit 0..9, n_per_label columns, with the run's sampling settings."""
    x, _, _ = generate(model.eval(), diffusion, list(range(10)), n_per_label, model_sampling(diffusion.cfg))
    save_grid(x, path, nrow=n_per_label)


class QualityCurve:
    """--eval-every N: every N steps a quick evaluation of the EMA weights, so that one run
    shows how quality grows with training. 10 samples per digit with DDIM 20 steps (100
    images, ~10 s on 2 CPU cores): accuracy to a few %, and the Frechet distance against the
    real-vs-real floor at the same n (100). Rows go to eval_curve.csv, the figure to
    eval_curve.png; a resumed run keeps the rows it had."""
    N_PER_DIGIT, STEPS = 10, 20
    FIELDS = ("step", "images", "train_minutes", "accuracy", "frechet", "floor", "frechet_ratio", "eval_seconds")

    def __init__(self, dataset, data_dir, out, images_per_step, resume_step=0):
        self.clf, _ = evaluate.get_classifier(dataset, data_dir)
        real_x = load_dataset(dataset, data_dir, "test", verbose=False)[0]
        self.halves = evaluate.real_halves(evaluate.classify(self.clf, real_x)[1])
        self.csv, self.png = os.path.join(out, "eval_curve.csv"), os.path.join(out, "eval_curve.png")
        self.images_per_step = images_per_step
        self.rows = [r for r in read_csv(self.csv) if int(r["step"]) <= resume_step] if resume_step else []
        self.minutes_before = float(self.rows[-1]["train_minutes"]) if self.rows else 0.0
        self.eval_seconds = 0.0                  # spent here: not training time

    def __call__(self, step, model, diffusion, seconds_since_start):
        t0 = time.perf_counter()
        x, y, _ = generate(model.eval(), diffusion, list(range(10)), self.N_PER_DIGIT,
                           model_sampling(diffusion.cfg, steps=self.STEPS))
        probs, feats = evaluate.classify(self.clf, x.cpu())
        frechet, floor = evaluate.frechet_vs_real(feats.numpy(), *self.halves)
        spent = time.perf_counter() - t0
        minutes = self.minutes_before + (seconds_since_start - self.eval_seconds) / 60
        self.eval_seconds += spent
        self.rows.append({"step": step, "images": step * self.images_per_step, "train_minutes": round(minutes, 3),
                          "accuracy": (probs.argmax(1) == y.cpu()).float().mean().item(), "frechet": frechet,
                          "floor": floor, "frechet_ratio": frechet / floor, "eval_seconds": round(spent, 2)})
        write_csv(self.csv, self.FIELDS, self.rows)
        save_curve_figure(self.rows, self.png)


def read_csv(path):
    """Rows of a CSV as dicts of strings ([] when there is no file)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, fields, rows):
    """Rows (dicts) as CSV, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write, suffix=".csv")


def save_curve_figure(rows, path):
    """Accuracy and Frechet / floor against training images (top axis: training minutes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images = [int(r["images"]) / 1000 for r in rows]
    minutes = [float(r["train_minutes"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(images, [100 * float(r["accuracy"]) for r in rows], "o-")
    ax1.set(xlabel="training images (thousands)", ylabel="judge accuracy (%)", ylim=(0, 102))
    ax2.plot(images, [float(r["frechet_ratio"]) for r in rows], "s-", color="C1")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax2.set(xlabel="training images (thousands)", ylabel="Frechet / real-vs-real floor", yscale="log")
    if images[-1] > 0 and minutes[-1] > 0:          # training minutes as a top axis
        per = minutes[-1] / images[-1]
        for ax in (ax1, ax2):
            top = ax.secondary_xaxis("top", functions=(lambda k: k * per, lambda m: m / per))
            top.set_xlabel("training minutes", fontsize=8)
    fig.suptitle(f"quality while training (EMA weights, {QualityCurve.N_PER_DIGIT} per digit, "
                 f"DDIM {QualityCurve.STEPS})", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        tcfg = config_from_args(TrainConfig, args)
        model_cfg, diff_cfg = config_from_args(ModelConfig, args), config_from_args(DiffusionConfig, args)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    folders = {"--data-dir folder": tcfg.data_dir} if tcfg.dataset == "folder" else {}
    dist, tcfg, ckpt_path, ckpt, run = open_run(tcfg, args.resume, args.overwrite, "ckpt.pt", RUN_FILES,
                                                 folders=folders, given=args.given, old_pattern=STEP_GRIDS,
                                                 sections={"model": model_cfg, "diffusion": diff_cfg})
    with run:                     # one writer in the run folder until the run ends, however it ends
        return train(args, dist, run, tcfg, ckpt_path, ckpt, model_cfg, diff_cfg)


def train(args, dist, run, tcfg, ckpt_path, ckpt, model_cfg, diff_cfg):
    """The run itself, its folder locked: data, model, the loop, figures, a short evaluation."""
    if ckpt is not None:          # the stored configuration wins; only where/how long to run comes from flags
        model_cfg, diff_cfg = configs_from_checkpoint(ckpt, ckpt_path)
        for key in ("model", "ema"):  # before the model the stored config describes is allocated
            check_fits(model_cfg, ckpt.get(key), ckpt_path, key)
    device = dist.device

    x, y, name = load_training_data(tcfg, dist)
    x, y = place_data(x, y, device, tcfg)
    model = UNet(model_cfg).to(device, memory_format=memory_format(tcfg))
    diffusion = Diffusion(diff_cfg, model_cfg.num_classes).to(device)
    config = {"model": asdict(model_cfg), "diffusion": asdict(diff_cfg), "train": asdict(tcfg)}
    if dist.main:
        print(json.dumps(config))
        print(f"data: {name}, {len(x):,} training images | model: {count_params(model):,} parameters "
              f"| device: {device}, {torch.get_num_threads()} threads | processes: {dist.world}")

    params = list(model.parameters())
    state = new_loop_state(model, params, tcfg, len(x))
    ema = state["ema"]
    if ckpt is not None:
        load_state(model, ckpt["model"], ckpt_path)
        load_state(ema.module, ckpt["ema"], ckpt_path, "ema")
        restore_loop_state(state, ckpt, ckpt_path, verbose=dist.main)

    def save(state):
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.module.state_dict(),
                                    "config": config, "data": name, **loop_state_dict(state)})

    curve = (QualityCurve(name, tcfg.data_dir, tcfg.out, tcfg.batch_size, state["step"])
             if tcfg.eval_every and dist.main else None)

    def on_step(step):                            # rank 0, after the step's checkpoint
        if tcfg.sample_every and step % tcfg.sample_every == 0:
            save_sample_grid(ema.module, diffusion, os.path.join(tcfg.out, f"samples_{step:06d}.png"))
        if curve and (step % tcfg.eval_every == 0 or step == run_length(len(x), tcfg)[2]):
            curve(step, ema.module, diffusion, time.perf_counter() - t0)

    run.start_fresh()                             # --overwrite: the earlier run goes only now, inputs loaded
    t0 = time.perf_counter()
    outcome = fit(model, diffusion, (x, y), tcfg, state, save, dist, params, on_step=on_step)
    minutes = (time.perf_counter() - t0 - (curve.eval_seconds if curve else 0)) / 60
    code = after_fit(outcome, state, dist, model, tcfg.out, "training loss",
                     resume_command("train.py", tcfg), args.figures)
    if code is not None:
        return code
    print(f"trained {state['step']} steps in {minutes:.1f} min -> {ckpt_path}")
    if args.figures:
        grid = os.path.join(tcfg.out, "samples.png")
        save_sample_grid(ema.module, diffusion, grid)
        print(f"figures: {grid}, {os.path.join(tcfg.out, 'loss.png')}")
    if tcfg.eval_n:
        final_evaluation(ema.module, diffusion, name, tcfg)
    return 0


def final_evaluation(model, diffusion, dataset, tcfg):
    """Score the EMA weights with evaluate.py's classifier, so every run says how good it is."""
    clf, clf_acc = evaluate.get_classifier(dataset, tcfg.data_dir)
    real_x, real_y, _ = load_dataset(dataset, tcfg.data_dir, "test", verbose=False)
    r, _, _ = evaluate.evaluate_model(model.eval(), diffusion, clf, real_x, tcfg.eval_n, model_sampling(diffusion.cfg),
                                      real_y=real_y)
    print(f"final evaluation ({tcfg.eval_n} samples per digit; `python evaluate.py` for the full one):")
    evaluate.print_report(r, clf_acc)


ERRORS = (TrainingError, CheckpointError, DataError, DeviceError, SamplingError)


def cli(argv=None):
    """main() as a command: every expected failure is one line on stderr and a non-zero exit."""
    return run_cli("train.py", main, ERRORS, argv)


if __name__ == "__main__":
    sys.exit(cli())
