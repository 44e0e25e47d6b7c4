"""Teach the pretrained model a new handwriting style with LoRA: `python lora_finetune.py`.

Loads the EMA weights written by `python train.py`, wraps the cross-attention's W_q, W_k, W_v
(nn.Linear, as the article does: `--targets qkv`) in rank-4 LoraLayers (lora.py), freezes
everything else and trains only A and B on styled digits the base model never saw (bold or
italic versions of the training split, or your own folder of digits). The training loop is
loop.py's, shared with train.py; only this set-up differs. Writes the adapter (safetensors,
under 1% of the checkpoint), a loss curve, base-vs-LoRA samples, a strength sweep and what
LoRA learned per layer. `--targets conv` puts LoRA on the 3x3 convolutions instead, which a
geometric style (italic) needs; `--full` fine-tunes every weight: the baseline.
"""
import argparse
import os
import resource
import sys
import time
from dataclasses import asdict, replace

import torch

import lora
from checkpoint import (DEFAULT_CHECKPOINT, CheckpointError, atomic_write, check_finite, dataset_of, load_checkpoint,
                        load_model, save_checkpoint, shown, write_json)
from config import (LoraConfig, Parser, TrainConfig, add_config_flags, config_from_args, config_from_dict,
                    explicit_flags)
from dataset import DataError, apply_style, load_dataset
from device import DeviceError, run_cli
from diffusion import Diffusion, SamplingError
from evaluate import style_evaluation
from loop import (TrainingError, after_fit, fit, loop_state_dict, memory_format, new_loop_state, open_run,
                  place_data, restore_loop_state, resume_command)
from sample import model_sampling
from unet import count_params

# Fine-tuning needs far fewer steps and a gentler start than training from scratch. LoRA
# learns more slowly than full fine-tuning: 12 epochs, and t_power 2 spends 75% of the steps
# on the noisier half of the process, where a digit's overall shape is decided.
FINETUNE_DEFAULTS = {"out": "", "epochs": 12, "batch_size": 64, "lr": 2e-3, "warmup_steps": 20,
                     "ema_decay": 0.99, "t_power": 2.0, "ckpt_every": 200, "eval_n": 20}

# The italic run that moved the slant furthest in our measurements (docs/lora.md).
BEST_ITALIC = "python lora_finetune.py --style italic --targets all --r 8 --alpha 8 --lr 4e-3 --epochs 24"

LORA_FROM_FLAGS = ("fused", "export_peft")   # on --resume, from the command line when given: how, not what
RUN_FILES = ("loss.png", "summary.json", "base_vs_tuned.png")   # in --out besides the checkpoint (more: see main)


def parse_args(argv=None):
    p = Parser(description="LoRA fine-tuning of a trained checkpoint on a new handwriting style.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"base model (default: {DEFAULT_CHECKPOINT})")
    add_config_flags(p, LoraConfig, "LoRA")
    add_config_flags(p, TrainConfig, "training", defaults=FINETUNE_DEFAULTS,   # no step grids or curve here
                     skip=("dataset", "sample_every", "eval_every"))
    p.add_argument("--dataset", choices=["styled", "folder"], default="styled",
                   help="styled: the base's training digits in --style; folder: your digits in --style-dir")
    p.add_argument("--resume", action="store_true",
                   help="continue the fine-tuning run in --out with its stored configuration; as in train.py, "
                        "--max-steps and a larger --epochs extend it (the LR schedule re-spans the new length), "
                        "and flags that contradict the stored run are refused")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the loss curve, base-vs-tuned, strength-sweep and update figures (--no-figures: skip them)")
    args = p.parse_args(argv)
    args.given = explicit_flags(p, argv)          # --resume refuses those that contradict the stored run
    return args


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


def load_finetune_data(lcfg, data_dir, base_dataset):
    """Styled training digits (the base saw them only unstyled), or the user's folder."""
    if lcfg.style == "folder":
        return load_dataset("folder", lcfg.style_dir)[:2]
    x, y, _ = load_dataset(base_dataset, data_dir, "train", verbose=False)
    return apply_style(x, lcfg.style), y


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
        style = "folder" if args.dataset == "folder" or args.style_dir else args.style
        lcfg, tcfg = config_from_args(LoraConfig, args, style=style), config_from_args(TrainConfig, args, dataset="auto")
    except ValueError as e:
        raise TrainingError(str(e)) from e
    kind = "full" if lcfg.full else "lora"
    tcfg = replace(tcfg, out=tcfg.out or os.path.join("runs", f"{kind}-{lcfg.style}"))
    if args.resume and "checkpoint" not in args.given:       # the base the run was fine-tuned from
        args.checkpoint = stored_base(os.path.join(tcfg.out, "finetune_ckpt.pt"), args.checkpoint)
    writes = RUN_FILES + (("ckpt.pt",) if lcfg.full else ("adapter.safetensors", "lora_update.png", "strength_sweep.png",
                                                          "peft"))
    given = (args.given - {"dataset"} - set(LORA_FROM_FLAGS)
             | ({"style"} if args.given & {"dataset", "style_dir"} else set()))
    dist, tcfg, ckpt_path, resume, run = open_run(
        tcfg, args.resume, args.overwrite, "finetune_ckpt.pt", writes, inputs={"--checkpoint": args.checkpoint},
        folders={"--style-dir": lcfg.style_dir} if lcfg.style_dir else {}, given=given, sections={"lora": lcfg},
        write_folders={} if lcfg.full else {"peft": lora.PEFT_FILES})
    with run:                     # one writer in the run folder until the run ends, however it ends
        return finetune(args, dist, run, tcfg, ckpt_path, resume, lcfg)


def finetune(args, dist, run, tcfg, ckpt_path, resume, lcfg):
    """The fine-tuning run itself, its folder locked."""
    if resume is not None:  # the stored configuration wins, as in train.py, but for how it is computed and exported
        lcfg = replace(config_from_dict(LoraConfig, resume["config"]["lora"]),
                       **{name: getattr(lcfg, name) for name in LORA_FROM_FLAGS if name in args.given})
    kind = "full" if lcfg.full else "lora"
    device = dist.device
    if lcfg.export_peft and dist.main:                # not after the training: refused now, if at all
        lora.check_peft_folder(os.path.join(tcfg.out, "peft"), replace=True)

    model, diff_cfg, base_ckpt = load_model(args.checkpoint, device)    # EMA weights of the base
    model_config = base_ckpt["config"]["model"]
    fingerprint = lora.base_fingerprint(model)
    base_data = dataset_of(base_ckpt)                 # the base's data, styled below (or unused)
    x, y = load_finetune_data(lcfg, tcfg.data_dir, base_data)
    asked = tcfg.batch_size                           # stored as given, so the same flags resume the run
    tcfg = replace(tcfg, dataset=base_data, batch_size=min(tcfg.batch_size, len(x)))  # few-shot: one batch
    x, y = place_data(x, y, device, tcfg)
    total_params = count_params(model)
    if lcfg.full:
        names = []
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        names = lora.inject_lora(model, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout, lcfg.rslora)
        lora.mark_only_lora_trainable(model)
        lora.set_fused(model, lcfg.fused)
    model.to(memory_format=memory_format(tcfg)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    if dist.main:
        what = "full fine-tuning" if lcfg.full else f"LoRA r={lcfg.r} alpha={lcfg.alpha} on {len(names)} layers ({lcfg.targets})"
        print(f"base: {args.checkpoint} | data: {lcfg.style}, {len(x):,} images | {what}")
        print(f"trainable {trainable:,} / {total_params:,} = {100 * trainable / total_params:.1f}%")

    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    groups = params if lcfg.full else lora.param_groups(model, tcfg.lr, lcfg.lr_ratio_b)
    state = new_loop_state(model, groups, tcfg, len(x))
    ema = state["ema"]
    trained = (lambda m: m.state_dict()) if lcfg.full else lora.lora_state_dict
    config = {"lora": asdict(lcfg), "train": asdict(replace(tcfg, batch_size=asked)),
              "base": os.path.abspath(args.checkpoint)}
    if resume is not None:
        if resume.get("base_fingerprint") != fingerprint:
            raise TrainingError(f"{ckpt_path}: was fine-tuned from other base weights than {args.checkpoint}")
        for module, key in ((model, "model"), (ema.module, "ema")):
            if set(resume[key]) != set(trained(module)):
                raise TrainingError(f"{ckpt_path}: {key} tensors do not match this set-up")
            check_finite(resume[key], ckpt_path, key)
            module.load_state_dict(resume[key], strict=False)  # keys checked just above
        restore_loop_state(state, resume, ckpt_path, verbose=dist.main)

    def save(state):
        save_checkpoint(ckpt_path, {"model": trained(model), "ema": trained(ema.module), "config": config,
                                    "base_fingerprint": fingerprint, **loop_state_dict(state)})

    run.start_fresh()                             # --overwrite: the earlier run goes only now, inputs loaded
    t0, first_step = time.perf_counter(), state["step"]
    outcome = fit(model, diffusion, (x, y), tcfg, state, save, dist, params, desc=kind)
    seconds = time.perf_counter() - t0
    code = after_fit(outcome, state, dist, model, tcfg.out, f"{kind} fine-tuning loss",
                     resume_command("lora_finetune.py", tcfg, "--checkpoint", os.path.abspath(args.checkpoint)),
                     args.figures)
    if code is not None:
        return code
    tuned = ema.module.eval()
    base_size = os.path.getsize(args.checkpoint)
    if lcfg.full:
        out_file = os.path.join(tcfg.out, "ckpt.pt")
        sd = tuned.state_dict()
        save_checkpoint(out_file, {"model": sd, "ema": sd, "config": base_ckpt["config"],
                                   "data": base_data, "step": state["step"]})
    else:
        out_file = os.path.join(tcfg.out, "adapter.safetensors")
        lora.save_adapter(out_file, tuned, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.rslora,
                          model_config, fingerprint, style=lcfg.style)
        if lcfg.export_peft:
            lora.export_peft(tuned, os.path.join(tcfg.out, "peft"), replace=True)   # ours, under the lock
            print(f"peft adapter: {os.path.join(tcfg.out, 'peft')} (PeftModel.from_pretrained(UNet(cfg), that folder))")
    size = os.path.getsize(out_file)
    ms_per_step = 1000 * seconds / max(1, state["step"] - first_step)
    print(f"trained {state['step']} steps in {seconds / 60:.1f} min ({ms_per_step:.0f} ms/step)")
    print(f"saved {out_file}: {size / 1024:.1f} KiB vs base checkpoint {base_size / 1024:.1f} KiB "
          f"({100 * size / base_size:.1f}%) and base weights {4 * total_params / 1024:.1f} KiB "
          f"({100 * size / (4 * total_params):.1f}%) | trainable {trainable:,} / {total_params:,} "
          f"= {100 * trainable / total_params:.1f}%")

    summary = {"config": config, "steps": state["step"], "ms_per_step": ms_per_step,
               "trainable": trainable, "total_params": total_params, "file_bytes": size,
               "base_checkpoint_bytes": base_size,
               "peak_rss_mb_training": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if not lcfg.full:
        summary["update"] = lora.update_stats(tuned)      # per layer: |dW| / |W| and dW's singular values
    base_model = load_model(args.checkpoint, device)[0]
    if args.figures:
        draw_figures(base_model, tuned, diffusion, tcfg.out, kind, lcfg)
    if tcfg.eval_n:
        scfg = model_sampling(diff_cfg)                               # the base's own sampling
        summary["sampling"] = asdict(scfg)
        summary["evaluation"] = style_evaluation(base_model, tuned, diffusion, base_data, lcfg.style, tcfg.data_dir,
                                                 tcfg.eval_n, scfg, folder=lcfg.style_dir or None)
        slant = summary["evaluation"]["shift"]["slant"]
        adapts_convs = any(isinstance(layer.base, torch.nn.Conv2d) for layer in lora.lora_layers(tuned))
        if lcfg.style == "italic" and not lcfg.full and slant < 0.8 and not adapts_convs:
            print(f"slant shift {100 * slant:.0f}% < 80%: a slant is a geometric change that lives in the "
                  f"convolutions, not in attention; try `{BEST_ITALIC}` (measured: 88% on the default base)")
    summary_path = os.path.join(tcfg.out, "summary.json")
    write_json(summary_path, summary)
    print(summary_path)
    return 0


def draw_figures(base_model, tuned, diffusion, out, kind, lcfg):
    """Base vs tuned samples, and (LoRA) the same noise at growing adapter strength."""
    compare = os.path.join(out, "base_vs_tuned.png")
    side_by_side([base_model, tuned], ["base model", f"{kind} ({lcfg.style})"], diffusion, compare)
    print(compare)
    if not lcfg.full:
        sweep = os.path.join(out, "strength_sweep.png")
        scales = [0.0, 0.25, 0.5, 0.75, 1.0]
        side_by_side([tuned] * 5, [f"scale {s}" for s in scales], diffusion, sweep, n=3, scales=scales)
        update = os.path.join(out, "lora_update.png")
        lora.save_update_figure(lora.update_stats(tuned), update)
        print(sweep)
        print(update)


ERRORS = (TrainingError, CheckpointError, DataError, DeviceError, lora.LoraError, SamplingError)


def cli(argv=None):
    """main() as a command: every expected failure is one line on stderr and a non-zero exit."""
    return run_cli("lora_finetune.py", main, ERRORS, argv)


if __name__ == "__main__":
    sys.exit(cli())
