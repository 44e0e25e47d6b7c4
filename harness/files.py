"""Files you can trust: atomic writes, the run-folder lock, output checks (no output may be an
input), recognising weight files, checkpoints (state dicts + config, safe loads, every field
checked, clear errors), CSV rows and figures.

A checkpoint is a dict {"model", "ema", "optimizer", "scheduler", "step", "config", "rng", ...}
of tensors and plain Python values, so `torch.load(weights_only=True)` can read it and no
pickled code ever runs.
"""
import csv
import functools
import hashlib
import json
import os
import re
import shlex
import stat
import tempfile
import zipfile

import torch

from config import DiffusionConfig, ModelConfig, config_from_dict
from unet import UNet

DEFAULT_CHECKPOINT = os.path.join("runs", "mnist", "ckpt.pt")   # where `python train.py` writes
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")   # wherever you run
SHIPPED_MODEL = os.path.join(SHIPPED, "model.safetensors")        # the repo's own trained weights (weights/README.md)
SHIPPED_OUT = os.path.join("runs", "weights")                    # what is drawn from them goes here, not into weights/
MODEL_FORMAT = "sd-mnist-model/1"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit; the message names the file."""


def shown(path):
    """A path as a one-line message can show it: as it is, or quoted with escapes (repr) when it
    holds a newline or another unprintable character."""
    path = os.fspath(path)
    return path if path.isprintable() else repr(path)


def first_line(e, limit=200):
    """The first line of an exception's message (or its type's name), to quote in a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def file_kind(st_mode):
    """'regular file', 'folder', 'named pipe (FIFO)', ... of an os.stat() st_mode."""
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(st_mode):
            return kind
    return "special file"


def not_a_regular_file(path):
    """What `path` is when it exists (links followed) but is not a regular file -- a FIFO would
    block whoever opens it, a device is no place for a result -- else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:                          # nothing there (or a dangling link): the caller's usual checks apply
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


TEMP_MARK = ".tmp-"        # in every temp file's name: .<name>.tmp-XXXXXXXX<suffix>
TEMP_NAME_BYTES = 100      # at most this much of <name> goes into a temp name, so a long file name still fits NAME_MAX


def temp_prefix(name):
    """`.<name>.tmp-`, with <name> cut to TEMP_NAME_BYTES bytes: the start of every temp file name
    atomic_write gives a file `name` (and all that remove_stale_temps looks for)."""
    while len(os.fsencode(name)) > TEMP_NAME_BYTES:
        name = name[:-1]
    return f".{name}{TEMP_MARK}"


def _new_temp(path, suffix=""):
    """A new, uniquely named, empty temp file beside `path`, locked (flock) by this process until the
    returned descriptor is closed: a temp file nobody holds is a dead writer's (remove_stale_temps).
    -> (fd, temp path)."""
    import fcntl  # POSIX; imported here so the module loads anywhere
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), suffix=suffix, dir=folder)
        try:                                              # a new file: only a cleaner can hold it or have removed it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:                           # a cleaner's: it is removing it; take another name
            os.close(fd)
            continue
        except OSError:                                   # a file system without flock: no lock, never cleaned
            pass
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes it 0600; give the final file the usual mode
    return fd, tmp


def temp_path(path, suffix=""):
    """A new, uniquely named, empty temp file beside `path` (same folder, so os.replace is a
    rename): `.<name>.tmp-XXXXXXXX<suffix>`. The suffix stays last, so writers that add an
    extension when it is missing (np.savez, savefig) write exactly there. -> its path."""
    fd, tmp = _new_temp(path, suffix)
    os.close(fd)
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
    name, locked while it is written (_new_temp), so two writers never write into one file and a
    killed writer's temp file can be told from a live one's (remove_stale_temps). A write that fails
    (a full disk, ...) is one CheckpointError line; the old file stays and the temp file goes."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = _new_temp(path, suffix)
    except OSError as e:
        raise CheckpointError(f"{shown(path)}: could not write ({e.strerror or e})") from e
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())         # again: some writers (safetensors) recreate it as 0600
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"{shown(path)}: could not write ({e.strerror or e})") from e
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(paths, patterns=None):
    """Remove the temp files that killed writers of `paths` left beside them: exactly atomic_write's
    names for those files (`.<name>.tmp-XXXXXXXX<suffix>`), and only those nobody holds locked (a live
    writer's temp file is never touched). A user's `notes.tmp` or `.cache.tmp-abcdefgh` stays.
    patterns: {folder: regex} for files whose names are not known in advance (step grids)."""
    import fcntl
    names = {}
    for p in paths:
        if p:
            folder, name = os.path.split(os.path.abspath(p))
            names.setdefault(folder, set()).add(re.escape(temp_prefix(name)))
    for folder, pattern in (patterns or {}).items():
        names.setdefault(os.path.abspath(folder), set()).add(r"\.(?:" + pattern + ")" + re.escape(TEMP_MARK))
    for folder, prefixes in names.items():
        ours = re.compile("(?:" + "|".join(sorted(prefixes)) + r")[a-z0-9_]{8}(\.[A-Za-z0-9]+)?")
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            if not ours.fullmatch(entry):
                continue
            tmp = os.path.join(folder, entry)
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:                       # a link, gone meanwhile, unreadable: leave it
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # fails while its writer lives
                    os.remove(tmp)
            except OSError:
                pass
            finally:
                os.close(fd)


def file_digest(path):
    """SHA-256 of a file, the first 16 hex digits: which checkpoint a result or a row was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write, suffix=".json")


def save_checkpoint(path, ckpt):
    """torch.save a dict of state dicts atomically (a failed write: one CheckpointError line)."""
    def write(tmp):
        try:
            torch.save(ckpt, tmp)
        except RuntimeError as e:     # torch's zip writer reports a full disk so: "unexpected pos ..."
            raise OSError(f"torch.save failed: {first_line(e)}") from e
    atomic_write(path, write)


def prepare_run_folder(out, resume, overwrite, ckpt_name="ckpt.pt", writes=(), recorded=True):
    """The no-clobber rule: a folder that already holds a run -- any of the files this run
    writes: its checkpoint `ckpt_name` and `writes` -- needs --resume or --overwrite (recorded:
    whether the folder has a run record, without which --overwrite is refused).
    -> the names of this run's files the folder holds already."""
    ckpt = os.path.join(out, ckpt_name)
    if resume and not os.path.isfile(ckpt):
        raise CheckpointError(f"--resume: no checkpoint at {shown(ckpt)}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {shown(out)}: is a file, not a run folder")
    found = [n for n in (ckpt_name, *writes) if os.path.lexists(os.path.join(out, n))]
    if found and not (resume or overwrite) and not recorded:  # --overwrite would refuse: no record says whose
        again = "pass --resume to continue it" if ckpt_name in found else "move them away"
        raise CheckpointError(f"{shown(out)} already holds {', '.join(found)}, with no run.json saying which run "
                              f"wrote them; {again} (or choose another --out)")
    if found and not (resume or overwrite):
        if ckpt_name not in found:                   # killed before its first checkpoint, or another kind of run
            raise CheckpointError(f"{shown(out)} already holds a run's files ({', '.join(found)}) but no {ckpt_name} "
                                  "to resume; pass --overwrite to start again (or choose another --out)")
        raise CheckpointError(f"{shown(out)} already holds a run ({', '.join(found)}); pass --resume to continue it "
                              "or --overwrite to start again (or choose another --out)")
    try:
        os.makedirs(out, exist_ok=True)
        os.remove(temp_path(os.path.join(out, "write-test")))
    except OSError as e:
        raise CheckpointError(f"--out {shown(out)}: not writable ({e.strerror})") from e
    return found


def _through_a_link(folder, name):
    """True when a folder on the way from `folder` to its relative path `name` is a link (or the
    name leaves `folder`): nothing is ever removed there."""
    parts = os.path.normpath(name).split(os.sep)
    if os.path.isabs(name) or ".." in parts:
        return True
    return any(os.path.islink(os.path.join(folder, *parts[:i])) for i in range(1, len(parts)))


def remove_run_files(folder, names=(), pattern=None):
    """--overwrite starts again: remove the earlier run's own files in `folder` (the relative paths
    `names`, and names that fully match the regex `pattern`), so that none is taken for the new
    run's (an old eval_curve.csv continued on --resume, an old peft/ export beside a new adapter).
    Regular files only, never through a link; everything else in the folder (a user's notes,
    links) stays. A sub-folder left empty goes too."""
    paths = [os.path.join(folder, n) for n in names if not _through_a_link(folder, n)]   # never through a link
    if pattern and os.path.isdir(folder):
        paths += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if re.fullmatch(pattern, n)]
    for p in paths:
        if os.path.isfile(p) and not os.path.islink(p):
            os.remove(p)
    for sub in {os.path.dirname(n) for n in names} - {""}:
        if _through_a_link(folder, sub) or os.path.islink(os.path.join(folder, sub)):
            continue
        try:
            os.rmdir(os.path.join(folder, sub))
        except OSError:                          # not empty (a user's file), or not there
            pass


class RunLock:
    """One writer per run folder: an exclusive flock on <folder>/.lock, held until release()
    (or the end of a `with` block). The kernel drops it when the process dies, even by kill -9,
    so a crashed run never leaves the folder locked. A second process is refused in one line
    that names the holder's PID. The lock file must be a plain file of its own: a `.lock` that
    is a link (symbolic or hard) or a special file is refused, never written through. Taking the
    lock also removes the temp files that killed writers of `names` (the files the run writes
    in the folder, and those whose names match the regex `pattern`) left behind."""

    NAME = ".lock"

    def __init__(self, folder, names=(), pattern=None):
        import fcntl  # POSIX; imported here so the module loads anywhere
        self.path, self.fd = os.path.join(folder, self.NAME), None
        where = shown(self.path)
        while True:
            try:                                       # no O_TRUNC: nothing is written before the checks below
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                if os.path.islink(self.path):
                    raise CheckpointError(f"{where}: is a symbolic link; the lock file must be a plain file "
                                          "(remove the link)") from None
                raise CheckpointError(f"{where}: cannot create the lock file ({e.strerror})") from e
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise CheckpointError(f"{where}: is a {file_kind(mode)}, not a plain lock file (remove it)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"{shown(folder)} is in use by another process (PID {shown(holder[:20])}); "
                                      "wait for it to finish or stop it first") from None
            try:                                     # the holder before us may have removed the file meanwhile
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if os.fstat(fd).st_nlink != 1:               # a hard link to some other file: never write into it
            os.close(fd)
            raise CheckpointError(f"{where}: has other names (a hard link to another file); "
                                  "the lock file must be a plain file of its own (remove it)")
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:                         # a full disk
            self.release()
            raise CheckpointError(f"{where}: could not write ({e.strerror})") from e
        remove_stale_temps([os.path.join(folder, n) for n in names], {folder: pattern} if pattern else None)

    def release(self):
        """Remove the lock file, then drop the lock (in that order: see the inode check above)."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.lstat(self.path), os.fstat(self.fd)):    # still our file
                os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


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


def _name_max(folder):
    """The longest file name (in bytes) the file system of `folder` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def holds_weights(path):
    """True for a file of model weights: a torch checkpoint (a zip archive with a data.pkl, or a
    pickle of protocol 2 to 5) or a safetensors file (an 8-byte header length n, then n bytes of
    a JSON object). A PNG, an npz, a JSON or a text file is none of these."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"PK\x03\x04"):
                with zipfile.ZipFile(path) as z:
                    return any(n.endswith("data.pkl") for n in z.namelist())
            if head[:1] == b"\x80":
                return head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= n <= min(size - 8, 100_000_000):
                return False
            return isinstance(json.loads(f.read(n)), dict)
    except (OSError, zipfile.BadZipFile, ValueError):        # ValueError: not JSON (UnicodeDecodeError too)
        return False


def check_outputs(outputs, inputs, folders=(), create=False, weights_ok=False):
    """Outputs are checked against inputs before any work. Refuses, in one CheckpointError line,
    an output path that
      - is one of the input files (after resolving links, `..` and hard links),
      - is an existing file of model weights (holds_weights: another run's checkpoint or adapter),
        unless weights_ok (a run writing its own checkpoint again),
      - lies in one of the input folders `folders` (a dataset being read),
      - is an existing folder, another output, or anything else that is not a regular file
        (a FIFO, a device: replacing it would be a loss, writing into it no result),
      - has a name longer than the file system takes (NAME_MAX),
      - sits in a folder that does not exist or cannot be written.
    outputs: {label: path} or (label, path) pairs, label as the user knows it: the flag that
    named the path ("--out"), or what writes it ("this run's file"); None paths are skipped.
    inputs: {label: path or list of paths} of the files read; folders: {label: folder} read.
    create: the outputs' folder may not exist yet (a run folder): its nearest existing parent
    must then be a writable folder."""
    inputs = {k: [v] if isinstance(v, str) else list(v or []) for k, v in dict(inputs).items()}
    seen = []
    for label, path in (outputs.items() if isinstance(outputs, dict) else outputs):
        if path is None:
            continue
        where = f"{label} {shown(path)}"
        if os.path.isdir(path) or path.endswith(("/", os.sep)):
            fix = "give a file name" if re.fullmatch(r"--[\w-]+", label) else "move it away"   # a flag's, or ours
            raise CheckpointError(f"{where}: is {'an existing' if os.path.isdir(path) else 'a'} folder; {fix}")
        kind = not_a_regular_file(path)
        if kind:
            raise CheckpointError(f"{where}: is a {kind}, not a regular file; refusing to replace it")
        for what, paths in inputs.items():
            for p in paths:
                if p and _same_file(path, p):
                    raise CheckpointError(f"{where}: is the {what} being read ({shown(p)}); "
                                          "refusing to overwrite an input")
        for what, folder in dict(folders).items():
            if folder and os.path.isdir(folder) and _inside(path, folder):
                raise CheckpointError(f"{where}: lies inside the {what} being read ({shown(folder)})")
        if os.path.basename(path) == "run.json" and os.path.isfile(path):
            raise CheckpointError(f"{where}: is a run folder's record (run.json); refusing to write over it "
                                  "(choose another path)")
        if not weights_ok and os.path.isfile(path) and holds_weights(path):
            raise CheckpointError(f"{where}: holds model weights (a checkpoint or an adapter); "
                                  "refusing to write over it (choose another path)")
        for other, p in seen:
            if _same_file(path, p):
                raise CheckpointError(f"{where}: is also where {other} writes")
        seen.append((label, path))
        parent = os.path.dirname(os.path.abspath(path))
        while create and not os.path.lexists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)                 # the folder that will be created in
        if not os.path.isdir(parent):
            raise CheckpointError(f"{where}: not writable ({shown(parent)} is not an existing folder)")
        name_max = _name_max(parent)
        to_create = os.path.relpath(os.path.abspath(path), parent).split(os.sep)   # the file (and new folders)
        longest = max(to_create, key=lambda n: len(os.fsencode(n)))
        if len(os.fsencode(longest)) > name_max:
            raise CheckpointError(f"{where}: the name {shown(longest[:40])}... is {len(os.fsencode(longest))} bytes "
                                  f"long; this file system takes at most {name_max}")
        try:
            os.remove(temp_path(os.path.join(parent, "write-test")))   # can we create a file? (root ignores os.access)
        except OSError as e:
            raise CheckpointError(f"{where}: not writable ({shown(parent)}: {e.strerror})") from e


def load_checkpoint(path):
    """torch.load with weights_only=True; every failure becomes one CheckpointError line."""
    kind = not_a_regular_file(path)
    if kind:                                     # a FIFO would block torch.load forever
        raise CheckpointError(f"{shown(path)}: is a {kind}, not a checkpoint file")
    if not os.path.isfile(path):
        hint = " (run `python train.py` first)" if path == DEFAULT_CHECKPOINT else ""
        raise CheckpointError(f"{shown(path)}: checkpoint not found{hint}")
    if path.endswith(".safetensors"):
        return read_model_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, forbidden pickle globals, ...
        raise CheckpointError(f"{shown(path)}: not a readable checkpoint ({first_line(e)})") from e
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise CheckpointError(f"{shown(path)}: not a checkpoint of this project (no model/config)")
    return ckpt


def read_model_file(path):
    """A model as weights/ ships it -- safetensors of the EMA weights (fp16), the run's config in the
    metadata -> a checkpoint dict {"model", "config", "data"} with float32 weights."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{shown(path)}: not a readable safetensors model ({first_line(e)})") from e
    if meta.get("format") == "sd-lora-mnist/1":
        raise CheckpointError(f"{shown(path)}: is a LoRA adapter, not a model (the model it adapts is a run's ckpt.pt "
                              f"or {os.path.relpath(SHIPPED_MODEL)})")
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{shown(path)}: not a model of this project (no {MODEL_FORMAT} metadata)")
    if not all(t.is_floating_point() for t in state.values()):
        raise CheckpointError(f"{shown(path)}: holds tensors that are not floating point")
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{shown(path)}: its config metadata is missing or malformed ({e})") from e
    try:
        finetuned = json.loads(meta["finetuned"]) if "finetuned" in meta else None     # a --full fine-tune's style
    except ValueError as e:
        raise CheckpointError(f"{shown(path)}: its finetuned metadata is malformed ({e})") from e
    if finetuned is not None and not (isinstance(finetuned, dict) and isinstance(finetuned.get("style"), str)
                                      and isinstance(finetuned.get("style_dir", ""), str)):
        raise CheckpointError(f"{shown(path)}: its finetuned metadata is malformed (expected a style)")
    return {"model": {k: t.float() for k, t in state.items()}, "config": config, "data": meta.get("data", "auto"),
            "finetuned": finetuned}


def shipped_unless_trained(path, default=DEFAULT_CHECKPOINT):
    """`path`, or the shipped model when `path` is the default checkpoint and no run has made it yet
    (said in one line). A run of yours always wins."""
    if path == default and not os.path.lexists(path) and os.path.isfile(SHIPPED_MODEL):
        print(f"no run of yours at {default}: using the shipped weights {os.path.relpath(SHIPPED_MODEL)} "
              "(`python train.py` makes your own, which then wins)")
        return SHIPPED_MODEL
    return path


def shipped(path):
    """Is `path` one of the weights this repo ships (in weights/)?"""
    return bool(path) and _inside(os.path.abspath(path), os.path.abspath(SHIPPED))


def output_folder(path):
    """Where a script's outputs for an input file go by default: beside it, or runs/weights/ for
    the shipped model and runs/weights/<name>/ for a shipped adapter (weights/ stays as shipped)."""
    if not shipped(path):
        return os.path.dirname(path)
    name = os.path.splitext(os.path.basename(path))[0]
    folder = SHIPPED_OUT if name == "model" else os.path.join(SHIPPED_OUT, name)
    for f in {SHIPPED_OUT, folder}:
        if os.path.lexists(os.path.join(f, "run.json")):       # a run of yours took that folder's name
            raise CheckpointError(f"{f}: holds a run of yours (run.json), so what the shipped weights draw cannot "
                                  "go there; give --out (or --json)")
    return folder


def configs_from_checkpoint(ckpt, path="checkpoint"):
    """The ModelConfig and DiffusionConfig a checkpoint was trained with."""
    config = ckpt.get("config")
    if isinstance(config, dict) and "lora" in config and "model" not in config:
        raise CheckpointError(f"{shown(path)}: is a fine-tuning run's state, not a model; pass the base checkpoint "
                              "(and the run's adapter.safetensors as --lora), or a --full run's ckpt.pt")
    try:
        return (config_from_dict(ModelConfig, ckpt["config"]["model"]),
                config_from_dict(DiffusionConfig, ckpt["config"]["diffusion"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{shown(path)}: config does not fit this code ({e})") from e


def dataset_of(ckpt, default="auto"):
    """The dataset a checkpoint's run really trained on (the resolved name: mnist, mnist-5k, folder)."""
    return ckpt.get("data", default)


def check_folder_data_dir(ckpt, data_dir):
    """A model trained on a folder of digits reads them again from --data-dir (evaluation, styled
    fine-tuning): a --data-dir that is no such folder is refused, naming the folder the run used."""
    if dataset_of(ckpt) != "folder" or os.path.isdir(os.path.join(data_dir, "0")):
        return
    recorded = (ckpt.get("config") or {}).get("train", {}).get("data_dir")
    hint = (f"the folder {shown(recorded)}: pass --data-dir {shlex.quote(recorded)}" if recorded
            and os.path.isdir(os.path.join(recorded, "0")) else "a folder of your digits: pass that folder as --data-dir")
    raise CheckpointError(f"--data-dir {shown(data_dir)}: this model was trained on {hint}")


def _check_tensors(tensors, path, what):
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{shown(path)}: {what} is not a dict of tensors")


def check_finite(tensors, path="checkpoint", what="model"):
    """A result that cannot be right is an error: every floating tensor of a state dict must be
    finite (NaN/inf weights give all-black samples, not a number to report)."""
    _check_tensors(tensors, path, what)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{shown(path)}: {what} tensor {name} holds non-finite values (nan or inf): "
                                  "the run diverged or the file was altered")


def check_fits(model_cfg, state, path="checkpoint", what="model"):
    """The weights `state` fit a UNet of model_cfg -- the same keys and shapes -- checked against a
    model built on the meta device (no memory), so that a config in range but far larger than its
    weights (a tampered file) is refused before the real model is allocated."""
    _check_tensors(state, path, what)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(model_cfg).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"size mismatch for {k}: {tuple(v.shape)} in the file, {expected[k]} in the model"
             for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or wrong:
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else wrong[0]
        raise CheckpointError(f"{shown(path)}: {what} weights do not fit the model ({detail})")


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
        raise CheckpointError(f"{shown(path)}: {what} weights do not fit the model ({detail})") from e


def load_model(path, device="cpu", ema=True):
    """Rebuild the UNet from a checkpoint's config and load its (EMA) weights, in eval mode.

    Returns (model, diffusion_config, checkpoint).
    """
    ckpt = load_checkpoint(path)
    model_cfg, diff_cfg = configs_from_checkpoint(ckpt, path)
    key = "ema" if ema and "ema" in ckpt else "model"
    check_fits(model_cfg, ckpt[key], path, key)         # before allocating the model the config describes
    model = UNet(model_cfg)
    load_state(model, ckpt[key], path, key)
    return model.to(device).eval(), diff_cfg, ckpt


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


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when first needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=80):
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), suffix=".png")
    pyplot().close(fig)
