"""Teach the pretrained model a new handwriting style with LoRA: `python lora_finetune.py`.

Loads the EMA weights written by `python train.py`, wraps the ResnetBlocks' 3x3 convolutions
in rank-2 LoraLayers (lora.py; `--targets attn` for the article's cross-attention projections),
freezes everything else and trains only A and B on styled digits the base model never saw
(bold or italic versions of the training split, or your own folder of digits). The training
loop is train.py's; only this set-up differs. Writes the adapter (safetensors, a few % of
the model), a loss curve, base-vs-LoRA samples and a strength sweep. `--full` fine-tunes
every weight instead: the baseline LoRA is measured against.
"""
import argparse
import os
import resource
import sys
import time
from dataclasses import asdict

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import lora
from checkpoint import (DEFAULT_CHECKPOINT, CheckpointError, atomic_write, load_checkpoint, load_model,
                        save_checkpoint, write_json)
from config import LoraConfig, Parser, TrainConfig, add_config_flags, config_from_args, config_from_dict
from dataset import DataError, apply_style, load_dataset
from diffusion import Diffusion
from train import (Dist, TrainingError, fit, loop_state_dict, prepare_out_dir, restore_loop_state,
                   save_loss_curve, warmup_cosine)
from unet import count_params

# Fine-tuning needs far fewer steps and a gentler start than training from scratch.
# LoRA learns more slowly than full fine-tuning: 12 epochs, and t_power 2 spends 75% of the
# steps on the noisier half of the process, where a digit's overall shape is decided.
FINETUNE_DEFAULTS = {"out": "", "epochs": 12, "lr": 2e-3, "warmup_steps": 20, "ema_decay": 0.99,
                     "t_power": 2.0, "ckpt_every": 200, "eval_n": 20}


def parse_args(argv=None):
    p = Parser(description="LoRA fine-tuning of a trained checkpoint on a new handwriting style.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"base model (default: {DEFAULT_CHECKPOINT})")
    add_config_flags(p, LoraConfig, "LoRA")
    add_config_flags(p, TrainConfig, "training", defaults=FINETUNE_DEFAULTS, skip=("dataset",))
    p.add_argument("--dataset", choices=["styled", "folder"], default="styled",
                   help="styled: the base's training digits in --style; folder: your digits in --data-dir")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw base-vs-tuned and strength-sweep figures (--no-figures: skip them, for sweeps)")
    return p.parse_args(argv)


def load_finetune_data(style, data_dir, base_dataset):
    """Styled training digits (the base saw them only unstyled), or the user's folder."""
    if style == "folder":
        return load_dataset("folder", data_dir)[:2]
    x, y, _ = load_dataset(base_dataset, data_dir, "train", verbose=False)
    return apply_style(x, style), y


def side_by_side(models, titles, diffusion, path, n=6, seed=0, scales=None):
    """One panel per model (or per LoRA scale): rows are digits 0..9, same noise in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        style = "folder" if args.dataset == "folder" else args.style
        lcfg, tcfg = config_from_args(LoraConfig, args, style=style), config_from_args(TrainConfig, args, dataset="auto")
    except ValueError as e:
        raise TrainingError(str(e)) from e
    kind = "full" if lcfg.full else "lora"
    tcfg.out = tcfg.out or os.path.join("runs", f"{kind}-{lcfg.style}")
    ckpt_path = (prepare_out_dir(tcfg.out, args.resume, args.overwrite, "finetune_ckpt.pt")
                 if os.environ.get("RANK", "0") == "0" else os.path.join(tcfg.out, "finetune_ckpt.pt"))
    resume = load_checkpoint(ckpt_path) if args.resume else None
    if resume is not None:  # the stored configuration wins, as in train.py
        lcfg = config_from_dict(LoraConfig, resume["config"]["lora"])
        tcfg = TrainConfig(**{**resume["config"]["train"], "device": tcfg.device, "out": tcfg.out,
                              "max_steps": tcfg.max_steps, "threads": tcfg.threads})
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    dist = Dist(tcfg.device)
    device = dist.device
    torch.manual_seed(tcfg.seed)

    model, diff_cfg, base_ckpt = load_model(args.checkpoint, device)    # EMA weights of the base
    model_config = base_ckpt["config"]["model"]
    fingerprint = lora.base_fingerprint(model)
    tcfg.dataset = base_ckpt.get("data", "auto")     # the base's data, styled below (or unused)
    x, y = load_finetune_data(lcfg.style, tcfg.data_dir, tcfg.dataset)
    data_name = lcfg.style
    if len(x) < tcfg.batch_size:
        tcfg.batch_size = len(x)          # few-shot folders: one batch is the whole set
    layout = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    x, y = x.to(device).contiguous(memory_format=layout), y.to(device)
    total_params = count_params(model)
    if lcfg.full:
        names = []
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        names = lora.inject_lora(model, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout, lcfg.rslora)
        lora.mark_only_lora_trainable(model)
    model.to(memory_format=layout).train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    if dist.main:
        what = "full fine-tuning" if lcfg.full else f"LoRA r={lcfg.r} alpha={lcfg.alpha} on {len(names)} layers ({lcfg.targets})"
        print(f"base: {args.checkpoint} | data: {data_name}, {len(x):,} images | {what}")
        print(f"trainable {trainable:,} / {total_params:,} = {100 * trainable / total_params:.1f}%")

    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    groups = params if lcfg.full else lora.param_groups(model, tcfg.lr, lcfg.lr_ratio_b)
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = warmup_cosine(opt, tcfg.warmup_steps, tcfg.epochs * max(1, len(x) // tcfg.batch_size))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema_decay))
    state = {"optimizer": opt, "scheduler": sched, "ema": ema, "step": 0, "losses": []}
    trained = (lambda m: m.state_dict()) if lcfg.full else lora.lora_state_dict
    config = {"lora": asdict(lcfg), "train": asdict(tcfg), "base": os.path.abspath(args.checkpoint)}
    if resume is not None:
        if resume.get("base_fingerprint") != fingerprint:
            raise TrainingError(f"{ckpt_path}: was fine-tuned from other base weights than {args.checkpoint}")
        for module, key in ((model, "model"), (ema.module, "ema")):
            if set(resume[key]) != set(trained(module)):
                raise TrainingError(f"{ckpt_path}: {key} tensors do not match this set-up")
            module.load_state_dict(resume[key], strict=False)  # keys checked just above
        restore_loop_state(state, resume, ckpt_path, verbose=dist.main)

    def save(state):
        save_checkpoint(ckpt_path, {"model": trained(model), "ema": trained(ema.module), "config": config,
                                    "base_fingerprint": fingerprint, **loop_state_dict(state)})

    t0, first_step = time.perf_counter(), state["step"]
    outcome = fit(dist.wrap(model), diffusion, (x, y), tcfg, state, save, dist, params, desc=kind)
    seconds = time.perf_counter() - t0
    dist.close()
    if not dist.main:                       # figures, files and evaluation are rank 0's
        return 0 if outcome == "done" else 130
    save_loss_curve(state["losses"], os.path.join(tcfg.out, "loss.png"), f"{kind} fine-tuning loss")
    if outcome == "interrupted":
        print(f"interrupted at step {state['step']}: continue with "
              f"`python lora_finetune.py --out {tcfg.out} --resume`")
        return 130
    tuned = ema.module.eval()
    base_size = os.path.getsize(args.checkpoint)
    if lcfg.full:
        out_file = os.path.join(tcfg.out, "ckpt.pt")
        sd = tuned.state_dict()
        save_checkpoint(out_file, {"model": sd, "ema": sd, "config": base_ckpt["config"],
                                   "data": base_ckpt.get("data", "auto"), "step": state["step"]})
    else:
        out_file = os.path.join(tcfg.out, "adapter.safetensors")
        lora.save_adapter(out_file, tuned, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.rslora,
                          model_config, fingerprint, style=lcfg.style)
    size = os.path.getsize(out_file)
    print(f"trained {state['step']} steps in {seconds / 60:.1f} min "
          f"({1000 * seconds / max(1, state['step'] - first_step):.0f} ms/step)")
    print(f"saved {out_file}: {size / 1024:.1f} KiB vs base checkpoint {base_size / 1024:.1f} KiB "
          f"({100 * size / base_size:.1f}%) and base weights {4 * total_params / 1024:.1f} KiB "
          f"({100 * size / (4 * total_params):.1f}%) | trainable {trainable:,} / {total_params:,} "
          f"= {100 * trainable / total_params:.1f}%")

    summary = {"config": config, "steps": state["step"],
               "ms_per_step": 1000 * seconds / max(1, state["step"] - first_step),
               "trainable": trainable, "total_params": total_params, "file_bytes": size,
               "base_checkpoint_bytes": base_size,
               "peak_rss_mb_training": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    base_model = load_model(args.checkpoint, device)[0]
    compare = os.path.join(tcfg.out, "base_vs_tuned.png")
    if args.figures:
        side_by_side([base_model, tuned], ["base model", f"{kind} ({data_name})"], diffusion, compare)
        print(compare)
    if args.figures and not lcfg.full:
        sweep = os.path.join(tcfg.out, "strength_sweep.png")
        scales = [0.0, 0.25, 0.5, 0.75, 1.0]
        side_by_side([tuned] * 5, [f"scale {s}" for s in scales], diffusion, sweep, n=3, scales=scales)
        print(sweep)
    if tcfg.eval_n:
        from evaluate import style_evaluation
        folder = tcfg.data_dir if lcfg.style == "folder" else None      # then MNIST lives in data/
        summary["evaluation"] = style_evaluation(base_model, tuned, diff_cfg, base_ckpt.get("data", "auto"), data_name,
                                                 "data" if folder else tcfg.data_dir, tcfg.eval_n, device, folder=folder)
    summary_path = os.path.join(tcfg.out, "summary.json")
    write_json(summary_path, summary)
    print(summary_path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TrainingError, CheckpointError, DataError, lora.LoraError) as e:
        sys.exit(f"lora_finetune.py: error: {e}")
