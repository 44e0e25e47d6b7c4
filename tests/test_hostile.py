"""A hostile user: every outcome is a right answer or one line on stderr with a non-zero exit --
never a traceback, never a pre-existing file changed, never a number that cannot be right.

Classes of failure, each with the tests that would have caught it: outputs clobbering inputs,
two writers in one run folder, non-finite weights and adapters, unvalidated npz files, folder
images of any PIL mode, --resume flags that were silently ignored, unbounded work."""
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
import lora
import sample
from checkpoint import CheckpointError, RunLock, load_checkpoint, load_model, save_checkpoint
from conftest import ROOT, TINY_FLAGS, one_line_error, run_cli
from config import DiffusionConfig, SampleConfig
from dataset import DataError, load_dataset, load_image
from diffusion import Diffusion, SamplingError
from evaluate import read_npz

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
    lora.save_adapter(adapter, model, "conv", 2, 2.0, False, c["config"]["model"], lora.base_fingerprint(load_model(ckpt)[0]))
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


def test_show_steps_figure_may_not_be_the_checkpoint(run_copy, tmp_path):
    ckpt = str(tmp_path / "g_steps.png")                  # --out g.png writes g_steps.png next to it
    shutil.copy(run_copy["ckpt"], ckpt)
    one_line_error(run_cli("sample.py", "--checkpoint", ckpt, "--out", str(tmp_path / "g.png"), "--show-steps"),
                   "being read")


def test_finetune_obeys_the_no_clobber_rule_for_every_file_it_writes(run_copy, tmp_path):
    folder = str(tmp_path / "base")
    shutil.copytree(run_copy["folder"], folder)
    before = digest(folder)
    common = ["--checkpoint", os.path.join(folder, "ckpt.pt"), "--max-steps", "1", "--eval-n", "0", "--no-figures"]
    one_line_error(run_cli("lora_finetune.py", *common, "--full", "--out", folder), "ckpt.pt: is the --checkpoint")
    one_line_error(run_cli("lora_finetune.py", *common, "--out", folder), "already holds a run")
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
    with RunLock(folder):
        assert not [f for f in os.listdir(folder) if "tmp" in f], "stale temp files left"
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
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from checkpoint import RunLock; "
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
            diffusion.sample(lambda x, t, y: torch.full_like(x, float("nan")), torch.tensor([1, 2]), sampler, steps=3)


# ----- bounded work -----

def test_generate_runs_bounded_batches_and_small_requests_are_unchanged(monkeypatch):
    diffusion = Diffusion(DiffusionConfig(timesteps=50), 10)
    sizes = []

    def model(x, t, y):                                   # a cheap stand-in denoiser
        sizes.append(len(x))
        return 0.1 * x + 0.01 * y.float().view(-1, 1, 1, 1)
    scfg = SampleConfig(steps=3, seed=5)
    x, y, _ = sample.generate(model, diffusion, [3, 4], 4, scfg)          # 8 images: one batch
    direct = diffusion.sample(model, y, "ddim", 3, 2.0, 0.0, generator=torch.Generator().manual_seed(5))
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


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA-alpha", "RGBA-white", "LA", "I;16", "I", "F", "P"])
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
