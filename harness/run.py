"""A training run's safety: its folder (judged, locked, --overwrite only once the new run has
loaded), --resume (the stored configuration wins; flags that contradict it are refused; the
loop state restored bit-exactly), Steps (the batches, noise, progress and Ctrl-C around
train.py's loop), the stops before a non-finite step, and what happens after the loop.
"""
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import fields, replace

import torch
from tqdm import tqdm

from config import TrainConfig, config_from_dict
from harness.dist import Dist, launched_by_torchrun
from harness.files import (CheckpointError, RunLock, check_outputs, dataset_of, first_line, load_checkpoint,
                           not_a_regular_file, prepare_run_folder, pyplot, remove_run_files, save_figure, shown,
                           write_json)


class TrainingError(Exception):
    """Training cannot go on (bad flags, a non-finite loss, ...); the message says why."""


# ----- the run folder and --resume -----

RECORD = "run.json"     # a run folder's record of itself: {"kind": ..., "files": [...], "pattern": ...}


def read_record(folder):
    """The record a run left in `folder` (see RECORD), or None when there is none."""
    path = os.path.join(folder, RECORD)
    if not os.path.lexists(path):
        return None
    kind = not_a_regular_file(path)
    if kind:
        raise CheckpointError(f"{shown(path)}: is a {kind}, not a run record (remove it)")
    try:
        with open(path) as f:
            record = json.load(f)
        ok = (isinstance(record, dict) and isinstance(record.get("kind"), str)
              and isinstance(record.get("files"), list) and all(isinstance(n, str) for n in record["files"])
              and isinstance(record.get("pattern"), (str, type(None))))
    except (OSError, ValueError, RecursionError) as e:      # RecursionError: JSON nested thousands deep
        raise CheckpointError(f"{shown(path)}: not a readable run record ({first_line(e)})") from e
    if not ok or any(os.path.isabs(n) or ".." in n.split("/") for n in record["files"]):
        raise CheckpointError(f"{shown(path)}: not a run record of this project (altered?); remove it only if "
                              "the folder holds no run you want to keep")
    return record


def check_kind(folder, kind):
    """One run per folder: a folder whose record names another kind of run is refused, whatever
    the flags. -> the folder's record, or None."""
    record = read_record(folder) if os.path.isdir(folder) else None
    if record is not None and record["kind"] != kind:
        raise CheckpointError(f"{shown(folder)} holds a {record['kind']} run ({RECORD}); a {kind} run cannot "
                              "continue or replace it: choose another --out")
    return record


def own_part(record, known, pattern):
    """What --overwrite may remove of an earlier run: the files its record lists that this script
    can write (`known`), and its step-grid pattern only if it is this script's own -- a record
    edited to list a user's file or to match everything removes nothing more."""
    return {"files": [n for n in record["files"] if n in known],
            "pattern": record["pattern"] if record["pattern"] == pattern else None}


def check_not_inputs(folder, names, inputs):
    """A new run never starts in a folder whose earlier run wrote a file this run reads (a LoRA
    run whose --checkpoint is the --full model of that folder): --overwrite would remove it."""
    for label, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else (paths or []):
            for name in names:
                if os.path.exists(path) and os.path.lexists(os.path.join(folder, name)) and \
                        os.path.samefile(path, os.path.join(folder, name)):
                    raise CheckpointError(f"{label} {shown(path)} is the {name} of the run in {shown(folder)}, "
                                          "which a new run there would replace; choose another --out")


def check_record(folder, kind, resume, overwrite, found):
    """check_kind, and: --overwrite on files that no record lists (a run from before records
    existed, or not this project's) is refused, as --overwrite only ever removes what a record
    lists. -> the earlier run's record, or None."""
    record = check_kind(folder, kind)
    if record is None and found and overwrite and not resume:
        raise CheckpointError(f"{shown(folder)} holds {', '.join(found)} but no {RECORD} saying which run wrote "
                              "them (an older version's run, or not this project's); --overwrite removes only "
                              "what a run's record lists: move them away, or choose another --out")
    return record


def open_run(tcfg, resume, overwrite, ckpt_name, writes=(), inputs=None, folders=None, given=(), sections=None,
             write_folders=None, old_pattern=None, kind="training", known=()):
    """Threads, process group (under torchrun) and device; the run folder, judged and locked by
    rank 0: outputs checked against inputs, the no-clobber rule, one writer; on --resume the
    checkpoint and its stored TrainConfig (flags that contradict the stored run are refused);
    the seed.

    writes: the other files the run writes in tcfg.out (the no-clobber rule covers them all);
    write_folders: {name: its files} for those of `writes` that are folders (an export), not files:
    every other name must be a regular file or absent, checked before any work (not an
    IsADirectoryError at the end); old_pattern: a regex for the names of files the run writes
    besides (step grids). On --overwrite all of them, the earlier run's, go at run.start_fresh();
    inputs / folders: {label: path} of the files and dataset folders the run reads, which no
    output may be or lie in; given: the flags given on the command line (harness.cli.explicit_flags);
    sections: {name: config built from the flags} of the other stored configs ("model", "lora",
    ...), checked against the checkpoint's on --resume; kind: "training" or "fine-tuning", what the
    folder's record (RECORD) must say, if it has one; known: every file this script may write in a
    run folder (all its variants), the most --overwrite ever removes.
    -> (dist, tcfg, checkpoint path, checkpoint or None, run): a HeldRun; use it in a `with` (the
    lock goes when the run is over, however it ends) and call run.start_fresh() before training."""
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    dist = Dist(tcfg.device)                          # refuses a half-set torchrun environment first
    ckpt_path = os.path.join(tcfg.out, ckpt_name)
    earlier, record, created = None, None, False
    if not tcfg.out:
        raise CheckpointError("--out is empty: name a run folder")
    if os.path.exists(tcfg.out) and not os.path.isdir(tcfg.out):
        raise CheckpointError(f"--out {shown(tcfg.out)}: is a file, not a run folder")
    if judges_run_folder(dist):
        write_folders = write_folders or {}
        files = [n for n in (ckpt_name, *writes) if n not in write_folders]
        mine = files + [os.path.join(d, n) for d, names in write_folders.items() for n in names]
        record = {"kind": kind, "files": mine, "pattern": old_pattern}
        recorded = check_kind(tcfg.out, kind)             # first: the most telling refusals
        if recorded and not resume:
            check_not_inputs(tcfg.out, recorded["files"], inputs or {})
        recorded = recorded is not None
        outputs = [("this run's file", os.path.join(tcfg.out, n)) for n in files]
        check_outputs(outputs[:1], inputs or {}, folders or {}, create=True, weights_ok=True)   # its own checkpoint
        check_outputs(outputs[1:], inputs or {}, folders or {}, create=True,    # an adapter: only beside that
                      weights_ok=os.path.isfile(ckpt_path))                      # checkpoint, never another run's
        created = not os.path.lexists(tcfg.out)
    run = HeldRun(None, tcfg.out, created=created)
    try:
        if record is not None:
            with interrupts_held():                   # Ctrl-C here: raised once the folder is set up (or
                found = prepare_run_folder(tcfg.out, resume, overwrite, ckpt_name, writes, recorded)  # refused),
                check_record(tcfg.out, kind, resume, overwrite, found)     # so the folder it made goes again
                run.lock = RunLock(tcfg.out, files + [RECORD], old_pattern)
                found = prepare_run_folder(tcfg.out, resume, overwrite, ckpt_name, writes, recorded)  # again
                earlier = check_record(tcfg.out, kind, resume, overwrite, found)    # under the lock: a writer
            if overwrite and not resume and earlier is not None:          # that just finished counts
                earlier = own_part(earlier, set(mine) | set(known), old_pattern)    # what start_fresh() removes
            else:
                earlier = None
        ckpt = load_checkpoint(ckpt_path) if resume else None
        if ckpt is not None:
            check_loop_state(ckpt, ckpt_path)
            tcfg = resume_config(ckpt, tcfg, given, sections)
        torch.manual_seed(tcfg.seed)
    except BaseException:
        run.close()
        raise
    run.earlier, run.record = earlier, record
    return dist, tcfg, ckpt_path, ckpt, run


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (or SIGTERM, where it raises KeyboardInterrupt too) during the block is raised when
    the block is over (a few milliseconds later), so that what it sets up (a folder and its lock)
    is whole when the interrupt cleans it up."""
    main = threading.current_thread() is threading.main_thread()
    held = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    held = {s: h for s, h in held.items() if callable(h)}     # a Python handler: one that raises
    caught = []
    for s in held:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


class HeldRun(contextlib.AbstractContextManager):
    """What open_run hands back: the run folder's lock (rank 0; none on the other ranks), released
    at the end of the `with`; the earlier run's record, whose files --overwrite removes; this run's
    record; whether this run created the folder (a start that fails leaves no empty folder)."""

    held = set()        # the runs of this process not closed yet: run_cli closes them however main() ends

    def __init__(self, lock, folder, earlier=None, record=None, created=False):
        self.lock, self.folder, self.earlier, self.record, self.created = lock, folder, earlier, record, created
        HeldRun.held.add(self)

    def start_fresh(self):
        """Called once the new run has loaded its model and data, before it writes anything: with
        --overwrite the earlier run's files (those its record lists) go now, so that a typo in a flag
        never costs the old run (see remove_run_files); then this run's record is written."""
        if self.earlier:
            remove_run_files(self.folder, self.earlier["files"], self.earlier["pattern"])
            self.earlier = None
        if self.lock and self.record:                 # rank 0
            write_json(os.path.join(self.folder, RECORD), self.record)

    def close(self):
        """Release the run folder's lock (what the end of the `with` does); remove the folder if this
        run created it and wrote nothing but its record."""
        HeldRun.held.discard(self)
        if self.lock:
            self.lock.release()
        if self.created:
            try:
                if os.listdir(self.folder) == [RECORD]:     # failed before its first file: the record of nothing
                    os.remove(os.path.join(self.folder, RECORD))
                os.rmdir(self.folder)                 # only if empty
            except OSError:
                pass

    def __exit__(self, *exc):
        self.close()


def judges_run_folder(dist):
    """Rank 0 checks and locks the run folder; the other ranks of a real process group write
    nothing there. A process that only looks like a rank (RANK set, no initialised group) is
    rank 0 of 1 and judges like any other."""
    import torch.distributed as td
    group = dist.enabled and launched_by_torchrun() and td.is_available() and td.is_initialized()
    return dist.main or not group


# --resume continues the stored run. These come from the flags: where and how long to run ...
RESUME_FROM_FLAGS = ("device", "threads", "out", "max_steps")
# ... and these too when given: a larger --steps or --epochs extends the run (the LR schedule
# re-spans the new length); the rest only say how often to save, log and look.
RESUME_IF_GIVEN = ("steps", "epochs", "ckpt_every", "log_every", "sample_every", "eval_every", "eval_n", "compile",
                   "data_dir")      # a moved data folder: its digits are checked against the run's (harness/scripts.py)


def resume_conflicts(stored, flags, given, skip=()):
    """Fields given on the command line whose value differs from the stored run's:
    ["--lr 0.1 (the run has 0.002)", ...]."""
    def text(v):
        return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    return [f"--{f.name.replace('_', '-')} {text(getattr(flags, f.name))} (the run has {text(getattr(stored, f.name))})"
            for f in fields(flags) if f.name in given and f.name not in skip
            and getattr(flags, f.name) != getattr(stored, f.name)]


def resume_config(ckpt, tcfg, given=(), sections=None):
    """On --resume the stored configuration wins: the TrainConfig comes from the checkpoint but
    for RESUME_FROM_FLAGS (and RESUME_IF_GIVEN, when given), and the data is the one the run
    really used. A flag given on the command line that contradicts the stored run (training or
    one of `sections`: {name: config from the flags}) is refused, all of them in one line."""
    try:
        stored = config_from_dict(TrainConfig, ckpt["config"]["train"])
        stored_sections = {name: config_from_dict(type(cfg), ckpt["config"][name])
                           for name, cfg in (sections or {}).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"stored configuration does not fit this code ({e})") from e
    data = dataset_of(ckpt, stored.dataset)
    conflicts = resume_conflicts(stored, tcfg, given, skip=RESUME_FROM_FLAGS + RESUME_IF_GIVEN + ("dataset",))
    if "dataset" in given and tcfg.dataset not in (stored.dataset, data):
        conflicts.append(f"--dataset {tcfg.dataset} (the run has {data})")
    for name, cfg in (sections or {}).items():
        conflicts += resume_conflicts(stored_sections[name], cfg, given)
    if conflicts:
        raise TrainingError("--resume continues the run with its stored configuration; these flags contradict it: "
                            + "; ".join(conflicts) + " (drop them, or start a new run with another --out)")
    extra = {name: getattr(tcfg, name) for name in RESUME_IF_GIVEN if name in given}
    unit = "epochs" if stored.epochs else "steps"     # a run is extended in its own unit
    other = "steps" if stored.epochs else "epochs"    # (an --epochs beside a preset's --steps counts as epochs)
    if other in given and (unit == "steps" or "epochs" not in given):
        raise TrainingError(f"--{other}: this run is counted in {unit} (set for {getattr(stored, unit)}); "
                            f"on --resume give --{unit} to extend it")
    extra.pop(other, None)
    if unit in given and extra[unit] < getattr(stored, unit):
        raise TrainingError(f"--{unit} {extra[unit]}: the run was set for {getattr(stored, unit)}; "
                            f"on --resume --{unit} can only extend it")
    if tcfg.max_steps and tcfg.max_steps < ckpt.get("step", 0):
        raise TrainingError(f"--max-steps {tcfg.max_steps}: the run is already at step {ckpt['step']}")
    return replace(stored, **{name: getattr(tcfg, name) for name in RESUME_FROM_FLAGS}, **extra, dataset=data)


def memory_format(tcfg):
    """NHWC (channels_last) makes the convolutions faster on CPU (measured); else NCHW."""
    return torch.channels_last if tcfg.channels_last else torch.contiguous_format


def place_data(x, y, device, tcfg):
    """The whole training set as two tensors on the device: a batch is one index operation."""
    return x.to(device).contiguous(memory_format=memory_format(tcfg)), y.to(device)


def run_length(n_images, tcfg):
    """-> (steps per epoch, steps of the LR schedule, step to stop at). --steps (or, when given,
    --epochs) sizes the schedule; --max-steps stops earlier without changing it."""
    steps_per_epoch = max(1, n_images // tcfg.batch_size)
    total = tcfg.epochs * steps_per_epoch if tcfg.epochs else tcfg.steps
    return steps_per_epoch, total, min(total, tcfg.max_steps) if tcfg.max_steps else total


def loop_state_dict(state):
    """What --resume needs besides the weights: optimiser, LR schedule, EMA count, step, losses, RNG."""
    return {"ema_n_averaged": int(state["ema"].n_averaged), "optimizer": state["optimizer"].state_dict(),
            "scheduler": state["scheduler"].state_dict(), "step": state["step"], "losses": state["losses"],
            "rng": rng_state()}


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_loop_state(ckpt, path):
    """--resume trusts nothing in the file: the loop state must be what loop_state_dict writes. A
    tampered step, loss list, RNG, optimiser or schedule state is one CheckpointError line, not a
    crash in the loop or a run that counts from step -5."""
    step, losses, rng = ckpt.get("step"), ckpt.get("losses"), ckpt.get("rng")
    opt, sched = ckpt.get("optimizer"), ckpt.get("scheduler")
    problems = [what for what, ok in (
        (f"step {step!r} is not a whole number >= 0", _whole(step)),
        (f"ema_n_averaged {ckpt.get('ema_n_averaged')!r} is not a whole number >= 0",
         _whole(ckpt.get("ema_n_averaged"))),
        ("losses is not a list of (step, loss) pairs",
         isinstance(losses, (list, tuple)) and all(isinstance(l, (list, tuple)) and len(l) == 2 and _whole(l[0])
                                                   and isinstance(l[1], (int, float)) and not isinstance(l[1], bool)
                                                   for l in losses)),
        ("data_fingerprint is not text", isinstance(ckpt.get("data_fingerprint", ""), str)),
        ("figures is not true or false", isinstance(ckpt.get("figures", True), bool)),
        ("rng holds no torch RNG state", isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
         and rng["torch"].dtype == torch.uint8),
        ("optimizer is not an optimiser state (state, param_groups)",
         isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)),
        ("scheduler is not a schedule state (last_epoch, base_lrs)",
         isinstance(sched, dict) and _whole(sched.get("last_epoch")) and isinstance(sched.get("base_lrs"), list)))
        if not ok]
    if problems:
        raise CheckpointError(f"{shown(path)}: the loop state does not fit this code ({'; '.join(problems)}); "
                              "the file was altered or is not a resumable checkpoint")


def restore_loop_state(state, ckpt, path, verbose=True):
    """The inverse of loop_state_dict: continue exactly where the checkpoint stopped."""
    check_loop_state(ckpt, path)
    try:
        state["optimizer"].load_state_dict(ckpt["optimizer"])
        state["scheduler"].load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:   # groups or shapes of another run
        raise CheckpointError(f"{shown(path)}: the stored optimiser, schedule or RNG state does not fit this run "
                              f"({first_line(e)})") from e
    state["ema"].n_averaged.fill_(ckpt["ema_n_averaged"])
    state.update(step=ckpt["step"], losses=[tuple(l) for l in ckpt["losses"]])
    if verbose:                                   # rank 0 only, under torchrun
        print(f"resumed {path} at step {state['step']}")


def rng_state():
    """The global RNGs (dropout masks draw from them; t, noise and dropped labels come from a
    generator seeded per step, which needs no saving)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- the loop -----

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


def autocast_for(tcfg, device):
    """bf16 autocast (bfloat16 matmuls and convolutions, fp32 weights), or nothing."""
    if tcfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_finite(tensors):
    """True when every element of every tensor is finite: one norm over them all is finite exactly
    then (or overflows for weights beyond ~1e19, which are no better)."""
    tensors = [t.detach() for t in tensors]
    if hasattr(torch.nn.utils, "get_total_norm"):                 # torch >= 2.6: fused over the list
        total = torch.nn.utils.get_total_norm(tensors)
    else:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
    return bool(torch.isfinite(total))


class Steps:
    """What train.py's loop iterates over: for each optimiser step, its batch and its randomness,
    plus the bookkeeping around the step (progress bar, loss log, when to checkpoint, Ctrl-C).

    Step s uses global batch s of a DistributedSampler's shuffle, and randomness (t, noise,
    dropped labels) drawn from a generator seeded by (seed, s) for the whole global batch;
    each of the N ranks takes every N-th sample. So 1 or N processes, and a resumed run,
    all see the same samples with the same noise at every step (with --dropout 0, the
    default: dropout masks come from each process's own RNG). Iteration starts at
    state["step"] and ends at the run's last step, or after the step in which Ctrl-C came.
    """

    def __init__(self, data, diffusion, tcfg, state, dist, desc="train"):
        from torch.utils.data import DistributedSampler
        self.x_all, self.y_all = data
        self.diffusion, self.tcfg, self.state, self.dist, self.desc = diffusion, tcfg, state, dist, desc
        B = tcfg.batch_size
        if B % dist.world:
            raise TrainingError(f"--batch-size {B} must be divisible by the {dist.world} processes")
        self.steps_per_epoch, total, self.stop_at = run_length(len(self.x_all), tcfg)
        if total < state["step"]:                     # resumed with --epochs on a run counted in steps, or back
            raise TrainingError(f"the run is already at step {state['step']}; a resumed run's --steps / --epochs "
                                f"can only extend it (this plans {total} steps)")
        self.sampler = DistributedSampler(range(len(self.x_all)), num_replicas=dist.world, rank=dist.rank,
                                          shuffle=True, seed=tcfg.seed, drop_last=True)
        self.mine, self.b = slice(dist.rank, B, dist.world), B // dist.world    # this rank's share of a batch
        self.interrupted, self.outcome = False, "done"
        if tcfg.compile and self.x_all.device.type == "cpu" and dist.main:
            print("--compile on a CPU: compiling takes minutes before the first step (Ctrl-C stops it)", flush=True)

    def batch(self, step, order):
        """Step `step`'s images, labels and (t, noise, drop), this rank's share. -> (x0, y, randomness, order)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        device = self.x_all.device
        if order is None or i == 0:
            self.sampler.set_epoch(epoch)
            order = torch.tensor(list(self.sampler), device=device)           # this rank's shuffle
        idx = order[i * self.b:(i + 1) * self.b]
        g = torch.Generator(device).manual_seed((self.tcfg.seed * 1_000_003 + step) % 2 ** 63)   # fits int64
        t, noise, drop = self.diffusion.draw(self.tcfg.batch_size, self.x_all.shape[1:], device, generator=g,
                                             t_power=self.tcfg.t_power)
        m = self.mine
        return self.x_all[idx], self.y_all[idx], (t[m], noise[m], drop[m]), order

    def __enter__(self):
        self.stop = StopFlag()                          # Ctrl-C: finish the step, save, stop
        self.bar = tqdm(total=self.stop_at, initial=self.state["step"], desc=self.desc, unit="step",
                        dynamic_ncols=True, disable=not self.dist.main)
        self.t_data, self.t_last, self.n_img = 0.0, time.perf_counter(), 0
        return self

    def __exit__(self, *exc):
        self.stop.restore()
        self.bar.close()

    def __iter__(self):
        order = None
        while self.state["step"] < self.stop_at and not self.interrupted:
            t0 = time.perf_counter()
            x0, y, randomness, order = self.batch(self.state["step"], order)
            self.t_data += time.perf_counter() - t0
            yield x0, y, randomness                         # (B/N, 1, 28, 28), (B/N,), (t, noise, drop)
        self.outcome = "interrupted" if self.interrupted else "done"

    def log(self, loss):
        """After each step: the progress bar; every --log-every steps the loss (mean over the
        global batch) joins state["losses"], the loss curve."""
        step, B = self.state["step"], self.tcfg.batch_size
        self.n_img += B
        self.bar.update(1)
        if step % self.tcfg.log_every == 0 or step == self.stop_at:
            now = time.perf_counter()
            loss_value = self.dist.mean(loss)
            self.state["losses"].append((step, loss_value))
            self.bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{self.n_img / (now - self.t_last):.0f}",
                                 data_ms=f"{1000 * self.t_data / max(1, self.n_img // B):.2f}")
            self.t_last, self.n_img, self.t_data = now, 0, 0.0

    def checkpoint_due(self):
        """True on rank 0 every --ckpt-every steps, at the last step, and once Ctrl-C came (then
        the loop ends after this step). Every rank calls it: Ctrl-C on any rank stops them all."""
        step = self.state["step"]
        self.interrupted = self.dist.any(self.stop.set)
        return self.dist.main and (step % self.tcfg.ckpt_every == 0 or step == self.stop_at or self.interrupted)


def check_step(loss, grad_norm, step):
    """Stop before an optimiser step on a non-finite gradient (the same on every rank)."""
    if not torch.isfinite(grad_norm):
        raise TrainingError(f"the loss or its gradient became non-finite (loss {loss.item()}, gradient norm "
                            f"{grad_norm.item()}) at step {step}; stopped without saving (the last good "
                            "checkpoint is untouched). Try a lower --lr.")


def check_weights(params, step, tcfg):
    """Stop after an optimiser step that made the weights non-finite (a step too large for them)."""
    if not all_finite(params):
        raise TrainingError(f"the weights became non-finite (or overflowed) in the optimiser step at step "
                            f"{step} (--lr {tcfg.lr}, --weight-decay {tcfg.weight_decay}); stopped "
                            "without saving (the last good checkpoint is untouched). Try a lower --lr.")


def flag(name, value):
    """["--name", "value"], or ["--name=value"] when the value starts with '-' (argparse would
    take `--out -dash` for two flags)."""
    return [f"{name}={value}"] if str(value).startswith("-") else [name, str(value)]


def resume_command(script, tcfg, *extra, figures=True):
    """The command that continues this run, as printed when it is interrupted: paths quoted for the
    shell, the run's --max-steps (it comes from the command line, not from the checkpoint) and
    --no-figures if it was given. extra: more (flag, value) pairs, flat."""
    invoked = sys.argv[0] if os.path.basename(sys.argv[0]) == script else script   # /path/to/train.py, as run
    words = ["python", invoked, *flag("--out", tcfg.out), "--resume"]
    for name, value in zip(extra[::2], extra[1::2]):
        words += flag(name, value)
    if tcfg.max_steps:
        words += ["--max-steps", str(tcfg.max_steps)]
    return shlex.join(words + ([] if figures else ["--no-figures"]))


def after_fit(outcome, state, dist, model, out, title, resume_hint, figures=True):
    """What both scripts do once the loop ends: check the ranks agree, leave the process group,
    draw the loss curve (rank 0, with figures). -> an exit code when the script stops here
    (other ranks, or an interrupted run: 130), else None."""
    if dist.enabled:
        diff = dist.max_param_difference(model)
        if dist.main:
            print(f"{dist.world} processes: parameters agree across ranks (max difference {diff:.3g})")
        dist.close()
        if not dist.main:
            return 0 if outcome == "done" else 130
    if figures:
        save_loss_curve(state["losses"], os.path.join(out, "loss.png"), title)
    if outcome == "interrupted":
        print(f"interrupted at step {state['step']}: checkpoint saved; continue with `{resume_hint}`")
        return 130
    return None


def smoothed(values, decay=0.9):
    """Exponential moving average of a curve, starting at its first value."""
    out, s = [], values[0]
    for v in values:
        s = decay * s + (1 - decay) * v
        out.append(s)
    return out


def save_loss_curve(losses, path, title="training loss"):
    """losses: list of (step, loss) -> a PNG with the raw and smoothed curves."""
    if not losses:
        return
    plt = pyplot()
    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, alpha=0.3, label="loss")
    ax.plot(steps, smoothed(values), label="smoothed")
    ax.set(xlabel="step", ylabel="MSE", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
