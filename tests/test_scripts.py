"""train.py / sample.py end to end on a tiny model: checkpoints, resume, outputs, errors."""
import os

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_FLAGS, run_script
from checkpoint import load_checkpoint, load_model, save_checkpoint
from unet import UNet


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = UNet(TINY).eval()
    path = tmp_path / "ckpt.pt"
    from dataclasses import asdict
    from config import DiffusionConfig
    save_checkpoint(str(path), {"model": model.state_dict(), "config": {
        "model": asdict(TINY), "diffusion": asdict(DiffusionConfig(timesteps=50))}})
    loaded, diff_cfg, _ = load_model(str(path), ema=False)
    args = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3]), torch.tensor([0, 4, 10])
    assert torch.equal(model(*args), loaded(*args)) and diff_cfg.timesteps == 50
    assert not [f for f in os.listdir(tmp_path) if f != "ckpt.pt"], "temp file left behind"


def test_train_writes_checkpoint_and_figures(tiny_ckpt):
    folder = os.path.dirname(tiny_ckpt)
    for name in ("ckpt.pt", "loss.png", "samples.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt["step"] == 3 and ckpt["config"]["model"]["base_channels"] == 8
    assert set(ckpt) >= {"model", "ema", "optimizer", "scheduler", "rng", "config"}


def test_resume_equals_uninterrupted_run(tmp_path):
    """3 steps, stop, resume for 3 more == 6 steps in one go, bit for bit (model and EMA)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = [*TINY_FLAGS, "--ckpt-every", "100"]
    assert run_script("train.py", *flags, "--max-steps", "6", "--out", a).returncode == 0
    assert run_script("train.py", *flags, "--max-steps", "3", "--out", b).returncode == 0
    r = run_script("train.py", "--resume", "--max-steps", "6", "--out", b)
    assert r.returncode == 0, r.stderr
    ca, cb = load_checkpoint(a + "/ckpt.pt"), load_checkpoint(b + "/ckpt.pt")
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for name, tensor in ca[key].items():
            assert torch.equal(tensor, cb[key][name]), f"{key}.{name} differs after resume"


def test_existing_run_is_not_clobbered(tiny_ckpt):
    out = os.path.dirname(tiny_ckpt)
    before = os.path.getmtime(tiny_ckpt)
    r = run_script("train.py", *TINY_FLAGS, "--out", out)
    assert r.returncode != 0 and "--resume" in r.stderr and os.path.getmtime(tiny_ckpt) == before


def test_sample_writes_png_and_npz(tiny_ckpt, tmp_path):
    png, npz = str(tmp_path / "g.png"), str(tmp_path / "g.npz")
    r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--label", "all", "--n", "3", "--steps", "4",
                   "--out", png, "--npz", npz, "--show-steps")
    assert r.returncode == 0, r.stderr
    assert png in r.stdout and os.path.getsize(png) > 0
    assert os.path.getsize(str(tmp_path / "g_steps.png")) > 0
    with np.load(npz) as f:
        assert f["images"].shape == (30, 28, 28) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [d for d in range(10) for _ in range(3)]


def test_sample_same_seed_same_images(tiny_ckpt, tmp_path):
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        npz = str(tmp_path / f"{name}.npz")
        r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--n", "2", "--steps", "3", "--seed", seed,
                       "--out", str(tmp_path / f"{name}.png"), "--npz", npz)
        assert r.returncode == 0, r.stderr
        outs.append(np.load(npz)["images"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("flags, message", [
    (["--label", "10"], "--label 10"),
    (["--label", "x"], "--label x"),
    (["--steps", "0"], "--steps 0"),
    (["--n", "0"], "--n 0"),
    (["--guidance", "nan"], "--guidance nan"),
    (["--out", "/nonexistent/dir/x.png"], "not writable"),
])
def test_sample_bad_flags(tiny_ckpt, tmp_path, flags, message):
    r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "x.png"), *flags)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.png")


def test_sample_missing_default_checkpoint(tmp_path):
    import glob
    import shutil
    for f in glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "*.py")):
        shutil.copy(f, tmp_path)     # a fresh folder with the code and no runs/
    r = run_script("sample.py", cwd=str(tmp_path))
    assert r.returncode != 0 and "python train.py" in r.stderr and "Traceback" not in r.stderr


def test_sample_refuses_bad_checkpoints(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    ckpt["config"]["model"]["base_channels"] = 16          # weights of another architecture
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, ckpt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(open(tiny_ckpt, "rb").read()[:5000])
    for path, message in ((other, "do not fit"), (str(junk), "not a readable checkpoint"),
                          (str(truncated), "not a readable checkpoint")):
        r = run_script("sample.py", "--checkpoint", path, "--out", str(tmp_path / "x.png"))
        assert r.returncode != 0 and message in r.stderr and path in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_train_bad_flags(tmp_path):
    for flags, message in ((["--batch-size", "0"], "batch_size"), (["--context-tokens", "1"], "context_tokens"),
                           (["--epochs", "-1"], "epochs"), (["--lr", "nan"], "lr")):
        r = run_script("train.py", *TINY_FLAGS, *flags, "--out", str(tmp_path / "r"))
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
