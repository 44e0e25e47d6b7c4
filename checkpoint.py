"""Checkpoints you can trust: state dicts + config, atomic writes, safe loads, clear errors.

A checkpoint is a dict {"model", "ema", "optimizer", "scheduler", "step", "config", "rng", ...}
of tensors and plain Python values, so `torch.load(weights_only=True)` can read it and no
pickled code ever runs.
"""
import functools
import json
import os
import re
import tempfile

import torch

from config import DiffusionConfig, ModelConfig, config_from_dict
from unet import UNet

DEFAULT_CHECKPOINT = os.path.join("runs", "mnist", "ckpt.pt")   # where `python train.py` writes


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit; the message names the file."""


TEMP_MARK = ".tmp-"        # in every temp file's name; a killed writer's are removed under its run folder's lock


def temp_path(path, suffix=""):
    """A new, uniquely named, empty temp file beside `path` (same folder, so os.replace is a
    rename): `.<name>.tmp-XXXXXXXX<suffix>`. The suffix stays last, so writers that add an
    extension when it is missing (np.savez, savefig) write exactly there. -> its path."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{TEMP_MARK}", suffix=suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes it 0600; give the final file the usual mode
    return tmp


@functools.lru_cache(maxsize=None)
def _umask():
    """The process's umask (read once: reading it means setting it for a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn, suffix=""):
    """Call write_fn(tmp_path), then rename over `path`: readers see the old file or the new one,
    never half of one (os.replace is atomic on POSIX and Windows). Each write has its own temp
    name (temp_path), so two writers never write into one file; a killed process's temp file is
    removed the next time its run folder is locked (RunLock)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write, suffix=".json")


def save_checkpoint(path, ckpt):
    """torch.save a dict of state dicts atomically."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def prepare_run_folder(out, resume, overwrite, ckpt_name="ckpt.pt", writes=()):
    """The no-clobber rule: a folder that already holds a run -- any of the files this run
    writes: its checkpoint `ckpt_name` and `writes` -- needs --resume or --overwrite.
    -> the checkpoint path in it."""
    ckpt = os.path.join(out, ckpt_name)
    if resume and not os.path.isfile(ckpt):
        raise CheckpointError(f"--resume: no checkpoint at {ckpt}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out}: is a file, not a run folder")
    found = [n for n in (ckpt_name, *writes) if os.path.lexists(os.path.join(out, n))]
    if found and not (resume or overwrite):
        raise CheckpointError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it "
                              "or --overwrite to start again (or choose another --out)")
    try:
        os.makedirs(out, exist_ok=True)
        os.remove(temp_path(os.path.join(out, "write-test")))
    except OSError as e:
        raise CheckpointError(f"--out {out}: not writable ({e.strerror})") from e
    return ckpt


class RunLock:
    """One writer per run folder: an exclusive flock on <folder>/.lock, held until release()
    (or the end of a `with` block). The kernel drops it when the process dies, even by kill -9,
    so a crashed run never leaves the folder locked. A second process is refused in one line
    that names the holder's PID. Taking the lock also removes the temp files a killed writer
    left behind (nobody else can be writing them)."""

    NAME = ".lock"

    def __init__(self, folder):
        import fcntl                                   # POSIX; imported here so the module loads anywhere
        self.path = os.path.join(folder, self.NAME)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CheckpointError(f"{folder}: cannot create the lock file ({e.strerror})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"{folder} is in use by another process (PID {holder}); "
                                      "wait for it to finish or stop it first") from None
            try:                                     # the holder before us may have removed the file meanwhile
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        remove_stale_temp_files(folder)

    def release(self):
        """Remove the lock file, then drop the lock (in that order: see the inode check above)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


STALE_TEMP = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"\w{8}(\.\w+)?$"    # temp_path's names
                        r"|^.+\.tmp(\.\w+)?$")                               # and the fixed ones of old


def remove_stale_temp_files(folder):
    """Temp files of killed writers in a run folder (call it only while holding the folder's lock)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if STALE_TEMP.match(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


def _same_file(a, b):
    """True when paths a and b name one file: the same real path, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path, folder):
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def check_outputs(outputs, inputs, folders=(), create=False):
    """Outputs are checked against inputs before any work. Refuses, in one CheckpointError line,
    an output path that
      - is one of the input files (after resolving links, `..` and hard links),
      - lies in one of the input folders `folders` (a dataset being read),
      - is an existing folder, or another output,
      - sits in a folder that does not exist or cannot be written.
    outputs: {label: path} or (label, path) pairs, label as the user knows it ("--out"); None
    paths are skipped.
    inputs: {label: path or list of paths} of the files read; folders: {label: folder} read.
    create: the outputs' folder may not exist yet (a run folder): its nearest existing parent
    must then be a writable folder."""
    inputs = {k: [v] if isinstance(v, str) else list(v or []) for k, v in dict(inputs).items()}
    seen = []
    for label, path in (outputs.items() if isinstance(outputs, dict) else outputs):
        if path is None:
            continue
        if os.path.isdir(path):
            raise CheckpointError(f"{label} {path}: is an existing folder; give a file name")
        for what, paths in inputs.items():
            for p in paths:
                if p and _same_file(path, p):
                    raise CheckpointError(f"{label} {path}: is the {what} being read ({p}); "
                                          "refusing to overwrite an input")
        for what, folder in dict(folders).items():
            if folder and os.path.isdir(folder) and _inside(path, folder):
                raise CheckpointError(f"{label} {path}: lies inside the {what} being read ({folder})")
        for other, p in seen:
            if _same_file(path, p):
                raise CheckpointError(f"{label} {path}: is also where {other} writes")
        seen.append((label, path))
        parent = os.path.dirname(os.path.abspath(path))
        while create and not os.path.lexists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)                 # the folder that will be created in
        if not os.path.isdir(parent):
            raise CheckpointError(f"{label} {path}: not writable ({parent} is not an existing folder)")
        try:
            os.remove(temp_path(os.path.join(parent, "write-test")))   # can we create a file? (root ignores os.access)
        except OSError as e:
            raise CheckpointError(f"{label} {path}: not writable ({parent}: {e.strerror})") from e


def load_checkpoint(path):
    """torch.load with weights_only=True; every failure becomes one CheckpointError line."""
    if not os.path.isfile(path):
        hint = " (run `python train.py` first)" if path == DEFAULT_CHECKPOINT else ""
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, forbidden pickle globals, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from e
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model/config)")
    return ckpt


def configs_from_checkpoint(ckpt, path="checkpoint"):
    """The ModelConfig and DiffusionConfig a checkpoint was trained with."""
    try:
        return (config_from_dict(ModelConfig, ckpt["config"]["model"]),
                config_from_dict(DiffusionConfig, ckpt["config"]["diffusion"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config does not fit this code ({e})") from e


def dataset_of(ckpt, default="auto"):
    """The dataset a checkpoint's run really trained on (the resolved name: mnist, mnist-5k, folder)."""
    return ckpt.get("data", default)


def check_finite(tensors, path="checkpoint", what="model"):
    """A result that cannot be right is an error: every floating tensor of a state dict must be
    finite (NaN/inf weights give all-black samples, not a number to report)."""
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: {what} is not a dict of tensors")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: {what} tensor {name} holds non-finite values (nan or inf): "
                                  "the run diverged or the file was altered")


def load_state(module, state, path="checkpoint", what="model"):
    """load_state_dict(strict=True) of finite weights, with a mismatch reported in one line
    that names the keys."""
    check_finite(state, path, what)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [k for k in module.state_dict() if k not in state]
        unexpected = [k for k in state if k not in module.state_dict()]
        detail = (f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected
                  else str(e).strip().splitlines()[-1].strip()[:200])
        raise CheckpointError(f"{path}: {what} weights do not fit the model ({detail})") from e


def load_model(path, device="cpu", ema=True):
    """Rebuild the UNet from a checkpoint's config and load its (EMA) weights, in eval mode.

    Returns (model, diffusion_config, checkpoint).
    """
    ckpt = load_checkpoint(path)
    model_cfg, diff_cfg = configs_from_checkpoint(ckpt, path)
    model = UNet(model_cfg)
    key = "ema" if ema and "ema" in ckpt else "model"
    load_state(model, ckpt[key], path, key)
    return model.to(device).eval(), diff_cfg, ckpt
