"""Train the label-conditioned diffusion model: `python train.py` (see --help).

Build the UNet and the diffusion process, then the training loop (Algorithm 1 of DDPM, in
batches): draw images, timesteps and noise -> the loss -> backward -> clip -> AdamW step ->
learning-rate schedule -> EMA of the weights, with a checkpoint every so often. At the end: a
sample grid, the loss curve and a short evaluation of the EMA weights.

Safety and convenience (run-folder lock, --resume, flags, Ctrl-C, torchrun) live in harness/:
called before the loop and after it, plus one-line guards in the step. lora_finetune.py runs
this same loop.
"""
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line
import math
import os
import sys
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import evaluate
from diffusion import Diffusion
from harness.cli import run_cli
from harness.files import save_checkpoint
from harness.run import Steps, after_fit, autocast_for, check_step, check_weights, loop_state_dict, run_length
from harness.scripts import open_training
from sample import generate, model_sampling, save_grid
from unet import UNet


def warmup_cosine(optimizer, warmup_steps, total_steps):
    """LR: linear warm-up from 0, then cosine decay to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def new_loop_state(model, params, tcfg, n_images):
    """AdamW over params (tensors or param groups), warm-up + cosine schedule, EMA of the weights."""
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = warmup_cosine(opt, tcfg.warmup_steps, run_length(n_images, tcfg)[1])
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema_decay))
    return {"optimizer": opt, "scheduler": sched, "ema": ema, "step": 0, "losses": []}


def train_step(net, model, diffusion, x0, y, randomness, state, params, tcfg):
    """One optimiser step on a batch -> the loss. net runs the forward (model, or its DDP /
    compiled wrapper); model is the plain network the EMA follows; randomness = (t, noise, drop)."""
    opt = state["optimizer"]
    with autocast_for(tcfg, x0.device):                            # bf16 only when asked
        loss = diffusion.loss(net, x0, y, randomness)             # MSE between the true and predicted noise
    opt.zero_grad(set_to_none=True)
    loss.backward()                                               # DDP: gradients averaged over processes
    grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
    check_step(loss, grad_norm, state["step"])                    # a non-finite gradient stops the run here
    opt.step()                                                    # AdamW
    check_weights(params, state["step"], tcfg)
    state["scheduler"].step()                                     # warm-up, then cosine decay
    state["ema"].update_parameters(model)                         # EMA of the weights: what we sample from
    return loss


def fit(model, diffusion, data, tcfg, state, save, dist, params, desc="train", on_step=None):
    """The training loop, counted in optimiser steps. -> "done" or "interrupted" (Ctrl-C).

    data: (x, y) tensors on the device; params: the parameters to train and clip; state: from
    new_loop_state; save(state) writes a checkpoint; on_step(step): rank 0's extras after a step.
    Steps (harness/run.py) hands out each step's batch and noise -- the same for 1 or N
    processes and across a resume -- and keeps the progress bar, the loss log and Ctrl-C.
    """
    net = dist.wrap(model)                        # under torchrun: DDP; else the model itself
    net = torch.compile(net) if tcfg.compile else net
    model.train()
    with Steps(data, diffusion, tcfg, state, dist, desc) as steps:
        for x0, y, randomness in steps:           # (B, 1, 28, 28) in [-1, 1], (B,), (t, noise, dropped labels)
            loss = train_step(net, model, diffusion, x0, y, randomness, state, params, tcfg)
            state["step"] += 1
            steps.log(loss)                       # progress bar; every --log-every steps the loss curve
            # every rank asks (it is also where Ctrl-C on any rank is seen); rank 0 saves
            if steps.checkpoint_due():            # every --ckpt-every steps, at the end, and on Ctrl-C
                save(state)
            if on_step and dist.main:
                on_step(state["step"])
                model.train()
    return steps.outcome


def main(argv=None):
    """Set up (harness), build the model, train it, then figures and a short evaluation."""
    s = open_training(argv)       # flags -> configs; run folder checked and locked; data on the device
    with s.run:                   # one writer in the run folder until the run ends, however it ends
        tcfg = s.tcfg
        model = UNet(s.model_cfg).to(s.device, memory_format=s.memory_format)
        diffusion = Diffusion(s.diff_cfg, s.model_cfg.num_classes).to(s.device)
        params = list(model.parameters())
        state = new_loop_state(model, params, tcfg, len(s.x))
        s.begin(model, state)     # --resume: weights, EMA, optimiser, schedule, RNG and step back
        ema = state["ema"].module

        def save(state):          # atomic: a crash mid-write leaves the previous checkpoint whole
            save_checkpoint(s.ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "config": s.config,
                                          "data": s.data_name, "data_fingerprint": s.data_fingerprint,
                                          "figures": s.args.figures, **loop_state_dict(state)})

        curve = (evaluate.QualityCurve(s.data_name, tcfg.data_dir, tcfg.out, tcfg.batch_size, state["step"])
                 if tcfg.eval_every and s.dist.main else None)
        _, _, last_step = run_length(len(s.x), tcfg)

        grids = {"seconds": 0.0}  # time spent drawing grids: not training time

        def on_step(step):        # --sample-every grids, --eval-every quality curve
            if tcfg.sample_every and step % tcfg.sample_every == 0:
                t = time.perf_counter()
                save_sample_grid(ema, diffusion, os.path.join(tcfg.out, f"samples_{step:06d}.png"))
                grids["seconds"] += time.perf_counter() - t
            if curve and (step % tcfg.eval_every == 0 or step == last_step):
                curve(step, ema, diffusion, time.perf_counter() - t0 - grids["seconds"])

        s.run.start_fresh()       # --overwrite: the earlier run's files go only now, everything loaded
        t0, first_step = time.perf_counter(), state["step"]
        outcome = fit(model, diffusion, (s.x, s.y), tcfg, state, save, s.dist, params, on_step=on_step)
        extras = grids["seconds"] + (curve.eval_seconds if curve else 0)
        minutes = (time.perf_counter() - t0 - extras) / 60
        code = after_fit(outcome, state, s.dist, model, tcfg.out, "training loss", s.resume_hint, s.args.figures)
        if code is not None:      # another rank, or Ctrl-C (the checkpoint is saved)
            return code
        print(f"trained {state['step'] - first_step} steps in {minutes:.1f} min -> {s.ckpt_path} "
              f"(step {state['step']})")
        report(ema, diffusion, s)
    return 0


def save_sample_grid(model, diffusion, path, n_per_label=10):
    """One row per digit 0..9, n_per_label columns, with the run's sampling settings."""
    x, _, _ = generate(model.eval(), diffusion, list(range(10)), n_per_label, model_sampling(diffusion.cfg))
    save_grid(x, path, nrow=n_per_label)


def report(ema, diffusion, s):
    """The sample grid (with --figures) and a short evaluation of the EMA weights (--eval-n)."""
    tcfg = s.tcfg
    if s.args.figures:
        grid = os.path.join(tcfg.out, "samples.png")
        save_sample_grid(ema, diffusion, grid)
        print(f"figures: {grid}, {os.path.join(tcfg.out, 'loss.png')}")
    if tcfg.eval_n:
        evaluate.final_evaluation(ema, diffusion, s.data_name, tcfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
