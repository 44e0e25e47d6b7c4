"""Faults users meet: kill -9 and Ctrl-C mid-run, corrupt and hostile files, bad data, NaNs."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from conftest import ROOT, TINY_FLAGS, run_script
from checkpoint import load_checkpoint
from dataset import load_dataset

FLAGS = [*TINY_FLAGS, "--epochs", "4", "--ckpt-every", "1"]   # 4 epochs of 281 steps; a save every step


def start_training(out, *extra):
    return subprocess.Popen([sys.executable, "train.py", *FLAGS, "--out", out, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_mid_training_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL at a random moment (saves happen every step, so often mid-write): the last
    checkpoint still loads, and --resume ends bit-identical to a run never interrupted."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_script("train.py", *FLAGS, "--max-steps", "80", "--out", a).returncode == 0
    proc = start_training(b, "--max-steps", "80")
    wait_for(os.path.join(b, "ckpt.pt"), proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
    assert proc.poll() is None, "the run ended before the kill: nothing was tested"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    step = load_checkpoint(os.path.join(b, "ckpt.pt"))["step"]          # still loadable
    assert 1 <= step < 80
    r = run_script("train.py", "--resume", "--out", b, "--max-steps", "80")
    assert r.returncode == 0, r.stderr
    ca, cb = load_checkpoint(os.path.join(a, "ckpt.pt")), load_checkpoint(os.path.join(b, "ckpt.pt"))
    for key in ("model", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} (killed at step {step})"
    assert not [f for f in os.listdir(b) if ".tmp" in f or f.startswith("ckpt.pt.")], "temp files left"


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "run")
    proc = start_training(out)
    wait_for(os.path.join(out, "ckpt.pt"), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted at step" in stdout and "Traceback" not in stderr
    step = int(stdout.split("interrupted at step ")[1].split(":")[0])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == step


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/sd_lora_mnist_pwned"


def test_hostile_pickle_is_refused_without_running(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "config": {}}, path)
    for script in ("sample.py", "evaluate.py"):
        r = run_script(script, "--checkpoint", str(path), "--out" if script == "sample.py" else "--json",
                       str(tmp_path / "x"))
        assert r.returncode != 0 and str(path) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(MARKER), "unpickling ran code"


def test_non_finite_loss_stops_without_writing_nan(tmp_path):
    out = str(tmp_path / "run")
    r = run_script("train.py", *FLAGS, "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "20", "--out", out)
    assert r.returncode != 0 and "became" in r.stderr and "Traceback" not in r.stderr, r.stderr
    path = os.path.join(out, "ckpt.pt")
    if os.path.exists(path):
        ckpt = load_checkpoint(path)
        for key in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in ckpt[key].values()), f"non-finite {key} saved"


def _digit_folder(root, per_digit=10):
    """A folder of real digits as PNGs, 0..9 subfolders, black ink on white like scanned paper."""
    from PIL import Image
    x, y, _ = load_dataset("mnist-5k", split="test")
    for d in range(10):
        os.makedirs(os.path.join(root, str(d)), exist_ok=True)
        for i, idx in enumerate((y == d).nonzero()[:per_digit, 0].tolist()):
            a = (255 - (x[idx, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(np.kron(a, np.ones((2, 2), dtype=np.uint8))).save(os.path.join(root, str(d), f"{i}.png"))
    return root


def test_folder_dataset_loads_and_inverts(tmp_path):
    from dataset import load_folder
    x, y = load_folder(_digit_folder(str(tmp_path / "digits")))
    real, real_y, _ = load_dataset("mnist-5k", split="test")
    assert x.shape == (100, 1, 28, 28) and y.bincount().tolist() == [10] * 10
    first_zero = real[(real_y == 0).nonzero()[0, 0]]
    assert (x[0] - first_zero).abs().mean() < 0.1      # 56x56 black-on-white back to MNIST style


def test_folder_dataset_errors(tmp_path):
    root = _digit_folder(str(tmp_path / "digits"), per_digit=2)
    with open(os.path.join(root, "3", "notes.txt"), "w") as f:
        f.write("not an image")
    r = run_script("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", root, "--out", str(tmp_path / "r"))
    assert r.returncode != 0 and "notes.txt" in r.stderr and "Traceback" not in r.stderr, r.stderr
    os.remove(os.path.join(root, "3", "notes.txt"))
    for f in os.listdir(os.path.join(root, "7")):
        os.remove(os.path.join(root, "7", f))
    r = run_script("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", root, "--out", str(tmp_path / "r"))
    assert r.returncode != 0 and os.path.join(root, "7") in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_script("train.py", *TINY_FLAGS, "--dataset", "folder", "--data-dir", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "r"))
    assert r.returncode != 0 and "no such folder" in r.stderr


def test_lora_few_shot_folder(tiny_ckpt, tmp_path):
    """10 images per digit are enough to run a LoRA fine-tune end to end."""
    root = _digit_folder(str(tmp_path / "digits"))
    out = str(tmp_path / "lora")
    r = run_script("lora_finetune.py", "--checkpoint", tiny_ckpt, "--dataset", "folder", "--data-dir", root,
                   "--max-steps", "2", "--eval-n", "0", "--no-figures", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "100 images" in r.stdout and os.path.exists(os.path.join(out, "adapter.safetensors"))


def test_lora_finetune_resume_and_no_clobber(tiny_ckpt, tmp_path):
    out = str(tmp_path / "lora")
    flags = ["--checkpoint", tiny_ckpt, "--eval-n", "0", "--no-figures", "--out", out, "--batch-size", "16",
             "--epochs", "1"]
    assert run_script("lora_finetune.py", *flags, "--max-steps", "2").returncode == 0
    r = run_script("lora_finetune.py", *flags, "--max-steps", "2")
    assert r.returncode != 0 and "--resume" in r.stderr
    r = run_script("lora_finetune.py", *flags, "--max-steps", "4", "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    assert load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))["step"] == 4


def test_truncated_adapter_is_refused(tiny_ckpt, tmp_path):
    out = str(tmp_path / "lora")
    assert run_script("lora_finetune.py", "--checkpoint", tiny_ckpt, "--max-steps", "1", "--eval-n", "0",
                      "--no-figures", "--batch-size", "16", "--out", out).returncode == 0
    adapter = os.path.join(out, "adapter.safetensors")
    cut = str(tmp_path / "cut.safetensors")
    open(cut, "wb").write(open(adapter, "rb").read()[:300])
    r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--lora", cut, "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and cut in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--lora", adapter, "--lora-scale", "1", "--lora-scale", "2",
                   "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "--lora-scale" in r.stderr
