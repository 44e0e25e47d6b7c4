"""How fast, how much memory, how much of the machine: `python bench.py` (`--quick` for seconds).

Each section runs in its own process so that its peak memory (max RSS) is its own. Prints a
table and writes JSON. Ratios measured in the same run are what the README quotes; absolute
numbers are only true for the machine they were measured on.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from config import DiffusionConfig, ModelConfig, Parser

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, warmup, reps):
    """Median wall time of fn() over reps calls after warmup calls; also the first call's time."""
    first = None
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        first = first or time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def matmul_peak(device, n=2048, reps=5):
    """Float32 GFLOP/s of a large matmul on this device and thread count: the practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sec, _ = timed(lambda: (a @ b, sync()), 2, reps)
    return {"matmul_gflops": 2 * n ** 3 / sec / 1e9}


def train_step_fn(mode, device, batch, cfg=None, lora_targets=None, full=True):
    """One training step of the default model under `mode`; returns (step_fn, model, optimizer)."""
    from diffusion import Diffusion
    from unet import UNet
    cfg = cfg or ModelConfig()
    model = UNet(cfg).to(device)
    layout = torch.contiguous_format if mode == "eager" else torch.channels_last
    model = model.to(memory_format=layout)
    if lora_targets:
        import lora
        lora.inject_lora(model, lora_targets, 4, 4.0)
        lora.mark_only_lora_trainable(model)
    diffusion = Diffusion(DiffusionConfig(), cfg.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = (torch.rand(4500, 1, 28, 28, device=device) * 2 - 1).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (4500,), device=device)
    fwd = torch.compile(model) if mode == "compile" else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

    def step():
        idx = torch.randint(0, 4500, (batch,), device=device)
        x0, y = data[idx], labels[idx]
        with amp:
            loss = diffusion.loss(fwd, x0, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step, model, opt, data


def section_train(args, device):
    mode = args.mode
    step, model, opt, data = train_step_fn(mode, device, args.batch, lora_targets=args.lora_targets)
    sec, first = timed(step, 3 if mode != "compile" else 4, args.reps)
    idx = torch.randint(0, 4500, (args.batch,), device=device)
    data_sec, _ = timed(lambda: data[idx], 3, 20)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    out = {"img_per_s": args.batch / sec, "ms_per_step": 1000 * sec, "data_ms_per_step": 1000 * data_sec,
           "first_step_s": first, "optimizer_state_mb": state / 2 ** 20, "peak_rss_mb": peak_rss_mb()}
    if mode == "eager" and not args.lora_targets:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            step()
        out["gflop_per_image"] = counter.get_total_flops() / args.batch / 1e9
    return out


def section_sample(args, device):
    """Sampling 100 images (10 per digit) with several samplers, and their accuracy."""
    from checkpoint import load_model
    from diffusion import Diffusion
    import evaluate
    model, diff_cfg, ckpt = load_model(args.checkpoint, device)
    model = model.to(memory_format=torch.channels_last)
    d = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    clf = evaluate.get_classifier(ckpt.get("data", "auto"), "data", progress=False)[0]
    y = torch.arange(10, device=device).repeat_interleave(args.n // 10)

    def unbatched(x, t, labels):   # guidance as two separate passes, for comparison
        null = torch.full_like(labels, model.cfg.num_classes)
        return model(x, t, labels), model(x, t, null)

    results = {}
    runs = [("ddim20", "ddim", 20, True), ("ddim50", "ddim", 50, True), ("ddim50_unbatched", "ddim", 50, False)]
    if args.full_ddpm:
        runs.append(("ddpm1000", "ddpm", 1000, True))
    for name, sampler, steps, batched in runs:
        g = torch.Generator(device).manual_seed(0)
        t0 = time.perf_counter()
        if batched:
            x = d.sample(model, y, sampler, steps, 2.0, generator=g)
        else:
            guided = lambda x, t, labels: (lambda c, u: u + 2.0 * (c - u))(*unbatched(x, t, labels))
            x = d.sample(guided, y, sampler, steps, 1.0, generator=g)
        sec = time.perf_counter() - t0
        acc = (evaluate.classify(clf, x.cpu())[0].argmax(1) == y.cpu()).float().mean().item()
        results[name] = {"seconds": sec, "accuracy": acc}
    if not args.full_ddpm:  # every DDPM step is one guided network call: time 20, scale to 1,000
        x = torch.randn(len(y), 1, 28, 28, device=device)
        sec, _ = timed(lambda: d.predict_eps_x0(model, x, 500, y, 2.0), 2, 20)
        results["ddpm1000"] = {"seconds": 1000 * sec, "accuracy": None, "extrapolated": True}
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def section_lora_sampling(args, device):
    """Base vs LoRA-unmerged vs LoRA-merged: DDIM 20 steps, 100 images."""
    import lora
    from checkpoint import load_model
    from diffusion import Diffusion
    out = {}
    y = torch.arange(10, device=device).repeat_interleave(args.n // 10)
    for variant in ("base", "unmerged", "merged", "base_again"):
        model, diff_cfg, _ = load_model(args.checkpoint, device)
        if variant in ("unmerged", "merged"):
            lora.inject_lora(model, "attn", 4, 4.0)
            if variant == "merged":
                for layer in lora.lora_layers(model):
                    layer.merge()
        d = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
        sec, _ = timed(lambda: d.sample(model, y, "ddim", 20, 2.0), 1, 3)
        out[variant] = {"seconds": sec}
    return out


def section_cli(args, device):
    """Where `python sample.py --label 7` spends its time, measured inside one process."""
    t0 = time.perf_counter()
    import sample  # noqa: F401  (the import is what is timed)
    t1 = time.perf_counter()
    from checkpoint import load_model
    model, diff_cfg, _ = load_model(args.checkpoint, device)
    t2 = time.perf_counter()
    ns = argparse.Namespace(sampler="ddim", steps=50, guidance=2.0, eta=0.0, seed=0)
    sample.generate(model, diff_cfg, [7], 10, ns, device)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "sample_s": t3 - t2}


SECTIONS = {"matmul": lambda a, d: matmul_peak(d), "train": section_train, "sample": section_sample,
            "lora_sampling": section_lora_sampling, "cli": section_cli}


def run_section(name, args, **extra):
    """Run one section in a fresh process; returns its JSON result."""
    cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--section", name, "--device", args.device,
           "--batch", str(args.batch), "--reps", str(args.reps), "--n", str(args.n),
           "--checkpoint", args.checkpoint, "--threads", str(args.threads), "--full-ddpm", str(args.full_ddpm)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:   # e.g. torch.compile without a working compiler: report, go on
        last = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"bench.py: section {name} {extra} failed: {last}", file=sys.stderr)
        return {"error": last}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = Parser(description="Benchmark training and sampling speed, memory and hardware utilisation.")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and images: seconds, not minutes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--checkpoint", default=os.path.join("runs", "mnist", "ckpt.pt"), help="model for sampling")
    p.add_argument("--batch", type=int, default=64, help="training batch (default: 64, train.py's)")
    p.add_argument("--reps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--n", type=int, default=100, help="images per sampling measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", default=os.path.join("runs", "bench.json"), help="where to write the results")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--lora-targets", default=None, help=argparse.SUPPRESS)
    p.add_argument("--full-ddpm", type=int, default=0,
                   help="1: run DDPM's 1,000 steps for real (minutes) to get its accuracy; "
                        "0: time 20 steps and scale")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.section:                       # child process: one measurement, JSON on stdout
        print(json.dumps(SECTIONS[args.section](args, device)))
        return
    if args.quick:
        args.reps, args.n = 3, 20
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"bench.py: error: {args.checkpoint} not found (run `python train.py` first)")
    R = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
         "device": args.device, "batch": args.batch, "n": args.n}
    R["matmul"] = run_section("matmul", args)
    modes = ["eager", "channels_last", "bf16", "compile"]
    R["train"] = {m: run_section("train", args, mode=m) for m in modes}
    R["lora_train"] = run_section("train", args, mode="channels_last", lora_targets="attn")
    R["sample"] = run_section("sample", args)
    R["lora_sampling"] = run_section("lora_sampling", args)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--label", "7", "--checkpoint",
                    args.checkpoint, "--out", os.path.join("runs", "bench_sample_7.png")], check=True,
                   capture_output=True)
    R["sample_cli"] = {"end_to_end_s": time.perf_counter() - t0, **run_section("cli", args)}
    report(R)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(R, f, indent=1)
    print(args.json)


def report(R):
    peak = R["matmul"]["matmul_gflops"]
    flop = R["train"]["eager"]["gflop_per_image"]
    print(f"machine: {R['machine']} | matmul peak {peak:.0f} GFLOP/s | "
          f"{flop:.3f} GFLOP per training image (forward + backward)")
    print(f"{'training (batch %d)' % R['batch']:<26}{'img/s':>8}{'ms/step':>9}{'util.':>7}{'RSS MB':>8}{'opt MB':>8}")
    rows = {**{f"full, {m}": r for m, r in R["train"].items()}, "LoRA attn r4, channels_last": R["lora_train"]}
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<26} failed: {r['error']}")
            continue
        util = f"{100 * flop * r['img_per_s'] / peak:.0f}%" if name.startswith("full") else "-"
        print(f"{name:<26}{r['img_per_s']:8.0f}{r['ms_per_step']:9.0f}{util:>7}{r['peak_rss_mb']:8.0f}"
              f"{r['optimizer_state_mb']:8.2f}")
    print(f"compile: first step {R['train']['compile'].get('first_step_s', float('nan')):.0f}s | data time per step "
          f"{R['train']['eager']['data_ms_per_step']:.2f} ms")
    s = R["sample"]
    print(f"{'sampling %d images' % R['n']:<26}{'seconds':>8}{'accuracy':>9}")
    for name in ("ddpm1000", "ddim50", "ddim20", "ddim50_unbatched"):
        acc = "-" if s[name]["accuracy"] is None else f"{100 * s[name]['accuracy']:.0f}%"
        note = " (20 steps timed, x50)" if s[name].get("extrapolated") else ""
        print(f"{name:<26}{s[name]['seconds']:8.1f}{acc:>9}{note}")
    print(f"DDIM 50 is {s['ddpm1000']['seconds'] / s['ddim50']['seconds']:.1f}x faster than DDPM 1000 | "
          f"sampling peak RSS {s['peak_rss_mb']:.0f} MB")
    ls = R["lora_sampling"]
    print("LoRA sampling (DDIM 20): " + ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in ls.items())
          + f" | merged/base {ls['merged']['seconds'] / ls['base']['seconds']:.3f}, "
          f"unmerged/base {ls['unmerged']['seconds'] / ls['base']['seconds']:.3f}")
    c = R["sample_cli"]
    print(f"python sample.py --label 7: {c['end_to_end_s']:.1f}s end to end (imports {c['import_s']:.1f}s, "
          f"load {c['load_s']:.2f}s, sampling {c['sample_s']:.1f}s)")


if __name__ == "__main__":
    main()
