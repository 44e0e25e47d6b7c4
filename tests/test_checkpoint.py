"""Checkpoints: round trip, atomic writes, and every bad file refused in one line."""
import os
from dataclasses import asdict

import pytest
import torch

from conftest import TINY, TINY_T, one_line_error, run_cli
from checkpoint import CheckpointError, load_checkpoint, load_model, prepare_run_folder, save_checkpoint
from config import DiffusionConfig
from unet import UNet


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = UNet(TINY).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"model": model.state_dict(), "config": {
        "model": asdict(TINY), "diffusion": asdict(DiffusionConfig(timesteps=TINY_T))}})
    loaded, diff_cfg, _ = load_model(str(path), ema=False)
    args = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3]), torch.tensor([0, 4, 10])
    assert torch.equal(model(*args), loaded(*args)) and diff_cfg.timesteps == TINY_T
    assert os.listdir(tmp_path) == ["ckpt.pt"], "temp file left behind"


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
        r = run_cli("sample.py", "--checkpoint", path, "--out", str(tmp_path / "x.png"))
        one_line_error(r, message, path)


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
        r = run_cli(script, "--checkpoint", str(path), "--out" if script == "sample.py" else "--json",
                    str(tmp_path / "x"))
        one_line_error(r, str(path))
    assert not os.path.exists(MARKER), "unpickling ran code"


def test_run_folder_rules(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        prepare_run_folder(out, resume=True, overwrite=False)
    assert prepare_run_folder(out, False, False) == os.path.join(out, "ckpt.pt")
    open(os.path.join(out, "ckpt.pt"), "w").close()
    with pytest.raises(CheckpointError, match="already holds a run"):
        prepare_run_folder(out, False, False)
    assert prepare_run_folder(out, True, False) == prepare_run_folder(out, False, True)
