"""Shared helpers: the repo root on sys.path, a tiny model config, a tiny trained checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import ModelConfig  # noqa: E402

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2), context_tokens=2, context_dim=16,
                   attn_heads=2, ff_mult=1)
TINY_FLAGS = ["--base-channels", "8", "--channel-mults", "1,2", "--context-tokens", "2",
              "--context-dim", "16", "--attn-heads", "2", "--ff-mult", "1", "--timesteps", "50",
              "--dataset", "mnist-5k", "--batch-size", "16", "--epochs", "1", "--eval-n", "0",
              "--warmup-steps", "2", "--log-every", "1"]


def assert_close(a, b, atol=1e-6, msg=""):
    """torch.allclose with the max difference in the failure message."""
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"{msg} max |a - b| = {diff:.3g} > {atol}"


def run_script(*args, cwd=ROOT):
    """Run one of the project's scripts in a fresh process; returns CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny model trained for a few steps by train.py itself."""
    out = tmp_path_factory.mktemp("run")
    r = run_script("train.py", *TINY_FLAGS, "--max-steps", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return os.path.join(out, "ckpt.pt")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
