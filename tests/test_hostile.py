"""A hostile user: every outcome is a right answer or one line on stderr with a non-zero exit --
never a traceback, never a pre-existing file changed, never a number that cannot be right.

Classes of failure, each with the tests that would have caught it: outputs clobbering inputs,
two writers in one run folder, non-finite weights and adapters, unvalidated npz files, folder
images of any PIL mode, --resume flags that were silently ignored, unbounded work; and from a
second round: lock files that are links, special files and FIFOs, long names and newlines in
paths, users' tmp files, a full disk, Ctrl-C, tampered loop state, huge configs, broken
classifier caches, overflowing flags, missing peers."""
import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from datetime import timedelta

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_FLAGS, one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
import harness.cli
import harness.files
import harness.scripts
import lora
import sample
from config import DiffusionConfig, SampleConfig
from dataset import DataError, load_dataset, load_image
from diffusion import Diffusion, SamplingError
from evaluate import read_npz
from harness import adapters
from harness.files import CheckpointError, RunLock, load_checkpoint, load_model, save_checkpoint

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def digest(*roots):
    """sha256 of every file under the given files/folders: what must not change."""
    out = {}
    for root in roots:
        paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_copy(tiny_ckpt, tmp_path_factory):
    """A copy of the tiny run folder, and an adapter with a non-zero update trained on nothing."""
    folder = str(tmp_path_factory.mktemp("hostile") / "run")
    shutil.copytree(os.path.dirname(tiny_ckpt), folder)
    ckpt = os.path.join(folder, "ckpt.pt")
    model, _, c = load_model(ckpt)
    lora.inject_lora(model, "conv", 2, 2.0)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.01)
    adapter = os.path.join(folder, "adapter.safetensors")
    adapters.save_adapter(adapter, model, "conv", 2, 2.0, False, c["config"]["model"], adapters.base_fingerprint(load_model(ckpt)[0]))
    return {"folder": folder, "ckpt": ckpt, "adapter": adapter}


def sample_args(run, *argv):
    return ("sample.py", "--checkpoint", run["ckpt"], "--steps", "2", "--n", "1", *argv)


# ----- outputs never clobber inputs -----

def test_outputs_that_are_inputs_are_refused_before_any_work(run_copy, tmp_path):
    run, before = run_copy, digest(run_copy["folder"])
    os.symlink(run["folder"], tmp_path / "alias")
    os.link(run["ckpt"], tmp_path / "hard.pt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    up = os.path.join(run["folder"], "..", os.path.basename(run["folder"]), "ckpt.pt")
    cases = [(sample_args(run, "--out", run["ckpt"]), "--checkpoint being read"),
             (sample_args(run, "--out", str(tmp_path / "x.png"), "--npz", run["ckpt"]), "--checkpoint being read"),
             (sample_args(run, "--lora", run["adapter"], "--out", run["adapter"]), "--lora adapter being read"),
             (sample_args(run, "--out", str(tmp_path / "alias" / "ckpt.pt")), "being read"),
             (sample_args(run, "--out", str(tmp_path / "hard.pt")), "being read"),
             (sample_args(run, "--out", up), "being read"),
             (sample_args(run, "--out", str(tmp_path / "same"), "--npz", str(tmp_path / "same")), "also where"),
             (sample_args(run, "--out", str(tmp_path / "folder")), "existing folder"),
             (sample_args(run, "--out", str(tmp_path / "file" / "x.png")), "not writable"),
             (sample_args(run, "--out", "/proc/x.png"), "not writable"),
             (("evaluate.py", "--checkpoint", run["ckpt"], "--json", run["ckpt"]), "--checkpoint being read"),
             (("evaluate.py", "--checkpoint", run["ckpt"], "--json", str(tmp_path / "folder")), "existing folder"),
             (("evaluate.py", "--checkpoint", run["ckpt"], "--json", str(tmp_path / "file" / "r.json")), "not writable")]
    for argv, message in cases:
        r = run_cli(*argv)
        one_line_error(r, message)
        assert "%|" not in r.stderr, f"work was done before refusing: {argv}"
    assert digest(run["folder"]) == before
    assert sorted(os.listdir(tmp_path)) == ["alias", "file", "folder", "hard.pt"], "a stray output was written"


def test_another_runs_weights_are_never_written_over(run_copy, tmp_path):
    """sample.py --out/--npz and evaluate.py --json over a checkpoint or an adapter that is not an
    input of this command (another run's): refused before any work, the file unchanged. It used
    to become a PNG, an npz or a JSON file, and that run was gone."""
    other = tmp_path / "other"
    shutil.copytree(run_copy["folder"], other)
    ckpt, adapter = str(other / "ckpt.pt"), str(other / "adapter.safetensors")
    shutil.copy(ckpt, other / "renamed.json")                 # weights are known by their bytes, not their name
    before = digest(str(other))
    cases = [sample_args(run_copy, "--out", ckpt), sample_args(run_copy, "--out", str(tmp_path / "x.png"), "--npz", adapter),
             ("evaluate.py", "--checkpoint", run_copy["ckpt"], "--json", str(other / "renamed.json"))]
    for argv in cases:
        r = run_cli(*argv)
        one_line_error(r, "holds model weights")
        assert "%|" not in r.stderr, f"work was done before refusing: {argv}"
    assert digest(str(other)) == before
    assert not os.path.exists(tmp_path / "x.png")
    r = run_cli(*sample_args(run_copy, "--out", str(tmp_path / "x.png"), "--npz", str(tmp_path / "x.npz")))
    assert r.returncode == 0, r.stderr
    r = run_cli(*sample_args(run_copy, "--out", str(tmp_path / "x.png"), "--npz", str(tmp_path / "x.npz")))
    assert r.returncode == 0, r.stderr                         # its own earlier outputs are replaced as before


def test_show_steps_figure_may_not_be_the_checkpoint(run_copy, tmp_path):
    ckpt = str(tmp_path / "g_steps.png")                  # --out g.png writes g_steps.png next to it
    shutil.copy(run_copy["ckpt"], ckpt)
    one_line_error(run_cli("sample.py", "--checkpoint", ckpt, "--out", str(tmp_path / "g.png"), "--show-steps"),
                   "being read")


def test_finetune_obeys_the_no_clobber_rule_for_every_file_it_writes(run_copy, tmp_path):
    folder = str(tmp_path / "base")
    shutil.copytree(run_copy["folder"], folder)
    os.remove(os.path.join(folder, "run.json"))       # no record (else: "holds a training run", test_run_folder.py)
    before = digest(folder)
    common = ["--checkpoint", os.path.join(folder, "ckpt.pt"), "--max-steps", "1", "--eval-n", "0", "--no-figures"]
    one_line_error(run_cli("lora_finetune.py", *common, "--full", "--out", folder), "ckpt.pt: is the --checkpoint")
    one_line_error(run_cli("lora_finetune.py", *common, "--out", folder), "adapter.safetensors: holds model weights")
    one_line_error(run_cli("lora_finetune.py", *common, "--full", "--overwrite", "--out", folder), "being read")
    assert digest(folder) == before


def test_out_inside_the_dataset_folder_is_refused(tmp_path):
    root = digit_folder(str(tmp_path / "digits"), n=1)
    before = digest(root)
    r = run_cli("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", root, "--out", os.path.join(root, "3"))
    one_line_error(r, "inside the --data-dir folder")
    assert digest(root) == before


# ----- one writer per run folder -----

def test_second_writer_is_refused_naming_the_holder_and_locks_do_not_leak(run_copy, tmp_path):
    folder = str(tmp_path / "run")
    shutil.copytree(run_copy["folder"], folder)
    for stale in ("ckpt.pt.tmp", ".ckpt.pt.tmp-ab12cd34", ".loss.png.tmp-0123abcd.png"):
        open(os.path.join(folder, stale), "w").close()
    before = digest(folder)
    with RunLock(folder, ("ckpt.pt", "loss.png")):
        left = [f for f in os.listdir(folder) if "tmp" in f]
        assert left == ["ckpt.pt.tmp"], f"a dead writer's temp files left, or a user's file removed: {left}"
        r = run_cli("train.py", *TINY_FLAGS, "--overwrite", "--out", folder)
        one_line_error(r, f"PID {os.getpid()}")
    assert {k: v for k, v in digest(folder).items() if "tmp" not in k} == {k: v for k, v in before.items()
                                                                           if "tmp" not in k}
    one_line_error(run_cli("train.py", "--resume", "--lr", "0.5", "--out", folder), "--lr 0.5")   # fails under the lock
    with RunLock(folder):                         # ... and released it on the way out
        pass
    assert ".lock" not in os.listdir(folder)


def test_kill_9_releases_the_lock(tmp_path):
    folder = str(tmp_path)
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from harness.files import RunLock; "
            f"l = RunLock({folder!r}); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"PID {proc.pid}"):
            RunLock(folder)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(folder):                         # the kernel dropped the dead holder's lock
        pass


def test_a_rank_without_a_process_group_still_judges_the_folder(run_copy, monkeypatch, tmp_path):
    before = digest(run_copy["folder"])
    monkeypatch.setenv("RANK", "1")               # no WORLD_SIZE: not a process group
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--out", run_copy["folder"]), "already holds a run")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")         # a group is meant, but MASTER_ADDR is missing
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--out", str(tmp_path / "new")), "MASTER_ADDR")
    monkeypatch.setenv("RANK", "1")               # rank 1 of 1 would wait for a rank 0 forever
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--out", str(tmp_path / "new")), "RANK=1")
    assert not os.path.exists(tmp_path / "new"), "run folder created before refusing"
    assert digest(run_copy["folder"]) == before


# ----- finite or refused -----

def tampered_checkpoint(src, dst, fn):
    ckpt = load_checkpoint(src)
    fn(ckpt)
    save_checkpoint(dst, ckpt)
    return dst


def test_non_finite_checkpoints_are_refused_naming_the_tensor(run_copy, tmp_path):
    def nan(ckpt):
        name = sorted(ckpt["ema"])[2]
        ckpt["ema"][name] = ckpt["ema"][name].clone().fill_(float("nan"))
        ckpt["which"] = name
    path = tampered_checkpoint(run_copy["ckpt"], str(tmp_path / "nan.pt"), nan)
    name = load_checkpoint(path)["which"]
    one_line_error(run_cli("sample.py", "--checkpoint", path, "--out", str(tmp_path / "x.png")), name, "non-finite")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(path)


@pytest.mark.parametrize("field, value", [("dropout", 5.0), ("dropout", "abc"), ("num_res_blocks", "2"),
                                          ("base_channels", True), ("channel_mults", []), ("context_dim", 0),
                                          ("in_channels", 3)])
def test_tampered_model_config_is_one_line(run_copy, tmp_path, field, value):
    path = tampered_checkpoint(run_copy["ckpt"], str(tmp_path / "t.pt"),
                               lambda c: c["config"]["model"].__setitem__(field, value))
    one_line_error(run_cli("sample.py", "--checkpoint", path, "--out", str(tmp_path / "x.png")), field)


def tampered_adapter(src, dst, meta=None, tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, framework="pt") as f:
        m, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    m.update(meta or {})
    if tensors:
        tensors(t)
    save_file(t, dst, metadata=m)
    return dst


@pytest.mark.parametrize("meta, tensors, message", [
    ({"alpha": "nan"}, None, "alpha"), ({"alpha": "inf"}, None, "alpha"), ({"r": "0"}, None, "r 0"),
    ({"layers": "[1, 2]"}, None, "layers"), ({"model_config": "null"}, None, "model_config"),
    ({"rslora": "maybe"}, None, "rslora"),
    (None, lambda t: t.update({k: v.clone().fill_(float("inf")) for k, v in t.items()}), "non-finite"),
    (None, lambda t: t.update({k: v.long() for k, v in t.items()}), "dtype")])
def test_bad_adapters_are_refused(run_copy, tmp_path, meta, tensors, message):
    bad = tampered_adapter(run_copy["adapter"], str(tmp_path / "a.safetensors"), meta, tensors)
    r = run_cli(*sample_args(run_copy, "--lora", bad, "--out", str(tmp_path / "x.png")))
    one_line_error(r, bad, message)


@pytest.mark.parametrize("scale", ["1e30", "-101", "nan", "inf"])
def test_lora_scale_is_bounded(run_copy, tmp_path, scale):
    r = run_cli(*sample_args(run_copy, "--lora", run_copy["adapter"], "--lora-scale", scale,
                             "--out", str(tmp_path / "x.png")))
    one_line_error(r, "--lora-scale")


def test_sampling_stops_when_x_t_turns_non_finite():
    diffusion = Diffusion(DiffusionConfig(timesteps=50), 10)
    for sampler in ("ddim", "ddpm"):
        with pytest.raises(SamplingError, match="non-finite"):
            diffusion.sample(lambda x, t, y: torch.full_like(x, float("nan")), torch.tensor([1, 2]),
                             SampleConfig(sampler=sampler, steps=3))


# ----- bounded work -----

def test_generate_runs_bounded_batches_and_small_requests_are_unchanged(monkeypatch):
    diffusion = Diffusion(DiffusionConfig(timesteps=50), 10)
    sizes = []

    def model(x, t, y):                                   # a cheap stand-in denoiser
        sizes.append(len(x))
        return 0.1 * x + 0.01 * y.float().view(-1, 1, 1, 1)
    scfg = SampleConfig(steps=3, seed=5)
    x, y, _ = sample.generate(model, diffusion, [3, 4], 4, scfg)          # 8 images: one batch
    direct = diffusion.sample(model, y, SampleConfig(steps=3, guidance=2.0), generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, direct), "a small request must give the same images as before batching"
    monkeypatch.setattr(sample, "MAX_BATCH", 3)
    sizes.clear()
    xb, yb, frames = sample.generate(model, diffusion, [3, 4], 4, scfg, trajectory=True)
    assert max(sizes) <= 2 * 3 and xb.shape == (8, 1, 28, 28) and yb.tolist() == [3] * 4 + [4] * 4
    assert torch.equal(xb[:3], x[:3]) and len(frames) == 4 and frames[0].shape[0] == 3   # batch 1 seeded as before
    assert torch.isfinite(xb).all()


@pytest.mark.parametrize("script, argv, message", [
    ("sample.py", ["--n", "100001"], "100,000"), ("sample.py", ["--n", "10001", "--label", "all"], "10,000"),
    ("sample.py", ["--n", "100000000"], "100,000"), ("evaluate.py", ["--n", "10001"], "10,000")])
def test_requests_that_cannot_fit_are_refused_at_once(run_copy, tmp_path, script, argv, message):
    out = ["--out", str(tmp_path / "x.png")] if script == "sample.py" else ["--json", str(tmp_path / "r.json")]
    one_line_error(run_cli(script, "--checkpoint", run_copy["ckpt"], *out, *argv), message)


# ----- resume: conflicting flags refused, a larger --epochs extends -----

def digit_folder(root, n=2):
    """n real digits per class as 8-bit PNGs in subfolders 0..9."""
    from PIL import Image
    images, labels = real_digits(n)
    for i, (a, d) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(root, str(d)), exist_ok=True)
        Image.fromarray(a).save(os.path.join(root, str(d), f"{i}.png"))
    return root


def test_resume_refuses_conflicting_flags_and_extends_with_more_epochs(tmp_path):
    root, out = digit_folder(str(tmp_path / "digits")), str(tmp_path / "run")
    flags = [*TINY_FLAGS, "--dataset", "folder", "--data-dir", root, "--batch-size", "4", "--no-figures",
             "--out", out]                                               # 20 images: 5 steps an epoch
    assert run_cli("train.py", *flags).returncode == 0
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 5
    before = digest(out)
    r = run_cli("train.py", "--resume", "--out", out, "--base-channels", "16", "--timesteps", "100", "--lr", "0.1")
    one_line_error(r, "--base-channels 16 (the run has 8)", "--timesteps 100", "--lr 0.1")
    one_line_error(run_cli("train.py", "--resume", "--out", out, "--dataset", "mnist"), "--dataset mnist")
    one_line_error(run_cli("train.py", "--resume", "--out", out, "--epochs", "0"), "epochs")
    assert digest(out) == before
    r = run_cli("train.py", "--resume", "--out", out, "--epochs", "2", "--base-channels", "8", "--no-figures")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 10 and ckpt["config"]["train"]["epochs"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.0          # the cosine re-spanned ends at 0 at step 10


# ----- validated inputs: npz files -----

@functools.lru_cache(maxsize=None)
def real_digits(n=2):
    """n real test digits per class: uint8 (10 n, 28, 28), labels (10 n,)."""
    x, y, _ = load_dataset("mnist-5k", split="test")
    idx = torch.cat([(y == d).nonzero()[:n, 0] for d in range(10)])
    return ((x[idx, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), y[idx].numpy()


DTYPES = ["uint8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool", "complex64"]


@FEW
@given(dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1.0, 1 / 255, 2 / 255, 300.0, -1.0]),
       shift=st.sampled_from([0.0, -1.0, 0.5]), shape=st.sampled_from(["N28", "N128", "N281", "N784", "scalar"]),
       labels=st.sampled_from(["ok", "10", "-1", "float", "str", "short", "2d"]),
       n=st.integers(1, 3), nan=st.booleans())
def test_read_npz_is_right_or_one_line(dtype, scale, shift, shape, labels, n, nan):
    """Accepted exactly when the file follows the documented rules, and then read by them."""
    images, y = real_digits(n)
    with np.errstate(all="ignore"):
        a = images * scale + shift
        if nan and dtype.startswith("float"):
            a = np.where(images > 200, np.nan, a)
        a = a.astype(dtype)
    a = {"N28": a, "N128": a[:, None], "N281": a[..., None], "N784": a.reshape(len(a), -1), "scalar": a[0, 0, 0]}[shape]
    lab = {"ok": y, "10": np.where(y == 3, 10, y), "-1": np.where(y == 3, -1, y), "float": y + 0.5,
           "str": y.astype(str), "short": y[:-1], "2d": y[:, None]}[labels]
    pixels = a.reshape(-1, 28, 28) if shape in ("N28", "N128") else None
    if pixels is None or a.dtype.kind not in "iuf":
        rule_ok, expected = False, None
    elif a.dtype.kind in "iu":                                # integers 0..255 -> x / 127.5 - 1
        rule_ok = 0 <= pixels.min() and pixels.max() <= 255
        expected = torch.from_numpy(pixels.astype(np.float32))[:, None] / 127.5 - 1
    else:                                                     # floats in [0, 1] -> 2 x - 1
        rule_ok = bool(np.isfinite(pixels).all()) and 0 <= pixels.min() and pixels.max() <= 1
        expected = torch.from_numpy(pixels.astype(np.float32))[:, None] * 2 - 1
    rule_ok = rule_ok and labels == "ok"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "in.npz")
        np.savez(path, images=a, labels=lab)
        try:
            x, yy = read_npz(path)
        except sample.SampleError as e:
            assert "\n" not in str(e) and path in str(e)
            assert not rule_ok, f"a valid file was refused: {e}"
            return
    assert rule_ok, "an invalid file was accepted"
    assert torch.equal(x, expected) and torch.equal(yy, torch.from_numpy(y))
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "npy", "pickle"])
def test_unreadable_npz_files_are_one_line(tmp_path, content):
    path = str(tmp_path / "in.npz")
    if content == "npy":
        np.save(path, np.zeros((2, 28, 28), np.uint8))
        path += ".npy"
    elif content == "pickle":
        np.savez(path, images=np.array([None, 1], dtype=object), labels=np.zeros(2, int))
    else:
        open(path, "wb").write(content)
    r = run_cli("evaluate.py", "--npz", path, "--json", str(tmp_path / "r.json"), "--dataset", "mnist-5k")
    one_line_error(r, path)
    assert not os.path.exists(tmp_path / "r.json")


# ----- validated inputs: folder images of any PIL mode -----

def write_mode(path, a, mode):
    """uint8 digit a (white on black) -> an image file in PIL mode `mode`."""
    from PIL import Image
    if mode == "RGBA-alpha":            # black ink, the digit only in the alpha channel
        rgba = np.zeros((*a.shape, 4), np.uint8)
        rgba[..., 3] = a
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "RGBA-white":          # white ink on a transparent background
        rgba = np.full((*a.shape, 4), 255, np.uint8)
        rgba[..., 3] = a
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "LA":
        Image.fromarray(np.stack([np.zeros_like(a), a], -1), "LA").save(path)
    elif mode == "I;16":
        Image.fromarray(a.astype(np.uint16) * 257).save(path)
    elif mode == "I;16-8bit":           # a 16-bit PNG that holds 0..255: read as it is, not / 257 (near-black)
        Image.fromarray(a.astype(np.uint16)).save(path)
    elif mode == "I":
        Image.fromarray(a.astype(np.int32), "I").save(path.replace(".png", ".tif"))
        return path.replace(".png", ".tif")
    elif mode == "F":
        Image.fromarray(a.astype(np.float32) / 255).save(path.replace(".png", ".tif"))
        return path.replace(".png", ".tif")
    elif mode == "RGB":
        Image.fromarray(np.stack([255 - a] * 3, -1)).save(path)        # dark ink on white paper
    else:
        Image.fromarray(a).convert(mode).save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA-alpha", "RGBA-white", "LA", "I;16", "I;16-8bit", "I", "F", "P"])
def test_folder_images_of_every_mode_load_as_the_digit(tmp_path, mode):
    images, _ = real_digits(1)
    for i, a in enumerate(images[:3]):
        got = load_image(write_mode(str(tmp_path / f"{i}.png"), a, mode))
        assert got.dtype == np.uint8 and got.shape == (28, 28)
        assert np.abs(got.astype(int) - a).mean() < 2, f"{mode}: not the digit"


@FEW
@given(mode=st.sampled_from(["L", "I;16", "I", "F", "RGBA", "LA", "P", "1", "RGB"]),
       lo=st.floats(-1e6, 1e6, allow_nan=False), span=st.floats(0, 1e6, allow_nan=False),
       size=st.integers(1, 60), junk=st.booleans())
def test_load_image_is_a_digit_or_a_data_error_naming_the_file(mode, lo, span, size, junk):
    from PIL import Image
    rng = np.random.default_rng(size)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.tif" if mode in ("F", "I") else "x.png")
        if junk:
            open(path, "wb").write(rng.bytes(size * 7))
        else:
            a = lo + span * rng.random((size, size))
            if mode == "F":
                Image.fromarray(a.astype(np.float32), "F").save(path)
            elif mode == "I":
                Image.fromarray(np.clip(a, -2 ** 31, 2 ** 31 - 1).astype(np.int32), "I").save(path)
            elif mode == "I;16":
                Image.fromarray(np.clip(a, 0, 65535).astype(np.uint16)).save(path)
            else:
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert(mode).save(path)
        try:
            got = load_image(path)
        except DataError as e:
            assert path in str(e) and "\n" not in str(e)
            return
        assert got.dtype == np.uint8 and got.shape == (28, 28)


# ----- the command lines: any argv is an answer or one line -----

VALUES = ["0", "1", "2", "-1", "nan", "inf", "1e30", "100001", "x", "", "\u0663", "\u00b2", "7", "all", "ddpm"]
FLAGS = ["--label", "--n", "--steps", "--guidance", "--eta", "--seed", "--sampler", "--lora-scale", "--device"]


@FEW
@given(st.lists(st.tuples(st.sampled_from(FLAGS), st.sampled_from(VALUES)), max_size=3))
def test_sample_cli_is_an_answer_or_one_line(run_copy, flags):
    argv = [t for pair in flags for t in pair]
    if "--lora-scale" in argv:
        argv += ["--lora", run_copy["adapter"]]
    before = digest(run_copy["folder"])
    with tempfile.TemporaryDirectory() as d:
        out, npz = os.path.join(d, "x.png"), os.path.join(d, "x.npz")
        r = run_cli("sample.py", "--checkpoint", run_copy["ckpt"], "--steps", "2", *argv, "--out", out, "--npz", npz)
        if r.returncode == 0:
            with np.load(npz) as f:
                assert f["images"].dtype == np.uint8 and len(f["images"]) == len(f["labels"]) >= 1
                assert set(np.unique(f["labels"])) <= set(range(10))
            assert os.path.getsize(out) > 0
        else:
            one_line_error(r)
            assert not os.path.exists(out) and not os.path.exists(npz)
    assert digest(run_copy["folder"]) == before


def test_evaluate_scores_float_pixels_as_their_uint8_twins_and_one_sample_without_frechet(tmp_path, monkeypatch):
    """Any classifier will do (an untrained one, cached where evaluate.py looks): the same
    digits as uint8 and as floats in [0, 1] must score the same; one image has no Frechet distance."""
    monkeypatch.setattr(evaluate, "load_dataset", functools.lru_cache(maxsize=None)(load_dataset))  # read it once
    torch.manual_seed(0)
    clf = evaluate.Classifier().eval()
    torch.save({"model": clf.state_dict(), "test_accuracy": 0.1},
               tmp_path / f"classifier_mnist-5k_v{evaluate.CLASSIFIER_VERSION}.pt")
    images, labels = real_digits(5)
    results = {}
    for name, pixels in (("uint8", images), ("float", images / 255.0)):
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, images=pixels, labels=labels)
        r = run_cli("evaluate.py", "--npz", path, "--dataset", "mnist-5k", "--data-dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        results[name] = json.load(open(tmp_path / f"{name}_eval.json"))
    assert abs(results["float"]["confidence"] - results["uint8"]["confidence"]) < 1e-6
    assert abs(results["float"]["frechet"] - results["uint8"]["frechet"]) < 1e-4 * results["uint8"]["frechet"]
    x = torch.from_numpy(images[:1].astype(np.float32))[:, None] / 127.5 - 1
    one = evaluate.evaluate_images(clf, x, torch.from_numpy(labels[:1]), x.repeat(4, 1, 1, 1))
    assert one["frechet"] is None and one["n"] == 1


# ----- links and special files: never written through, never replaced, never waited on -----

@contextlib.contextmanager
def deadline(seconds):
    """Fail the test, instead of hanging the suite, when the block runs longer than `seconds`
    (SIGALRM interrupts a blocking open() of a FIFO too)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("link", ["symlink to a file", "symlink to the checkpoint", "hard link to a file"])
def test_a_lock_file_that_is_a_link_is_refused_not_written_through(run_copy, tmp_path, link):
    folder = str(tmp_path / "run")
    shutil.copytree(run_copy["folder"], folder)
    os.remove(os.path.join(folder, "adapter.safetensors"))     # not a LoRA run's own: refused before the lock
    victim = str(tmp_path / "victim.txt")
    open(victim, "w").write("precious user data\n")
    lock = os.path.join(folder, ".lock")
    if link == "hard link to a file":
        os.link(victim, lock)
    else:
        os.symlink("ckpt.pt" if link == "symlink to the checkpoint" else victim, lock)
    before = digest(folder, victim)
    one_line_error(run_cli("train.py", "--resume", "--max-steps", "4", "--out", folder), ".lock")
    one_line_error(run_cli("train.py", "--overwrite", "--max-steps", "4", "--out", folder), ".lock")
    assert digest(folder, victim) == before and os.path.lexists(lock)


def test_special_files_are_never_replaced_by_outputs(run_copy, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    images, labels = real_digits(2)
    npz = str(tmp_path / "s.npz")
    np.savez(npz, images=images, labels=labels)
    cases = [(sample_args(run_copy, "--out", fifo), "FIFO"),
             (sample_args(run_copy, "--out", str(tmp_path / "x.png"), "--npz", fifo), "FIFO"),
             (("evaluate.py", "--npz", npz, "--dataset", "mnist-5k", "--json", fifo), "FIFO")]
    device = str(tmp_path / "null")
    try:                                          # a /dev/null-like node: needs root (CAP_MKNOD)
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        cases.append((sample_args(run_copy, "--out", device), "character device"))
    except PermissionError:
        device = None
    for argv, message in cases:
        with deadline(60):
            one_line_error(run_cli(*argv), message)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert device is None or stat.S_ISCHR(os.stat(device).st_mode)
    assert sorted(os.listdir(tmp_path)) == sorted(["fifo", "s.npz"] + (["null"] if device else []))


def test_fifo_inputs_are_refused_not_waited_on(run_copy, tmp_path):
    fifo = str(tmp_path / "in.npz")
    os.mkfifo(fifo)
    root = digit_folder(str(tmp_path / "digits"), n=1)
    os.mkfifo(os.path.join(root, "7", "pipe.png"))
    with deadline(60):
        one_line_error(run_cli("evaluate.py", "--npz", fifo, "--dataset", "mnist-5k",
                               "--json", str(tmp_path / "r.json")), fifo, "FIFO")
        one_line_error(run_cli("sample.py", "--checkpoint", fifo, "--out", str(tmp_path / "x.png")), fifo, "FIFO")
        one_line_error(run_cli(*sample_args(run_copy, "--lora", fifo, "--out", str(tmp_path / "x.png"))), "FIFO")
        one_line_error(run_cli("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", root, "--batch-size", "4",
                               "--out", str(tmp_path / "run")), "pipe.png", "not a regular file")


def test_a_long_output_name_is_written_or_refused_in_one_line(run_copy, tmp_path):
    fits = str(tmp_path / ("a" * 246 + ".png"))          # 250 bytes: fits, though its temp name would not
    r = run_cli(*sample_args(run_copy, "--out", fits))
    assert r.returncode == 0, r.stderr
    too_long = str(tmp_path / ("b" * 300 + ".png"))
    one_line_error(run_cli(*sample_args(run_copy, "--out", too_long)), "304 bytes")
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--out", str(tmp_path / ("d" * 300))), "300 bytes")
    assert os.listdir(tmp_path) == [os.path.basename(fits)]


def test_a_newline_in_a_path_stays_on_one_line(tmp_path):
    bad = str(tmp_path / "no\nsuch.pt")
    one_line_error(run_cli("sample.py", "--checkpoint", bad, "--out", str(tmp_path / "x.png")),
                   "checkpoint not found", "no\\nsuch.pt")
    one_line_error(run_cli("evaluate.py", "--npz", bad, "--dataset", "mnist-5k", "--json", str(tmp_path / "r.json")),
                   "no\\nsuch.pt")


# ----- temp files: a killed writer's go, a user's stay -----

def test_a_run_in_a_shared_folder_keeps_the_users_tmp_files(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    for name, text in (("notes.tmp", "mine"), ("table.tmp.csv", "a,b"), (".cache.tmp-abcdefgh", "x"),
                       (".loss.png.tmp-abcdefgh.txt.bak", "y"), (".samples_2.png.tmp-ab12cd34.png", "z")):
        (out / name).write_text(text)
    killed = [".ckpt.pt.tmp-ab12cd34", ".samples_000200.png.tmp-ab12cd34.png"]    # a step grid's, too
    for name in killed:
        (out / name).write_text("a killed writer's")
    before = digest(str(out))
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--no-figures", "--out", str(out))
    assert r.returncode == 0, r.stderr
    after = digest(str(out))
    assert {p: h for p, h in after.items() if p in before} == {p: h for p, h in before.items()
                                                              if os.path.basename(p) not in killed}
    assert sorted(os.listdir(out)) == sorted([".cache.tmp-abcdefgh", ".loss.png.tmp-abcdefgh.txt.bak", "ckpt.pt", "run.json",
                                              "notes.tmp", "table.tmp.csv", ".samples_2.png.tmp-ab12cd34.png"])


def test_sample_removes_only_the_stale_temp_files_of_its_own_outputs(run_copy, tmp_path):
    own = [".x.png.tmp-abcd1234.png", ".x.npz.tmp-0a1b2c3d.npz"]      # what a kill -9 mid-write leaves
    others = [".y.png.tmp-abcd1234.png", "x.png.tmp", ".x.png.tmp-short", "notes.tmp"]
    for name in own + others:
        (tmp_path / name).write_text("x")
    r = run_cli(*sample_args(run_copy, "--out", str(tmp_path / "x.png"), "--npz", str(tmp_path / "x.npz")))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["x.png", "x.npz", *others])


# ----- a full disk, Ctrl-C: one line, the old file kept -----

def test_a_full_disk_is_one_line_and_keeps_the_old_file(run_copy, tmp_path, monkeypatch):
    npz = tmp_path / "x.npz"
    npz.write_bytes(b"the previous npz")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    r = run_cli(*sample_args(run_copy, "--out", str(tmp_path / "x.png"), "--npz", str(npz)))
    one_line_error(r, str(npz), "could not write", "No space left on device")
    assert npz.read_bytes() == b"the previous npz"
    assert sorted(os.listdir(tmp_path)) == ["x.npz", "x.png"], "a temp file was left"


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_ctrl_c_is_one_line_and_exit_130(run_copy, tmp_path, monkeypatch, script):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    out = tmp_path / ("x.png" if script == "sample.py" else "r.json")
    out.write_bytes(b"the previous result")
    if script == "sample.py":
        monkeypatch.setattr(sample, "generate", interrupted)
        argv = sample_args(run_copy, "--out", str(out))
    else:
        monkeypatch.setattr(evaluate, "get_classifier", interrupted)
        argv = ("evaluate.py", "--checkpoint", run_copy["ckpt"], "--n", "1", "--steps", "2", "--json", str(out))
    try:
        r = run_cli(*argv)
    except KeyboardInterrupt:                          # uncaught, it would also stop pytest itself
        pytest.fail(f"{script}: Ctrl-C ends in a KeyboardInterrupt traceback")
    assert r.returncode == 130
    one_line_error(r, "interrupted")
    assert out.read_bytes() == b"the previous result" and os.listdir(tmp_path) == [out.name]


# ----- run folders: a folder where a run file goes, tampered loop state -----

@pytest.mark.parametrize("name", ["ckpt.pt", "loss.png"])
def test_a_folder_where_a_run_file_goes_is_refused_before_training(tmp_path, name):
    out = tmp_path / "d"
    (out / name / "keep").mkdir(parents=True)
    (out / name / "keep" / "f").write_text("kept")
    before = digest(str(out))
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--overwrite", "--out", str(out))
    one_line_error(r, name, "existing folder")
    assert "%|" not in r.stderr, "trained before refusing"
    assert digest(str(out)) == before and sorted(os.listdir(out)) == [name]


def test_overwrite_leaves_nothing_of_the_earlier_run_but_the_users_files(run_copy, tmp_path):
    """--overwrite starts again: the earlier run's step grids, quality curve and peft export go
    (an old eval_curve.csv used to be continued by the new run's --resume, an old peft/ export sat
    beside the new adapter with other weights); a user's files in the folder stay."""
    out = tmp_path / "run"
    assert run_cli("train.py", *TINY_FLAGS, "--max-steps", "2", "--no-figures", "--out", str(out)).returncode == 0
    (out / "eval_curve.csv").write_text("step,accuracy\n1,0.5\n")      # as --eval-every leaves it
    for step in ("000001", "1000000"):                                   # as --sample-every does
        sample.save_grid(torch.zeros(4, 1, 28, 28), str(out / f"samples_{step}.png"), nrow=2)
    (out / "notes.txt").write_text("mine")
    (out / "samples_1.png").write_text("mine too: not a step grid's name")
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--no-figures", "--overwrite", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["ckpt.pt", "notes.txt", "run.json", "samples_1.png"]
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 1
    lora_out = tmp_path / "lora"
    flags = ["--checkpoint", run_copy["ckpt"], "--max-steps", "1", "--eval-n", "0", "--no-figures", "--batch-size", "16",
             "--out", str(lora_out)]
    assert run_cli("lora_finetune.py", *flags, "--export-peft").returncode == 0
    assert run_cli("lora_finetune.py", *flags, "--overwrite").returncode == 0
    assert not (lora_out / "peft").exists()
    assert run_cli("lora_finetune.py", *flags, "--export-peft", "--overwrite").returncode == 0
    (lora_out / "peft" / "notes.txt").write_text("mine")
    assert run_cli("lora_finetune.py", *flags, "--overwrite").returncode == 0
    assert os.listdir(lora_out / "peft") == ["notes.txt"]


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_its_inputs(run_copy, tmp_path):
    """--overwrite removes the earlier run only once the new run has loaded its model and data: a
    typo in a flag, a failing quality-curve set-up, a user's file in peft/, another kind of run's
    weights or a linked peft/ folder cost nothing (each used to delete the earlier run's files, then fail)."""
    base = tmp_path / "base"
    shutil.copytree(run_copy["folder"], base)                  # a train.py run (and an adapter)
    lora_out = tmp_path / "lora"
    flags = ["--max-steps", "1", "--eval-n", "0", "--no-figures", "--batch-size", "16", "--out", str(lora_out)]
    assert run_cli("lora_finetune.py", "--checkpoint", str(base / "ckpt.pt"), *flags, "--export-peft").returncode == 0
    elsewhere = tmp_path / "exports"
    elsewhere.mkdir()
    (elsewhere / "adapter_config.json").write_text("{}")      # the user's, reached by a link
    keep = {d: digest(str(d)) for d in (base, lora_out, elsewhere)}
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--overwrite", "--dataset", "folder", "--data-dir",
                           str(tmp_path / "typo"), "--out", str(base)), "typo")
    one_line_error(run_cli("lora_finetune.py", "--checkpoint", str(tmp_path / "typo.pt"), *flags, "--overwrite"),
                   "typo.pt")
    import evaluate
    from dataset import DataError

    def broken_judge(*args, **kwargs):                          # --eval-every's set-up fails after the model loaded
        raise DataError("the classifier cache is broken")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(evaluate, "get_classifier", broken_judge)
        one_line_error(run_cli("train.py", *TINY_FLAGS, "--overwrite", "--eval-every", "1", "--out", str(base)),
                       "classifier cache is broken")
    (lora_out / "peft" / "README.txt").write_text("mine")
    keep[lora_out] = digest(str(lora_out))
    one_line_error(run_cli("lora_finetune.py", "--checkpoint", str(base / "ckpt.pt"), *flags, "--overwrite",
                           "--export-peft"), "holds other files (README.txt)")
    one_line_error(run_cli("lora_finetune.py", "--checkpoint", str(run_copy["ckpt"]), "--full", "--overwrite",
                           *flags[:-1], str(base)), "holds a training run")
    assert {d: digest(str(d)) for d in keep} == keep
    shutil.rmtree(lora_out / "peft")
    os.symlink(elsewhere, lora_out / "peft")
    assert run_cli("lora_finetune.py", "--checkpoint", str(base / "ckpt.pt"), *flags, "--overwrite").returncode == 0
    assert digest(str(elsewhere)) == keep[elsewhere]
    one_line_error(run_cli("lora_finetune.py", "--checkpoint", str(base / "ckpt.pt"), *flags, "--overwrite",
                           "--export-peft"), "is a link")


DELETE = object()


@pytest.mark.parametrize("key, value, message", [
    ("step", "x", "step 'x'"), ("step", -5, "step -5"), ("rng", DELETE, "rng"), ("optimizer", {}, "optimizer"),
    ("losses", 5, "losses"), ("losses", [(1, "low")], "losses"), ("ema_n_averaged", -1, "ema_n_averaged"),
    ("scheduler", {"last_epoch": "x"}, "scheduler"),
    ("optimizer", {"state": {}, "param_groups": []}, "optimiser, schedule or RNG state does not fit"),
    ("rng", {"torch": torch.zeros(3, dtype=torch.uint8)}, "optimiser, schedule or RNG state does not fit")])
def test_tampered_loop_state_is_refused_on_resume(run_copy, tmp_path, key, value, message):
    folder = str(tmp_path / "run")
    shutil.copytree(run_copy["folder"], folder)
    ckpt = os.path.join(folder, "ckpt.pt")
    tampered_checkpoint(ckpt, ckpt, lambda c: c.pop(key) if value is DELETE else c.__setitem__(key, value))
    before = digest(folder)
    r = run_cli("train.py", "--resume", "--max-steps", "5", "--no-figures", "--out", folder)
    one_line_error(r, message)
    assert "%|" not in r.stderr, "trained from a tampered state"
    assert digest(folder) == before


def test_a_huge_model_config_is_refused_before_the_model_is_allocated(run_copy, tmp_path, monkeypatch):
    import train
    from harness import files

    def huge(c):                                      # every field in range; 38 GB of weights
        c["config"]["model"].update(base_channels=4096, channel_mults=[64, 64, 64], attn_heads=1, context_dim=4096,
                                    ff_mult=16, context_tokens=256, num_res_blocks=16)
    path = tampered_checkpoint(run_copy["ckpt"], str(tmp_path / "huge.pt"), huge)
    real_unet = files.UNet

    def guarded(cfg):
        assert cfg.base_channels < 4096 or torch.empty(0).device.type == "meta", "the huge model was allocated"
        return real_unet(cfg)
    monkeypatch.setattr(files, "UNet", guarded)
    monkeypatch.setattr(train, "UNet", guarded)
    one_line_error(run_cli("sample.py", "--checkpoint", path, "--out", str(tmp_path / "x.png")), "do not fit")
    folder = str(tmp_path / "run")
    shutil.copytree(run_copy["folder"], folder)
    tampered_checkpoint(os.path.join(folder, "ckpt.pt"), os.path.join(folder, "ckpt.pt"), huge)
    one_line_error(run_cli("train.py", "--resume", "--max-steps", "5", "--out", folder), "do not fit")


# ----- the judge's own cache -----

@pytest.mark.parametrize("cache", ["random bytes", "wrong keys", "a list", "nan weights"])
def test_a_broken_classifier_cache_is_one_line_and_kept(tmp_path, cache):
    data = tmp_path / "cache"
    data.mkdir()
    path = data / f"classifier_mnist-5k_v{evaluate.CLASSIFIER_VERSION}.pt"
    if cache == "random bytes":
        path.write_bytes(os.urandom(1000))
    elif cache == "wrong keys":
        torch.save({"model": {"x": torch.zeros(1)}, "test_accuracy": 0.9}, path)
    elif cache == "a list":
        torch.save([1, 2], path)
    else:
        weights = {k: torch.full_like(v, float("nan")) for k, v in evaluate.Classifier().state_dict().items()}
        torch.save({"model": weights, "test_accuracy": 0.9}, path)
    images, labels = real_digits(2)
    npz = str(tmp_path / "s.npz")
    np.savez(npz, images=images, labels=labels)
    before = digest(str(data))
    r = run_cli("evaluate.py", "--npz", npz, "--dataset", "mnist-5k", "--data-dir", str(data),
                "--json", str(tmp_path / "r.json"))
    one_line_error(r, str(path), "classifier cache")
    assert digest(str(data)) == before and not (tmp_path / "r.json").exists()


def test_a_classifier_that_gives_non_finite_outputs_is_an_error_not_a_score():
    clf = evaluate.Classifier().eval()
    with torch.no_grad():
        for p in clf.parameters():
            p.fill_(1e30)
    x = torch.from_numpy(real_digits(1)[0].astype(np.float32))[:, None] / 127.5 - 1
    with pytest.raises(CheckpointError, match="non-finite"):
        evaluate.classify(clf, x)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate.frechet_distance(np.full((4, 2), np.nan), np.zeros((4, 2)))


# ----- flags that cannot give a right run, refused at once -----

@pytest.mark.parametrize("script, argv, message", [
    ("train.py", ["--lr", "1e30"], "lr 1e+30"), ("train.py", ["--weight-decay", "1e308"], "weight_decay"),
    ("train.py", ["--seed", str(2 ** 64)], "seed"), ("train.py", ["--seed", "-1"], "seed"),
    ("train.py", ["--eval-n", "1000000000"], "10,000"), ("lora_finetune.py", ["--eval-n", "1000000000"], "10,000"),
    ("lora_finetune.py", ["--r", "5000"], "r 5000"), ("lora_finetune.py", ["--alpha", "2e6"], "alpha 2000000.0")])
def test_flags_that_cannot_give_a_right_run_are_refused_at_once(run_copy, tmp_path, script, argv, message):
    base = TINY_FLAGS if script == "train.py" else ["--checkpoint", run_copy["ckpt"]]
    one_line_error(run_cli(script, *base, *argv, "--out", str(tmp_path / "o")), message)
    assert not os.path.exists(tmp_path / "o")


def test_lora_bounds_are_the_adapter_loaders(run_copy, tmp_path):
    """What lora_finetune.py may train, sample.py may load: the same constants on both sides."""
    import config
    assert (config.LORA_MAX_R, config.LORA_MAX_ALPHA) == (config.LORA_MAX_R, config.LORA_MAX_ALPHA)
    config.LoraConfig(r=config.LORA_MAX_R, alpha=config.LORA_MAX_ALPHA)
    bad = tampered_adapter(run_copy["adapter"], str(tmp_path / "a.safetensors"), {"r": str(config.LORA_MAX_R + 1)})
    one_line_error(run_cli(*sample_args(run_copy, "--lora", bad, "--out", str(tmp_path / "x.png"))),
                   f"r {config.LORA_MAX_R + 1}")


def test_a_seed_near_2_63_trains(tmp_path):
    r = run_cli("train.py", *TINY_FLAGS, "--seed", str(2 ** 62), "--max-steps", "1", "--no-figures",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr


# ----- a process group that never forms -----

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_missing_peer_ends_in_one_line_not_a_hang(monkeypatch, tmp_path, rank):
    import torch.distributed as td

    from harness import dist
    monkeypatch.setattr(dist, "JOIN_TIMEOUT", timedelta(seconds=1))
    for k, v in {"RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with deadline(60):
        r = run_cli("train.py", *TINY_FLAGS, "--out", str(tmp_path / "o"))
    one_line_error(r, "could not join the process group", "torchrun")
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    with deadline(60):
        one_line_error(run_cli("train.py", *TINY_FLAGS, "--out", str(tmp_path / "o")), "no-such-host.invalid")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "abc")
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--out", str(tmp_path / "o")), "MASTER_PORT='abc'")
    assert not td.is_initialized() and not os.path.exists(tmp_path / "o")


# ----- the base of a LoRA table -----

def test_lora_table_refuses_a_missing_base_in_one_line(tmp_path, monkeypatch, capsys):
    import lora_table
    missing = str(tmp_path / "none.pt")
    monkeypatch.setattr(sys, "argv", ["lora_table.py", "--checkpoint", missing, "--rows", "qkv:1",
                                      "--out", str(tmp_path / "t"), "--max-steps", "1"])
    with pytest.raises(SystemExit) as e:
        lora_table.main()
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == 2 and len(err) == 1 and missing in err[0] and "checkpoint not found" in err[0], err
    assert not os.path.exists(tmp_path / "t")


# ----- a fifth hostile probe: odd stdouts, flags that would change nothing -----

def test_a_closed_stdout_is_no_traceback_and_the_work_is_done(tiny_ckpt, tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=False, stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: os.close(1), timeout=300)                  # as `>&-`
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert out.stat().st_size > 0


def test_a_path_the_stdout_cannot_encode_is_printed_escaped(tiny_ckpt, tmp_path):
    out = tmp_path / "ü é.png"
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "\\xfc \\xe9.png" in r.stdout and out.stat().st_size > 0


@pytest.mark.parametrize("script,flags,needle", [
    ("sample.py", ["--sampler", "ddpm", "--steps", "3"], "--sampler ddpm runs all"),
    ("evaluate.py", ["--sampler", "ddpm", "--steps", "3"], "--sampler ddpm runs all"),
    ("evaluate.py", ["--sweep-guidance", "0,1", "--guidance", "4"], "the sweep sets the guidance"),
    ("sample.py", ["--merge"], "--merge folds --lora adapters"),
    ("evaluate.py", ["--merge"], "--merge folds --lora adapters"),
    ("evaluate.py", ["--style-dir", "/nonexistent"], "--style-dir names the folder a --lora adapter"),
    ("visualize.py", ["--check", "--figures", "film"], "--check draws no figure: --figures"),
    ("visualize.py", ["--check", "--docs", "DOCS"], "--check draws no figure: --docs"),
    ("visualize.py", ["--check", "--label", "5", "--steps", "3"], "--label, --steps would change nothing"),
])
def test_a_flag_that_would_change_nothing_is_refused(tiny_ckpt, tmp_path, script, flags, needle):
    r = run_cli(script, "--checkpoint", tiny_ckpt, *[str(tmp_path / "docs") if f == "DOCS" else f for f in flags])
    one_line_error(r, needle)
    assert os.listdir(tmp_path) == []


def test_evaluate_records_what_ran_and_which_checkpoint(tiny_ckpt, quick_judge, tmp_path):
    """DDPM's steps are the model's T; a sweep's guidance is not one number; the checkpoint's
    SHA-256 tells a result of an overwritten run from one of the run now there."""
    out = tmp_path / "ddpm.json"
    r = run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "1", "--sampler", "ddpm", "--data-dir", quick_judge,
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["sampling"]["steps"] == load_checkpoint(tiny_ckpt)["config"]["diffusion"]["timesteps"]
    assert d["checkpoint_sha256"] == hashlib.sha256(open(tiny_ckpt, "rb").read()).hexdigest()[:16]
    out = tmp_path / "sweep.json"
    r = run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--sweep-guidance", "0,1",
                "--data-dir", quick_judge, "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert "guidance" not in d["sampling"] and [s["guidance"] for s in d["sweep"]] == [0.0, 1.0]
    assert (tmp_path / "sweep_guidance_sweep.png").stat().st_size > 0            # beside its --json


def test_lora_finetune_help_says_what_its_data_dir_is():
    r = run_cli("lora_finetune.py", "--help")
    text = " ".join(r.stdout.split())
    assert "--data-dir DATA_DIR where the base's training digits are" in text and "the MNIST root" in text
    assert "a folder base's own folder" in text and "with --dataset folder" not in text


# ----- the seventh probe: flags that would change nothing, left to the checkpoint's guidance -----

def test_flags_that_need_guidance_are_refused_when_the_checkpoint_decides_it(tiny_ckpt):
    """Without --guidance the checkpoint's w decides; an interval holding no sampled step, or a model
    whose w is 1, makes --negative / --guidance-rescale / the interval change nothing: refused in
    sample.py and evaluate.py as they are with --guidance given."""
    for script in ("sample.py", "evaluate.py"):
        one_line_error(run_cli(script, "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "10", "--guide-from", "0.99"),
                       "would change nothing", "no step is guided")
    from config import DiffusionConfig
    from harness import scripts
    plain = DiffusionConfig(timesteps=50, sample_guidance=1.0)
    for flags in (["--negative", "3"], ["--guidance-rescale", "0.5"]):
        with pytest.raises(scripts.SampleError, match="guidance 1 runs the plain conditional model"):
            scripts.sample_config(scripts.sample_args(flags), plain, 10)
        with pytest.raises(scripts.SampleError, match="would change nothing"):
            scripts.sample_config(evaluate.parse_args(flags), plain, 10)


@pytest.mark.parametrize("flags,message", [
    (["--figures", "trap", "--label", "5"], "--label would change nothing in that figure"),
    (["--figures", "trap", "--steps", "3", "--sampler", "dpmpp"], "--sampler, --steps would change nothing"),
    (["--figures", "blend,img2img", "--label", "5"], "--label would change nothing in those figures"),
    (["--figures", "negative", "--negative", "2"], "--negative would change nothing"),
    (["--figures", "attention", "--label", "4", "--negative", "4"], "the attention figure draws that digit"),
    (["--figures", "film", "--negative", "4"], "the film figure draws that digit"),
    (["--figures", "blend", "--negative", "8"], "the blend figure draws that digit"),
    (["--figures", "img2img,img2img"], "img2img listed twice"),
    (["--figures", "trap", "--docs="], "--docs is empty"),
])
def test_visualize_refuses_flags_its_figures_do_not_read(tiny_ckpt, flags, message):
    one_line_error(run_cli("visualize.py", "--checkpoint", tiny_ckpt, *flags), message)


def test_visualize_docs_in_the_checkpoint_folder_is_named_as_such(tiny_ckpt):
    one_line_error(run_cli("visualize.py", "--checkpoint", tiny_ckpt, "--figures", "trap", "--docs",
                           os.path.dirname(tiny_ckpt)), "is where the figures are written anyway")


@pytest.mark.parametrize("colour,message", [(255, "keeps every pixel"), (0, "keeps no pixel")])
def test_a_mask_that_keeps_everything_or_nothing_is_refused(tiny_ckpt, tmp_path, colour, message):
    from PIL import Image
    mask = tmp_path / "mask.png"
    Image.new("L", (28, 28), colour).save(mask)
    out = tmp_path / "out.png"
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--init", "examples/five.png",
                           "--mask", str(mask), "--out", str(out)), message)
    assert not out.exists()


@pytest.mark.parametrize("value,message", [("", "expected numbers like 0,1,2,3,5"), ("1,2,1", "1 listed twice")])
def test_sweep_guidance_empty_or_repeated_is_refused(tiny_ckpt, value, message):
    one_line_error(run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "1", "--sweep-guidance", value), message)


def test_an_image_given_as_npz_is_named_without_a_pickle_hint():
    r = run_cli("evaluate.py", "--npz", "examples/five.png")
    one_line_error(r, "examples/five.png: not an npz of images and labels")
    assert "allow_pickle" not in r.stderr


def test_label_blend_messages_and_a_one_hot_blend_is_the_label(tiny_ckpt, tmp_path):
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--label", "3:0.5,8:0.5,"), "an empty item must be")
    npz = {}
    for label in ("3", "3:1"):
        npz[label] = str(tmp_path / f"{label.replace(':', '_')}.npz")
        r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "2", "--steps", "2", "--label", label,
                    "--npz", npz[label], "--out", npz[label] + ".png")
        assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(npz["3"])["images"], np.load(npz["3:1"])["images"])


def test_bench_full_ddpm_takes_zero_or_one():
    r = run_cli("tools/bench.py", "--quick", "--full-ddpm", "2")
    assert r.returncode == 2 and "--full-ddpm 2: expected 0 or 1" in r.stderr


def test_visualize_refuses_data_flags_for_figures_that_read_no_data(tiny_ckpt):
    one_line_error(run_cli("visualize.py", "--checkpoint", tiny_ckpt, "--figures", "film", "--batch-size", "8",
                           "--dataset", "folder"), "--batch-size, --dataset would change nothing in that figure")


# ----- the tenth probe -----

@pytest.mark.parametrize("extra,needle", [
    ([], "learned the built-in bold style, which is its target; drop --style-dir"),
    (["--sweep-guidance", "1,2"], "--style-dir is read by the LoRA style comparison, which --sweep-guidance replaces"),
])
def test_evaluate_refuses_a_style_dir_its_adapter_would_ignore(tiny_ckpt, wild_adapter, tmp_path, extra, needle):
    """Before: the built-in style's digits were the target whatever --style-dir said, exit 0."""
    style = tmp_path / "digits"
    for d in range(10):
        (style / str(d)).mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "examples", "five.png"), style / str(d) / "1.png")
    out = tmp_path / "e.json"
    one_line_error(run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--lora", wild_adapter, "--style-dir", str(style),
                           "--n", "1", "--steps", "2", "--json", str(out), *extra), needle)
    assert not out.exists()


def test_sample_writes_a_png_and_an_npz_only_under_their_own_names(tiny_ckpt, tmp_path):
    """Before: `--out runs/x/summary.json` replaced a run's record with a PNG, exit 0."""
    record = tmp_path / "summary.json"
    record.write_text('{"steps": 6}')
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--out", str(record)),
                   "sample.py writes PNG there; give a name ending in .png")
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--out",
                           str(tmp_path / "a.png"), "--npz", str(record)), "give a name ending in .npz")
    assert record.read_text() == '{"steps": 6}' and sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_one_adapter_file_given_twice_is_refused(tiny_ckpt, wild_adapter, tmp_path):
    """Before: composed with itself, at double strength, exit 0 (the demo already refused it)."""
    link = tmp_path / "same.safetensors"
    os.link(wild_adapter, link)                                                    # a hard link: the same file
    for other in (wild_adapter, str(link)):
        one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--lora",
                               wild_adapter, "--lora", other, "--out", str(tmp_path / "x.png")),
                       f"--lora {other}: is the same file as --lora {wild_adapter}; give it once")
    assert not (tmp_path / "x.png").exists()


def test_evaluate_scores_a_full_fine_tune_against_the_digits_it_was_tuned_on(tiny_ckpt, quick_judge, tmp_path):
    """Before: the plain training digits were its reference row, called "its training digits"."""
    full = str(tmp_path / "full")
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--full", "--max-steps", "1", "--eval-n", "0",
                   "--no-figures", "--batch-size", "16", "--out", full).returncode == 0
    refs = {}
    for name, ckpt in (("base", tiny_ckpt), ("full", os.path.join(full, "ckpt.pt"))):
        out = tmp_path / f"{name}.json"
        r = run_cli("evaluate.py", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--data-dir", quick_judge,
                    "--json", str(out))
        assert r.returncode == 0, r.stderr
        refs[name] = (json.loads(out.read_text()), r.stdout)
    assert refs["full"][0]["finetuned"]["style"] == "bold" and refs["base"][0]["finetuned"] is None
    assert "its training digits (the bold digits it was fine-tuned on), scored" in refs["full"][1]
    assert "its training digits, scored" in refs["base"][1]
    bold, plain = refs["full"][0]["training_digits"], refs["base"][0]["training_digits"]
    assert bold["frechet"] != plain["frechet"] and bold["spread"] != plain["spread"]


# ----- the twelfth probe -----

def test_the_negative_figure_needs_guidance_above_one(tiny_ckpt, tmp_path):
    """Before: at w = 1 every "not" row equalled the plain row above it, exit 0."""
    one_line_error(run_cli("visualize.py", "--checkpoint", tiny_ckpt, "--figures", "negative", "--guidance", "1",
                           "--steps", "2", "--docs", str(tmp_path)), "--figures negative at guidance 1: no step")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags", [["--negative", "3"], ["--guidance-rescale", "0.5"], ["--guide-from", "0.3"]])
def test_a_sweep_that_guides_no_step_refuses_the_guidance_flags(tiny_ckpt, tmp_path, flags):
    out = tmp_path / "sweep.json"
    one_line_error(run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--sweep-guidance",
                           "1", *flags, "--json", str(out)), "--sweep-guidance 1: ", "would change nothing")
    assert not out.exists()


def test_a_sweep_with_one_guided_scale_takes_the_guidance_flags(tiny_ckpt):
    _, diff_cfg, _ = load_model(tiny_ckpt)
    args = evaluate.parse_args(["--checkpoint", tiny_ckpt, "--sweep-guidance", "1,2", "--negative", "3"])
    cfgs = [harness.scripts.sample_config(args, diff_cfg, 10, guidance=w) for w in (1.0, 2.0)]
    evaluate.check_sweep_guides(args, cfgs, diff_cfg)                          # no error: w = 2 guides
    with pytest.raises(harness.scripts.SampleError):
        evaluate.check_sweep_guides(args, cfgs[:1], diff_cfg)


def test_shipped_weights_of_a_full_fine_tune_keep_its_style(tiny_ckpt, tmp_path):
    """Before: tools/ship_weights.py dropped it, and evaluate.py scored the plain training digits."""
    full = str(tmp_path / "full")
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--full", "--style", "italic", "--max-steps", "1",
                   "--eval-n", "0", "--no-figures", "--batch-size", "16", "--out", full).returncode == 0
    r = run_cli("tools/ship_weights.py", "--checkpoint", os.path.join(full, "ckpt.pt"), "--adapters", "",
                "--out", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    shipped = harness.files.read_model_file(str(tmp_path / "w" / "model.safetensors"))
    assert shipped["finetuned"] == {"style": "italic", "style_dir": ""}
    assert harness.files.read_model_file(os.path.join(ROOT, "weights", "model.safetensors"))["finetuned"] is None


def test_a_folder_judge_is_cached_outside_the_folder_and_follows_its_digits(tmp_path):
    """Before: classifier_folder_v3.pt was written into your digit folder and reused after the folder
    changed, its accuracy labelled "real test digits" though a folder has no test split."""
    folder = tmp_path / "digits"
    digit_folder(str(folder), n=3)
    before = evaluate.classifier_path("folder", str(folder))
    assert not os.path.realpath(before).startswith(os.path.realpath(folder))
    os.rename(folder / "3", folder / "x")
    os.rename(folder / "8", folder / "3")
    os.rename(folder / "x", folder / "8")
    assert evaluate.classifier_path("folder", str(folder)) != before          # other digits: another judge
    assert evaluate.judged_on("folder") != "real test digits" and evaluate.judged_on("mnist") == "real test digits"


def test_visualize_check_takes_one_adapter_and_checks_it_before_any_work(tiny_ckpt, wild_adapter):
    one_line_error(run_cli("visualize.py", "--check", "--checkpoint", tiny_ckpt, "--lora", wild_adapter, "--lora",
                           wild_adapter), "--lora given 2 times: --check checks one adapter")
    r = run_cli("visualize.py", "--check", "--checkpoint", os.path.join("weights", "model.safetensors"), "--lora",
                wild_adapter)                                                 # an adapter of another model
    one_line_error(r, "adapter was trained on another model")
    assert "|grad|" not in r.stdout                                          # refused before the gradient table


# ----- the thirteenth probe -----

def test_a_folder_base_names_its_folder_and_the_hint_works(tmp_path, quick_judge):
    """Before: evaluate.py and lora_finetune.py on a folder-trained model said "data/0: missing or
    empty", pointing at the MNIST root instead of the run's own folder."""
    digits = tmp_path / "my digits"
    digit_folder(str(digits), n=4)
    run = str(tmp_path / "run")
    assert run_cli("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", str(digits), "--max-steps", "2",
                   "--no-figures", "--out", run).returncode == 0
    ckpt = os.path.join(run, "ckpt.pt")
    for script, flags in (("evaluate.py", ["--n", "1", "--steps", "2", "--json", str(tmp_path / "e.json")]),
                          ("lora_finetune.py", ["--max-steps", "1", "--eval-n", "0", "--no-figures", "--batch-size",
                                                "16", "--out", str(tmp_path / "lora")])):
        r = run_cli(script, "--checkpoint", ckpt, *flags)
        one_line_error(r, "--data-dir data: this model was trained on the folder", f"pass --data-dir '{digits}'")
        assert run_cli(script, "--checkpoint", ckpt, *flags, "--data-dir", str(digits)).returncode == 0


# ----- after the thirteenth probe -----

def test_a_folder_run_is_reported_against_its_folder_without_a_reference_row(tmp_path):
    """Before: a folder run's report said "real test ink" and JSON "classifier_test_accuracy", and
    scored its training digits -- the real side itself -- as "the best a model can reach"."""
    digits = tmp_path / "digits"
    digit_folder(str(digits), n=4)
    run = str(tmp_path / "run")
    assert run_cli("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", str(digits), "--max-steps", "2",
                   "--no-figures", "--out", run).returncode == 0
    out = tmp_path / "e.json"
    r = run_cli("evaluate.py", "--checkpoint", os.path.join(run, "ckpt.pt"), "--n", "1", "--steps", "2",
                "--data-dir", str(digits), "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["training_digits"] is None and "the best a model can reach" not in r.stdout
    assert "which are also the real side here" in r.stdout
    assert "real test" not in r.stdout and "the folder's digits: ink" in r.stdout
    assert res["classifier_judged_on"] == evaluate.judged_on("folder") and "classifier_test_accuracy" not in res


def test_a_mnist_report_names_the_test_digits_and_keeps_its_reference(tiny_ckpt, quick_judge, tmp_path):
    out = tmp_path / "e.json"
    r = run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "2", "--steps", "2", "--data-dir", quick_judge,
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["classifier_judged_on"] == "real test digits" and res["classifier_accuracy"] == 0.0
    assert res["training_digits"]["n"] == 20 and "real test digits: ink" in r.stdout


def test_a_model_trained_without_label_dropout_is_not_guided(tiny_ckpt, tmp_path):
    """Before: --p-uncond 0 trained no unconditional model, and sampling guided from it at w = 2
    (the default) without a word."""
    run = str(tmp_path / "run")
    one_line_error(run_cli("train.py", *TINY_FLAGS, "--p-uncond", "0", "--max-steps", "1", "--out", run),
                   "p_uncond 0 trains no unconditional model", "add --sample-guidance 1")
    assert not os.path.exists(run)
    assert run_cli("train.py", *TINY_FLAGS, "--p-uncond", "0", "--sample-guidance", "1", "--max-steps", "1",
                   "--no-figures", "--out", run).returncode == 0            # the hint, followed
    ckpt = os.path.join(run, "ckpt.pt")
    png = tmp_path / "s.png"
    one_line_error(run_cli("sample.py", "--checkpoint", ckpt, "--guidance", "2", "--steps", "2", "--out", str(png)),
                   "guidance 2: this model was trained with --p-uncond 0", "--guidance 1")
    one_line_error(run_cli("evaluate.py", "--checkpoint", ckpt, "--sweep-guidance", "1,2", "--n", "1",
                           "--json", str(tmp_path / "e.json")), "guidance 2: this model was trained")
    assert not png.exists() and not (tmp_path / "e.json").exists()
    assert run_cli("sample.py", "--checkpoint", ckpt, "--steps", "2", "--n", "1", "--out", str(png)).returncode == 0


def test_a_grid_of_an_adapter_beside_its_checkpoint_keeps_the_bases_grid(tiny_ckpt, wild_adapter, tmp_path):
    """Before: both went to sample_7.png in that folder, the second replacing the first."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(tiny_ckpt, folder / "ckpt.pt")
    shutil.copy(wild_adapter, folder / "bold.safetensors")
    ckpt, adapter = str(folder / "ckpt.pt"), str(folder / "bold.safetensors")
    for extra in ([], ["--lora", adapter]):
        assert run_cli("sample.py", "--checkpoint", ckpt, *extra, "--steps", "2", "--n", "1").returncode == 0
    assert {"sample_7.png", "sample_7_bold.png"} <= set(os.listdir(folder))
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(wild_adapter, other / "a.safetensors")                     # elsewhere: the plain name
    assert run_cli("sample.py", "--checkpoint", ckpt, "--lora", str(other / "a.safetensors"), "--steps", "2",
                   "--n", "1").returncode == 0
    assert sorted(os.listdir(other)) == ["a.safetensors", "sample_7.png"]


@pytest.mark.parametrize("script,flags,ckpt_name", [
    ("train.py", [*TINY_FLAGS, "--max-steps", "1"], "ckpt.pt"),
    ("lora_finetune.py", ["--max-steps", "1", "--eval-n", "0", "--batch-size", "16"], "finetune_ckpt.pt")])
def test_resume_keeps_a_no_figures_run_without_figures(tiny_ckpt, tmp_path, script, flags, ckpt_name):
    """Before: `--resume` without --no-figures drew the loss curve and grid of a --no-figures run."""
    out = str(tmp_path / "run")
    base = ["--checkpoint", tiny_ckpt] if script == "lora_finetune.py" else []
    assert run_cli(script, *base, *flags, "--no-figures", "--out", out).returncode == 0
    assert load_checkpoint(os.path.join(out, ckpt_name))["figures"] is False
    more = ["--max-steps", "2"]
    r = run_cli(script, "--out", out, "--resume", *more)
    assert r.returncode == 0, r.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".png")]


# ----- the fourteenth probe -----

def test_a_folder_in_the_way_of_a_runs_own_file_is_named_as_such(tmp_path):
    """Before: "--out runs/r1/samples.png: is an existing folder; give a file name", where --out
    was runs/r1 (a folder, as it must be)."""
    run = tmp_path / "r1"
    assert run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--no-figures", "--out", str(run)).returncode == 0
    (run / "loss.png").mkdir()
    r = run_cli("train.py", "--resume", "--out", str(run), "--max-steps", "2", "--no-figures")
    one_line_error(r, f"this run's file {run / 'loss.png'}: is an existing folder; move it away")
    assert "give a file name" not in r.stderr
    (run / "loss.png").rmdir()                            # the hint, followed: the run goes on
    assert run_cli("train.py", "--resume", "--out", str(run), "--max-steps", "2", "--no-figures").returncode == 0


def test_sample_names_its_default_output_not_a_flag_that_was_not_given(tiny_ckpt, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(tiny_ckpt, folder / "ckpt.pt")
    (folder / "sample_7.png").mkdir()
    r = run_cli("sample.py", "--checkpoint", str(folder / "ckpt.pt"), "--n", "1", "--steps", "2")
    one_line_error(r, f"the default output {folder / 'sample_7.png'}: is an existing folder; move it away")
    one_line_error(run_cli("sample.py", "--checkpoint", str(folder / "ckpt.pt"), "--out", str(folder / "sample_7.png")),
                   "--out", "is an existing folder; give a file name")


def test_evaluate_and_bench_write_json_only_under_a_json_name(tiny_ckpt, tmp_path):
    """Before: `evaluate.py --json runs/r2/samples.png` replaced another run's figure with JSON."""
    png = tmp_path / "samples.png"
    png.write_bytes(b"\x89PNG figure")
    one_line_error(run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--json", str(png)),
                   "writes JSON there; give a name ending in .json")
    assert png.read_bytes() == b"\x89PNG figure"
    r = run_cli("tools/bench.py", "--checkpoint", tiny_ckpt, "--json", str(png))
    assert r.returncode == 2 and "give a name ending in .json" in r.stderr and png.read_bytes() == b"\x89PNG figure"


def test_a_compile_failure_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    """Before: a torch.compile cache file left broken by a killed compile was a long InductorError
    traceback, and the run folder stayed behind holding only its record."""
    import torch._inductor.exc as inductor

    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *a, **k):
            raise inductor.InductorError(ImportError("/tmp/torchinductor_x/main.so: file too short"), None)
    monkeypatch.setattr(torch, "compile", lambda net, **k: Broken(net))
    run = tmp_path / "run"
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--compile", "--no-figures", "--out", str(run))
    one_line_error(r, "--compile failed (ImportError: /tmp/torchinductor_x/main.so: file too short); drop --compile")
    assert not run.exists()
    assert run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--no-figures", "--out", str(run)).returncode == 0
    with pytest.raises(ValueError, match="a bug"):            # any other error stays a traceback: a bug to see
        harness.cli.run_cli(lambda argv: (_ for _ in ()).throw(ValueError("a bug")), [], prog="x.py")


# ----- the fifteenth probe -----

@pytest.mark.parametrize("flags", [["--guidance", "0"], ["--sweep-guidance", "0,2"]])
def test_a_negative_label_at_guidance_zero_is_refused(tiny_ckpt, tmp_path, flags):
    """Before: every label drew the negative digit itself (out(neg) + 0 (out(y) - out(neg))), exit 0."""
    script = "evaluate.py" if "--sweep-guidance" in flags else "sample.py"
    out = str(tmp_path / ("e.json" if script == "evaluate.py" else "s.png"))
    one_line_error(run_cli(script, "--checkpoint", tiny_ckpt, *flags, "--negative", "3", "--steps", "2", "--n", "1",
                           "--json" if script == "evaluate.py" else "--out", out), "--negative 3 at guidance 0 draws")
    assert not os.path.exists(out)


def test_evaluate_records_the_scales_it_applied(tiny_ckpt, wild_adapter, quick_judge, tmp_path):
    """Before: without --lora-scale the JSON said lora_scale [] though each adapter ran at 1."""
    out = tmp_path / "e.json"
    r = run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--lora", wild_adapter, "--n", "1", "--steps", "2",
                "--data-dir", quick_judge, "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["lora_scale"] == [1.0] and res["adapters"] == [os.path.abspath(wild_adapter)]
