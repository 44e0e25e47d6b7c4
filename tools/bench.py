"""How fast, how much memory, how much of the machine: `python tools/bench.py` (`--quick` for seconds).

Each section runs in its own process so that its peak memory (max RSS) is its own. Prints a
table and writes JSON. Ratios measured in the same run are what the README quotes; absolute
numbers are only true for the machine they were measured on.
"""
import os  # isort:skip
import sys  # isort:skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's modules
sys.path.insert(0, ROOT)
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line

import argparse
import json
import resource
import statistics
import subprocess
import time

import torch

from config import PRESETS, DiffusionConfig, LoraConfig, ModelConfig, SampleConfig, TrainConfig
from harness.cli import Parser, explicit_flags, run_cli
from harness.dist import DeviceError, pick_device
from harness.files import (DEFAULT_CHECKPOINT, CheckpointError, check_outputs, dataset_of, load_model,
                           shipped_unless_trained, write_json)

GUIDED = SampleConfig(guidance=2.0)      # what a sampling step costs: two network passes



def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronizer(device):
    """A call that waits for the device's queued work (GPU kernels run asynchronously)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, warmup, reps):
    """Median wall time of fn() over reps calls after warmup calls; also the first call's time."""
    first = None
    for _ in range(warmup):
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
    """GFLOP/s of a large fp32 (and bf16) matmul on this device and thread count: the practical
    peak that the training step's FLOP/s is compared against."""
    sync = synchronizer(device)
    if device.type == "cuda":
        n = 8192
        torch.backends.cuda.matmul.allow_tf32 = False      # a true fp32 peak; TF32 is measured apart
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        sec, _ = timed(lambda a=a, b=b: (a @ b, sync()), 2, reps)
        out[f"{name}_gflops"] = 2 * n ** 3 / sec / 1e9
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        sec, _ = timed(lambda: (a @ b, sync()), 2, reps)
        out["tf32_gflops"] = 2 * n ** 3 / sec / 1e9
    return out


MODES = {  # name: (channels_last, bf16 autocast, torch.compile)
    "eager": (False, False, False), "channels_last": (True, False, False), "bf16": (True, True, False),
    "compile": (True, False, True), "compile_bf16": (True, True, True)}


def model_config(preset):
    """The ModelConfig of a config.py preset (cpu = the defaults)."""
    from dataclasses import fields
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in PRESETS[preset].items() if k in names})


def train_step_fn(mode, device, batch, cfg, lora_config=None):
    """train.py's training step (train.train_step) under `mode` (MODES), on random data of
    MNIST's size. -> (step_fn, optimizer, data)."""
    from diffusion import Diffusion
    from train import new_loop_state, train_step
    from unet import UNet
    channels_last, bf16, compiled = MODES[mode]
    tcfg = TrainConfig(batch_size=batch, channels_last=channels_last, precision="bf16" if bf16 else "fp32",
                       compile=compiled)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(cfg).to(device).to(memory_format=layout)
    if lora_config:
        import lora
        lora.inject_lora(model, lora_config.targets, lora_config.r, lora_config.alpha)
        lora.mark_only_lora_trainable(model)
    diffusion = Diffusion(DiffusionConfig(), cfg.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    state = new_loop_state(model, params, tcfg, 4500)
    data = (torch.rand(4500, 1, 28, 28, device=device) * 2 - 1).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (4500,), device=device)
    net = torch.compile(model) if compiled else model
    sync = synchronizer(device)

    def step():
        idx = torch.randint(0, 4500, (batch,), device=device)
        x0, y = data[idx], labels[idx]
        randomness = diffusion.draw(batch, x0.shape[1:], device)
        train_step(net, model, diffusion, x0, y, randomness, state, params, tcfg)
        sync()
    return step, state["optimizer"], data


def section_train(args, device):
    """Median time of a training step under one mode; FLOPs per image; optimizer state; memory.
    The matmul peak the utilisation is measured against is timed interleaved with the steps,
    in this process: both see the same clock speed, cache and neighbours, so their ratio is
    stable where two separately timed numbers are not."""
    cfg = model_config(args.preset)
    step, opt, data = train_step_fn(args.mode, device, args.batch, cfg, LoraConfig() if args.lora else None)
    t = time.perf_counter()
    step()                                       # the first step pays for set-up (and compilation)
    first = time.perf_counter() - t
    for _ in range(3 if "compile" in args.mode else 2):
        step()
    dtype = torch.bfloat16 if "bf16" in args.mode else torch.float32
    sec, peak = interleaved(step, matmul_fn(device, dtype), args.reps)
    idx = torch.randint(0, 4500, (args.batch,), device=device)
    sync = synchronizer(device)
    data_sec, _ = timed(lambda: (data[idx], sync()), 3, 20)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    out = {"img_per_s": args.batch / sec, "ms_per_step": 1000 * sec, "data_ms_per_step": 1000 * data_sec,
           "first_step_s": first, "optimizer_state_mb": state / 2 ** 20, "peak_rss_mb": peak_rss_mb(),
           "interleaved_peak_gflops": peak}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if args.mode == "eager" and not args.lora:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            step()
        out["gflop_per_image"] = counter.get_total_flops() / args.batch / 1e9
    return out


def matmul_fn(device, dtype, n=1024):
    """One n x n matmul: -> (fn, its FLOPs)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = synchronizer(device)
    return (lambda: (a @ b, sync())), 2 * n ** 3


def interleaved(step, matmul, reps):
    """step and matmul timed alternately, reps times each: -> (median step seconds, median
    matmul GFLOP/s)."""
    fn, flops = matmul
    fn()
    steps, peaks = [], []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(4):
            fn()
        peaks.append(4 * flops / (time.perf_counter() - t) / 1e9)
    return statistics.median(steps), statistics.median(peaks)


def section_profile(args, device):
    """torch.profiler over 5 training steps (channels_last, as train.py): the top operators
    by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile
    step, _, _ = train_step_fn("channels_last", device, args.batch, model_config(args.preset))
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"total_ms_per_step": total / 5 / 1000,
            "top": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 5 / 1000,
                     "share": e.self_cpu_time_total / total, "calls_per_step": e.count / 5} for e in events[:15]]}


def section_sample(args, device):
    """Sampling 100 images (10 per digit) with several samplers, and their accuracy."""
    import evaluate
    from diffusion import Diffusion
    model, diff_cfg, ckpt = load_model(args.checkpoint, device)
    model = model.to(memory_format=torch.channels_last)
    d = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    clf = evaluate.get_classifier(dataset_of(ckpt), "data", progress=False)[0]   # as every script: ./data
    y = torch.arange(10, device=device).repeat_interleave(args.n // 10)

    def guided(x, t, labels):      # guidance as two separate passes, for comparison
        cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, model.cfg.num_classes))
        return uncond + 2.0 * (cond - uncond)

    results, mid = {}, d.T // 2                     # a timestep mid-way through the process
    x = torch.randn(2 * len(y), 1, 28, 28, device=device)
    with torch.no_grad():                           # warm-up: oneDNN sets up its kernels per shape
        model(x, torch.full((len(x),), mid, device=device), y.repeat(2))
        d.predict_eps_x0(model, x[:len(y)], mid, y, GUIDED)
    runs = [("ddim20", "ddim", 20, True), ("ddim50", "ddim", 50, True), ("ddim50_unbatched", "ddim", 50, False)]
    if args.full_ddpm:
        runs.append((f"ddpm{d.T}", "ddpm", d.T, True))
    for name, sampler, steps, batched in runs:
        g = torch.Generator(device).manual_seed(0)
        t0 = time.perf_counter()
        if batched:
            x = d.sample(model, y, SampleConfig(sampler=sampler, steps=steps, guidance=2.0), generator=g)
        else:
            x = d.sample(guided, y, SampleConfig(sampler=sampler, steps=steps, guidance=1.0), generator=g)
        sec = time.perf_counter() - t0
        acc = (evaluate.classify(clf, x.cpu())[0].argmax(1) == y.cpu()).float().mean().item()
        results[name] = {"seconds": sec, "accuracy": acc}
    if not args.full_ddpm:  # every DDPM step is one guided network call: time 20, scale to all T
        x = torch.randn(len(y), 1, 28, 28, device=device)
        sec, _ = timed(lambda: d.predict_eps_x0(model, x, mid, y, GUIDED), 2, 20)
        results[f"ddpm{d.T}"] = {"seconds": d.T * sec, "accuracy": None, "extrapolated": True}
    results["T"] = d.T
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def section_lora_sampling(args, device):
    """Base vs LoRA-unmerged vs LoRA-merged: one guided network call on the batch DDIM sampling
    of n images makes (2n images), timed round-robin so that drift hits all three alike."""
    import copy

    import lora
    from diffusion import Diffusion
    base, diff_cfg, _ = load_model(args.checkpoint, device)
    unmerged = copy.deepcopy(base)
    lc = LoraConfig()                                       # the article's form: qkv r4 (italic's default)
    lora.inject_lora(unmerged, lc.targets, lc.r, lc.alpha)
    for layer in lora.lora_layers(unmerged):
        torch.nn.init.normal_(layer.lora_B, std=0.01)    # a trained-looking adapter, not B = 0
    merged = copy.deepcopy(unmerged)
    for layer in lora.lora_layers(merged):
        layer.merge()
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    d = Diffusion(diff_cfg, base.cfg.num_classes).to(device)
    y = torch.arange(10, device=device).repeat_interleave(args.n // 10)
    x = torch.randn(len(y), 1, 28, 28, device=device)
    sync = synchronizer(device)
    times, mid = {k: [] for k in models}, d.T // 2     # a timestep mid-way through the process
    with torch.no_grad():
        for model in models.values():                                   # warm-up
            d.predict_eps_x0(model, x, mid, y, GUIDED)
        for _ in range(args.reps * 3):
            for name, model in models.items():
                t = time.perf_counter()
                d.predict_eps_x0(model, x, mid, y, GUIDED)
                sync()
                times[name].append(time.perf_counter() - t)
    return {k: {"ms_per_call": 1000 * statistics.median(v)} for k, v in times.items()}


def section_cli(args, device):
    """Where `python sample.py --label 7` spends its time, measured inside one process."""
    code = "import time; t = time.perf_counter(); import sample; print(time.perf_counter() - t)"
    import_s = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout)     # torch + this project, in a fresh process
    import sample
    t1 = time.perf_counter()
    model, diff_cfg, _ = load_model(args.checkpoint, device)
    t2 = time.perf_counter()
    from diffusion import Diffusion
    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    sample.generate(model, diffusion, [7], 10, sample.model_sampling(diff_cfg))   # as sample.py does
    t3 = time.perf_counter()
    return {"import_s": import_s, "load_s": t2 - t1, "sample_s": t3 - t2}


SECTIONS = {"matmul": lambda a, d: matmul_peak(d), "train": section_train, "sample": section_sample,
            "lora_sampling": section_lora_sampling, "cli": section_cli, "profile": section_profile}


def run_section(name, args, **extra):
    """Run one section in a fresh process; returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--device", args.device,
           "--batch", str(args.batch), "--reps", str(args.reps), "--n", str(args.n), "--preset", args.preset,
           "--checkpoint", args.checkpoint, "--threads", str(args.threads), "--full-ddpm", str(args.full_ddpm)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    print(f"bench.py: {name} {' '.join(f'{k}={v}' for k, v in extra.items())}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:   # e.g. torch.compile without a working compiler: report, go on
        last = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"bench.py: section {name} {extra} failed: {last}", file=sys.stderr)
        return {"error": last}
    return json.loads(r.stdout.strip().splitlines()[-1])


def quick(args, modes, given):
    """--quick: 3 repetitions, 20 images, no compile (it alone takes minutes on a small CPU) --
    each unless its flag was given. -> the modes to run (args.reps and args.n are set)."""
    args.reps, args.n = (args.reps if "reps" in given else 3), (args.n if "n" in given else 20)
    return modes if "modes" in given else [m for m in modes if "compile" not in m]


def main(argv=None):
    p = Parser(description="Benchmark training and sampling speed, memory and hardware utilisation.")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and images: seconds, not minutes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="model size for the training rows (config.py presets; default: cpu = the default model)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model for sampling")
    p.add_argument("--batch", type=int, default=0, help="training batch (default: the preset's; 64 for cpu, whose train.py runs use 32)")
    p.add_argument("--reps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--n", type=int, default=100, help="images per sampling measurement (a multiple of 10)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--modes", default="", help=f"training variants out of {','.join(MODES)} (default: all; "
                   "on a CPU all but compile_bf16)")
    p.add_argument("--json", default=os.path.join("runs", "bench.json"), help="where to write the results")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--full-ddpm", type=int, default=-1,
                   help="1: run DDPM's 1,000 steps for real to get its accuracy (minutes on a CPU); "
                        "0: time 20 steps and scale (default: 1 on cuda, 0 on cpu)")
    args = p.parse_args(argv)
    if not 0 <= args.threads <= 4096:
        p.error(f"--threads {args.threads}: must be between 0 (torch's default) and 4096")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: expected cpu or cuda")
    try:
        device = pick_device(args.device)          # as train.py: TF32 on CUDA
    except DeviceError as e:
        p.error(str(e))
    args.batch = args.batch or PRESETS[args.preset].get("batch_size", 64)
    if args.full_ddpm not in (-1, 0, 1):
        p.error(f"--full-ddpm {args.full_ddpm}: expected 0 or 1")
    if args.full_ddpm < 0:
        args.full_ddpm = int(device.type == "cuda")
    if args.preset == "gpu" and device.type == "cpu" and not args.section:
        print("note: --preset gpu on a CPU: its first training step alone takes minutes, each measurement more; "
              "the cpu preset measures this machine in seconds", flush=True)
    if args.section:                       # child process: one measurement, JSON on stdout
        print(json.dumps(SECTIONS[args.section](args, device)))
        return
    modes = [m for m in (args.modes or ",".join(MODES)).split(",") if m]
    if not args.modes and device.type == "cpu":
        modes.remove("compile_bf16")
    if not modes or any(m not in MODES for m in modes) or "eager" not in modes:
        p.error(f"--modes: a list of {', '.join(MODES)} that includes eager (the FLOP count)")
    if args.quick:
        modes = quick(args, modes, explicit_flags(p, argv))
    if args.n < 10 or args.n % 10 or args.batch < 1 or args.reps < 1:
        p.error("--n must be a positive multiple of 10; --batch and --reps >= 1")
    if not args.json.lower().endswith(".json"):
        p.error(f"--json {args.json}: the results are JSON; give a name ending in .json")
    args.checkpoint = shipped_unless_trained(args.checkpoint, DEFAULT_CHECKPOINT)
    if not os.path.isfile(args.checkpoint):
        p.error(f"{args.checkpoint} not found (run `python train.py` first)")
    try:
        T = load_model(args.checkpoint)[1].timesteps
    except CheckpointError as e:
        p.error(str(e))
    if T < 50:                                       # the rows are DDIM 20 and 50 steps, and DDPM's T
        p.error(f"--checkpoint {args.checkpoint}: T = {T}, fewer than the 50 steps the sampling rows run; "
                "bench a model trained with --timesteps 50 or more")
    try:
        partial = os.path.splitext(args.json)[0] + ".partial.json"      # until the end: --json stays as it was
        check_outputs({"--json": args.json, "the partial results": partial,
                       "the sample.py run's PNG": os.path.splitext(args.json)[0] + "_sample_7.png"},
                      {"--checkpoint": args.checkpoint}, create=True)   # before any work
    except CheckpointError as e:
        p.error(str(e))
    print(f"results: {args.json} at the end; until then (and if stopped) what is measured is in {partial}", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    R = {"machine": f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads",
         "device": args.device, "preset": args.preset, "batch": args.batch, "n": args.n}
    R["matmul"] = run_section("matmul", args)
    R["train"] = {}
    for m in modes:
        R["train"][m] = run_section("train", args, mode=m)
        write_json(partial, R)                    # partial results survive an interrupted run
    R["lora_train"] = run_section("train", args, mode="channels_last", lora=1)
    R["profile"] = run_section("profile", args)
    R["sample"] = run_section("sample", args)
    write_json(partial, R)
    R["lora_sampling"] = run_section("lora_sampling", args)
    out_png = os.path.splitext(args.json)[0] + "_sample_7.png"          # beside --json, checked with it
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--label", "7", "--checkpoint",
                        args.checkpoint, "--device", args.device, "--out", out_png], capture_output=True, text=True,
                       check=False)
    R["sample_cli"] = {"end_to_end_s": time.perf_counter() - t0 if r.returncode == 0 else None,
                       **run_section("cli", args)}
    write_json(args.json, R)
    os.remove(partial)
    report(R)
    print(args.json)


def report(R):
    """The table the README quotes (a failed section is reported, not fatal)."""
    peak, eager = R["matmul"], R["train"]["eager"]
    flop = eager.get("gflop_per_image", float("nan"))
    if "error" in peak:
        peak = {"fp32_gflops": float("nan"), "bf16_gflops": float("nan")}
    print(f"machine: {R['machine']} | matmul peak fp32 {peak['fp32_gflops']:.0f}, bf16 {peak['bf16_gflops']:.0f}"
          + (f", tf32 {peak['tf32_gflops']:.0f}" if "tf32_gflops" in peak else "") + " GFLOP/s | "
          f"{flop:.3f} GFLOP per training image (forward + backward) | preset {R['preset']}")
    mem = "GPU MB" if R["device"] == "cuda" else "RSS MB"
    header = f"training (batch {R['batch']})"
    print(f"{header:<28}{'img/s':>8}{'ms/step':>9}{'util.':>7}{mem:>8}{'opt MB':>8}")
    lc = LoraConfig()
    rows = {**{f"full, {m}": r for m, r in R["train"].items()}, f"LoRA {lc.targets} r{lc.r}, chan.last": R["lora_train"]}
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<28} failed: {r['error']}")
            continue
        ref = r.get("interleaved_peak_gflops") or (peak["bf16_gflops"] if "bf16" in name
                                                   else peak.get("tf32_gflops", peak["fp32_gflops"]))
        util = f"{100 * flop * r['img_per_s'] / ref:.0f}%" if name.startswith("full") else "-"
        memory = r.get("peak_gpu_mb", r["peak_rss_mb"])
        print(f"{name:<28}{r['img_per_s']:8.0f}{r['ms_per_step']:9.1f}{util:>7}{memory:8.0f}"
              f"{r['optimizer_state_mb']:8.2f}")
    print("util. = FLOP/s of the step / an n=1024 matmul's FLOP/s, the two timed interleaved in one process")
    prof = R.get("profile", {})
    if "top" in prof:
        print(f"where a training step's time goes (torch.profiler, channels_last, "
              f"{prof['total_ms_per_step']:.0f} ms of operator time per step):")
        for e in prof["top"][:12]:
            print(f"  {e['op']:<44}{e['self_ms_per_step']:8.1f} ms {100 * e['share']:5.1f}%  x{e['calls_per_step']:.0f}")
    for m, r in R["train"].items():
        if "compile" in m and "error" not in r:
            print(f"{m}: first step (compilation) {r['first_step_s']:.0f} s")
    if "error" not in eager:
        print(f"data time per step (indexing the in-memory tensor): {eager['data_ms_per_step']:.3f} ms")
    s = R["sample"]
    if "error" in s:
        print(f"sampling failed: {s['error']}")
    else:
        header = f"sampling {R['n']} images"
        print(f"{header:<28}{'seconds':>8}{'accuracy':>9}")
        T = s.get("T", 1000)                   # results written before T was recorded: 1,000
        for name in (f"ddpm{T}", "ddim50", "ddim20", "ddim50_unbatched"):
            acc = "-" if s[name]["accuracy"] is None else f"{100 * s[name]['accuracy']:.0f}%"
            note = f" (20 steps timed, x{T / 20:g})" if s[name].get("extrapolated") else ""
            print(f"{name:<28}{s[name]['seconds']:8.2f}{acc:>9}{note}")
        print(f"DDIM 50 is {s[f'ddpm{T}']['seconds'] / s['ddim50']['seconds']:.1f}x faster than DDPM {T}; "
              f"batching guidance {s['ddim50_unbatched']['seconds'] / s['ddim50']['seconds']:.2f}x | "
              f"sampling peak RSS {s['peak_rss_mb']:.0f} MB")
    ls = R["lora_sampling"]
    if "error" not in ls:
        print(f"one guided network call ({R['n']} images x 2): "
              + ", ".join(f"{k} {v['ms_per_call']:.2f} ms" for k, v in ls.items())
              + f" | merged/base {ls['merged']['ms_per_call'] / ls['base']['ms_per_call']:.3f}, "
              f"unmerged/base {ls['unmerged']['ms_per_call'] / ls['base']['ms_per_call']:.3f}")
    c = R["sample_cli"]
    if "error" not in c and c["end_to_end_s"]:
        print(f"python sample.py --label 7: {c['end_to_end_s']:.1f} s end to end; in-process: imports "
              f"{c['import_s']:.1f} s, load {c['load_s']:.2f} s, sampling {c['sample_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
