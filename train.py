"""Train the label-conditioned diffusion model: `python train.py` (see --help).

One flat loop, counted in optimiser steps: batch -> loss -> backward -> clip -> AdamW step
-> LR schedule -> EMA -> log; sample grids and atomic checkpoints every so often; Ctrl-C
saves and exits; `--resume` continues bit-exactly where a run stopped. lora_finetune.py
reuses these pieces with a different setup.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from checkpoint import (CheckpointError, atomic_write, configs_from_checkpoint, load_checkpoint, load_state,
                        save_checkpoint)
from config import (PRESETS, DiffusionConfig, ModelConfig, Parser, TrainConfig, add_config_flags,
                    config_from_args, config_from_dict)
from dataset import DataError, load_dataset
from diffusion import Diffusion
from unet import UNet, count_params


class TrainingError(Exception):
    """Training cannot go on (bad flags, non-finite loss, a run folder in the way, ...)."""


def pick_device(name):
    """'auto' -> cuda > mps > cpu; an explicit device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return pick_device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps: MPS is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise TrainingError(f"--device {name}: expected auto, cpu, cuda or mps")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True    # TF32 tensor cores for fp32 matmuls/convs
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def warmup_cosine(optimizer, warmup_steps, total_steps):
    """LR: linear warm-up from 0, then cosine decay to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_out_dir(out, resume, overwrite, ckpt_name="ckpt.pt"):
    """The no-clobber rule: a folder that already holds a run needs --resume or --overwrite."""
    ckpt = os.path.join(out, ckpt_name)
    if resume and not os.path.isfile(ckpt):
        raise TrainingError(f"--resume: no checkpoint at {ckpt}")
    if os.path.exists(ckpt) and not (resume or overwrite):
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it "
                            "or --overwrite to start again (or choose another --out)")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"--out {out}: not writable ({e.strerror})") from e
    return ckpt


def save_loss_curve(losses, path, title="training loss"):
    """losses: list of (step, loss) -> a PNG with the raw and smoothed curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not losses:
        return
    steps, values = zip(*losses)
    smooth, s = [], values[0]
    for v in values:
        s = 0.9 * s + 0.1 * v
        smooth.append(s)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label="smoothed")
    ax.set(xlabel="step", ylabel="MSE", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def save_sample_grid(model, diffusion, path, n_per_label=10, seed=0, **sample_kwargs):
    """One row per digit 0..9, n_per_label columns, written as a PNG."""
    from torchvision.utils import save_image
    device = next(model.parameters()).device
    y = torch.arange(10, device=device).repeat_interleave(n_per_label)
    g = torch.Generator(device).manual_seed(seed)
    x = diffusion.sample(model, y, generator=g, **sample_kwargs)
    atomic_write(path, lambda tmp: save_image((x + 1) / 2, tmp, format="png", nrow=n_per_label,
                                              padding=2, pad_value=0.5))


class StopFlag:
    """Ctrl-C (SIGINT) sets a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.set = False
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum, frame):
        if self.set:                     # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.set = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Dist:
    """Where this process stands: rank, world size, device. Under torchrun (RANK set in the
    environment) it joins the process group -- NCCL on CUDA, gloo on CPU; under plain
    `python train.py` there is no process group at all and rank 0 of 1 does everything."""

    def __init__(self, device_name):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if not self.enabled:
            self.rank, self.world, self.device = 0, 1, pick_device(device_name)
            return
        import torch.distributed as dist
        self.device = pick_device(device_name)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self):
        return self.rank == 0

    def wrap(self, model):
        """DistributedDataParallel averages gradients across processes; a no-op for one process."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def any(self, flag):
        """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value):
        """Average of a scalar tensor over all ranks (the global batch's loss)."""
        if not self.enabled:
            return value.item()
        import torch.distributed as dist
        t = value.detach().clone().reshape(1)
        dist.all_reduce(t)
        return t.item() / self.world

    def share(self, obj):
        """Rank 0's value of a picklable obj, on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max_param_difference(self, model):
        """Largest difference between this rank's parameters and rank 0's (0 when in sync)."""
        if not self.enabled:
            return 0.0
        import torch.distributed as dist
        diff = 0.0
        for p in model.parameters():
            ref = p.detach().clone()
            dist.broadcast(ref, src=0)
            diff = max(diff, (p.detach() - ref).abs().max().item())
        t = torch.tensor([diff], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def close(self):
        if self.enabled:
            import torch.distributed as dist
            dist.destroy_process_group()


def fit(model, diffusion, data, tcfg, state, save, dist, params, desc="train"):
    """The flat training loop shared by train.py and lora_finetune.py.

    model: the (possibly DDP-wrapped) network; data: (x, y) tensors on the device; params:
    the parameters to clip; state: dict with optimizer, scheduler, ema, step, losses;
    save(state): writes a checkpoint (rank 0 only). Returns "done" or "interrupted".

    Step s uses global batch s of a DistributedSampler's shuffle, and randomness (t, noise,
    dropped labels) drawn from a generator seeded by (seed, s) for the whole global batch;
    each of the N ranks takes every N-th sample. So 1 or N processes, and a resumed run,
    all see the same samples with the same noise at every step (with --dropout 0, the
    default: dropout masks come from each process's own RNG).
    """
    from torch.utils.data import DistributedSampler
    x_all, y_all = data
    n, B = len(x_all), tcfg.batch_size
    if B % dist.world:
        raise TrainingError(f"--batch-size {B} must be divisible by the {dist.world} processes")
    steps_per_epoch = max(1, n // B)
    total = tcfg.epochs * steps_per_epoch
    stop_at = min(total, tcfg.max_steps) if tcfg.max_steps else total
    sampler = DistributedSampler(range(n), num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=tcfg.seed, drop_last=True)
    opt, sched, ema = state["optimizer"], state["scheduler"], state["ema"]
    mine, b = slice(dist.rank, B, dist.world), B // dist.world       # this rank's share of a batch
    stop = StopFlag()
    model.train()
    net = torch.compile(model) if tcfg.compile else model          # compiled once, on the first step
    autocast = (torch.autocast(x_all.device.type, dtype=torch.bfloat16) if tcfg.precision == "bf16"
                else contextlib.nullcontext())
    order, t_data, t_last, n_img = None, 0.0, time.perf_counter(), 0
    bar = tqdm(total=stop_at, initial=state["step"], desc=desc, unit="step", dynamic_ncols=True,
               disable=not dist.main)
    try:
        while state["step"] < stop_at:
            step = state["step"]
            epoch, i = divmod(step, steps_per_epoch)
            t0 = time.perf_counter()
            if order is None or i == 0:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), device=x_all.device)     # this rank's shuffle
            idx = order[i * b:(i + 1) * b]
            x0, y = x_all[idx], y_all[idx]                                # (B/N, 1, 28, 28), (B/N,)
            g = torch.Generator(x_all.device).manual_seed(tcfg.seed * 1_000_003 + step)
            t, noise, drop = diffusion.draw(B, x0.shape[1:], x_all.device, generator=g, t_power=tcfg.t_power)
            t_data += time.perf_counter() - t0

            with autocast:
                loss = diffusion.loss(net, x0, y, (t[mine], noise[mine], drop[mine]))
            opt.zero_grad(set_to_none=True)
            loss.backward()                                               # DDP: gradients averaged
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            if not torch.isfinite(grad_norm):                             # the same on every rank
                raise TrainingError(f"loss became non-finite ({loss.item()}, gradient norm {grad_norm.item()}) "
                                    f"at step {step}; stopped without saving (the last good checkpoint "
                                    "is untouched). Try a lower --lr.")
            opt.step()
            sched.step()
            ema.update_parameters(getattr(model, "module", model))
            state["step"] = step = step + 1
            n_img += B
            bar.update(1)

            if step % tcfg.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                loss_value = dist.mean(loss)                              # over the global batch
                state["losses"].append((step, loss_value))
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{n_img / (now - t_last):.0f}",
                                data_ms=f"{1000 * t_data / max(1, n_img // B):.2f}")
                t_last, n_img, t_data = now, 0, 0.0
            interrupted = dist.any(stop.set)
            if dist.main and (step % tcfg.ckpt_every == 0 or step == stop_at or interrupted):
                save(state)
            if dist.main and tcfg.sample_every and step % tcfg.sample_every == 0 and "sample" in state:
                state["sample"](step)
                model.train()
            if interrupted:
                return "interrupted"
    finally:
        stop.restore()
        bar.close()
    return "done"


def loop_state_dict(state):
    """What --resume needs besides the weights: optimiser, LR schedule, EMA count, step, losses, RNG."""
    return {"ema_n_averaged": int(state["ema"].n_averaged), "optimizer": state["optimizer"].state_dict(),
            "scheduler": state["scheduler"].state_dict(), "step": state["step"], "losses": state["losses"],
            "rng": rng_state()}


def restore_loop_state(state, ckpt, path, verbose=True):
    """The inverse of loop_state_dict: continue exactly where the checkpoint stopped."""
    state["ema"].n_averaged.fill_(ckpt["ema_n_averaged"])
    state["optimizer"].load_state_dict(ckpt["optimizer"])
    state["scheduler"].load_state_dict(ckpt["scheduler"])
    state.update(step=ckpt["step"], losses=[tuple(l) for l in ckpt["losses"]])
    set_rng_state(ckpt["rng"])
    if verbose:                                   # rank 0 only, under torchrun
        print(f"resumed {path} at step {state['step']}")


def rng_state():
    """Everything random the loop draws from (t, noise, label dropout), for exact resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parse_args(argv=None):
    p = Parser(description="Train the label-conditioned Stable-Diffusion-style UNet on MNIST.")
    add_config_flags(p, ModelConfig, "model")
    add_config_flags(p, DiffusionConfig, "diffusion")
    add_config_flags(p, TrainConfig, "training")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: the defaults below; gpu: a wider, deeper model and longer run for full MNIST")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its stored configuration")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        tcfg = config_from_args(TrainConfig, args)
        model_cfg, diff_cfg = config_from_args(ModelConfig, args), config_from_args(DiffusionConfig, args)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    ckpt_path = (prepare_out_dir(tcfg.out, args.resume, args.overwrite) if os.environ.get("RANK", "0") == "0"
                 else os.path.join(tcfg.out, "ckpt.pt"))          # only rank 0 judges and writes the folder
    ckpt = None
    if args.resume:  # the stored configuration wins; only where/how long to run comes from flags
        ckpt = load_checkpoint(ckpt_path)
        model_cfg, diff_cfg = configs_from_checkpoint(ckpt, ckpt_path)
        stored = config_from_dict(TrainConfig, ckpt["config"]["train"])
        tcfg = TrainConfig(**{**asdict(stored), "device": tcfg.device, "threads": tcfg.threads,
                              "out": tcfg.out, "max_steps": tcfg.max_steps,
                              "dataset": ckpt.get("data", stored.dataset)})  # the data it really used
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    dist = Dist(tcfg.device)
    device = dist.device
    torch.manual_seed(tcfg.seed)

    if dist.main:    # rank 0 resolves --dataset auto (downloading MNIST) before the others look
        x, y, name = load_dataset(tcfg.dataset, tcfg.data_dir, split="train")
    name = dist.share(name if dist.main else None)
    if not dist.main:
        x, y, name = load_dataset(name, tcfg.data_dir, split="train", verbose=False)
    if len(x) < tcfg.batch_size:
        raise TrainingError(f"--batch-size {tcfg.batch_size} is larger than the dataset ({len(x)} images)")
    layout = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    x, y = x.to(device).contiguous(memory_format=layout), y.to(device)
    model = UNet(model_cfg).to(device, memory_format=layout)
    diffusion = Diffusion(diff_cfg, model_cfg.num_classes).to(device)
    config = {"model": asdict(model_cfg), "diffusion": asdict(diff_cfg), "train": asdict(tcfg)}
    if dist.main:
        print(json.dumps(config))
        print(f"data: {name}, {len(x):,} training images | model: {count_params(model):,} parameters "
              f"| device: {device}, {torch.get_num_threads()} threads | processes: {dist.world}")

    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    total = tcfg.epochs * max(1, len(x) // tcfg.batch_size)
    sched = warmup_cosine(opt, tcfg.warmup_steps, total)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema_decay))
    state = {"optimizer": opt, "scheduler": sched, "ema": ema, "step": 0, "losses": []}
    if ckpt is not None:
        load_state(model, ckpt["model"], ckpt_path)
        load_state(ema.module, ckpt["ema"], ckpt_path, "ema")
        restore_loop_state(state, ckpt, ckpt_path, verbose=dist.main)

    def save(state):
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.module.state_dict(),
                                    "config": config, "data": name, **loop_state_dict(state)})

    grid = os.path.join(tcfg.out, "samples.png")
    state["sample"] = lambda step: save_sample_grid(ema.module.eval(), diffusion,
                                                    os.path.join(tcfg.out, f"samples_{step:06d}.png"))
    t0 = time.perf_counter()
    outcome = fit(dist.wrap(model), diffusion, (x, y), tcfg, state, save, dist, params)
    minutes = (time.perf_counter() - t0) / 60
    if dist.enabled:
        diff = dist.max_param_difference(model)
        if dist.main:
            print(f"{dist.world} processes: parameters agree across ranks (max difference {diff:.3g})")
        dist.close()
        if not dist.main:
            return 0 if outcome == "done" else 130
    save_loss_curve(state["losses"], os.path.join(tcfg.out, "loss.png"))
    if outcome == "interrupted":
        print(f"interrupted at step {state['step']}: checkpoint saved to {ckpt_path}; "
              f"continue with `python train.py --out {tcfg.out} --resume`")
        return 130
    save_sample_grid(ema.module.eval(), diffusion, grid)
    print(f"trained {state['step']} steps in {minutes:.1f} min -> {ckpt_path}, {grid}, "
          f"{os.path.join(tcfg.out, 'loss.png')}")
    if tcfg.eval_n:
        final_evaluation(ema.module, diff_cfg, name, tcfg, device)
    return 0


def final_evaluation(model, diff_cfg, dataset, tcfg, device):
    """Score the EMA weights with evaluate.py's classifier, so every run says how good it is."""
    import evaluate
    from sample import SAMPLE_DEFAULTS
    clf, clf_acc = evaluate.get_classifier(dataset, tcfg.data_dir)
    real_x = load_dataset(dataset, tcfg.data_dir, "test", verbose=False)[0]
    args = argparse.Namespace(**SAMPLE_DEFAULTS)
    r, _, _ = evaluate.evaluate_checkpoint(model.eval(), diff_cfg, clf, real_x, tcfg.eval_n, args, device)
    print(f"final evaluation ({tcfg.eval_n} samples per digit; `python evaluate.py` for the full one):")
    evaluate.print_report(r, clf_acc)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TrainingError, CheckpointError, DataError) as e:
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted")
