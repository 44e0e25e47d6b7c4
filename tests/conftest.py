"""Shared helpers: the repo root on sys.path, THE tiny model (as a config and as flags), a tiny
trained checkpoint, and two ways to run a script: in this process (fast) or in a fresh one
(for what only a real process shows: kill -9, Ctrl-C, torchrun, interpreter start-up)."""
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))     # bench.py, lora_table.py
torch.set_num_threads(1)              # tiny tensors: one thread is as fast, and never stalls on a busy CPU
os.environ.setdefault("OMP_NUM_THREADS", "1")       # the same for the scripts run as subprocesses

from config import ModelConfig  # noqa: E402

# The tiny model every test uses: 50k parameters, 2 levels, T = 50.
TINY = ModelConfig(base_channels=8, channel_mults=(1, 2), context_tokens=2, context_dim=16,
                   attn_heads=2, ff_mult=1)
TINY_T = 50


def model_flags(cfg):
    """A ModelConfig as train.py flags: --base-channels 8 --channel-mults 1,2 ..."""
    flags = []
    for name, value in asdict(cfg).items():
        if name in ("in_channels", "num_classes"):
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += ["--" + name.replace("_", "-"), text]
    return flags


TINY_FLAGS = [*model_flags(TINY), "--timesteps", str(TINY_T), "--dataset", "mnist-5k", "--batch-size", "16",
              "--epochs", "1", "--eval-n", "0", "--warmup-steps", "2", "--log-every", "1",
              "--lr", "2e-3", "--ema-decay", "0.995", "--t-power", "1"]   # the recipe the pinned numbers were made with


def assert_close(a, b, atol=1e-6, msg=""):
    """torch.allclose with the max difference in the failure message."""
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"{msg} max |a - b| = {diff:.3g} > {atol}"


def run_script(*args, cwd=ROOT):
    """Run one of the project's scripts in a fresh process; returns CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def run_cli(script, *argv):
    """Run `python <script> argv` in this process, through the same run_cli() that the
    script's __main__ calls: -> CompletedProcess(returncode, stdout, stderr). A traceback is not
    caught: it fails the test, as it would be a bug."""
    from harness.cli import run_cli as script_cli
    module = importlib.import_module(os.path.basename(script).removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = script_cli(module.main, list(argv)) or 0
            except SystemExit as e:               # sys.exit("message"): the message goes to stderr, code 1
                code = e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


PROGRESS_BAR = re.compile(r"^[\w .-]*:\s+\d+%\|")     # tqdm: "train:  5%|5    | 1/20 [...]"


def one_line_error(r, *needles):
    """The house rule for bad input: non-zero exit, one line on stderr naming the problem
    (after any progress bar of the work done before the problem showed)."""
    assert r.returncode != 0, r.stdout
    lines = [l for l in r.stderr.strip().splitlines() if l.strip() and not PROGRESS_BAR.match(l)]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny model trained for a few steps by train.py itself (its figures are checked apart,
    in test_scripts.py: the sample grid alone would take 25 s here)."""
    out = tmp_path_factory.mktemp("run")
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "3", "--no-figures", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return os.path.join(out, "ckpt.pt")


@pytest.fixture(scope="session")
def quick_judge(tmp_path_factory):
    """A data folder holding evaluate.py's cached classifier, quickly trained (1 epoch on 256
    digits): enough for scripts that score samples (--eval-every) to run in seconds."""
    import evaluate
    from dataset import load_dataset
    folder = tmp_path_factory.mktemp("judge")
    x, y, _ = load_dataset("mnist-5k", split="train")
    clf = evaluate.train_classifier(x[:256], y[:256], epochs=1, progress=False)
    torch.save({"model": clf.state_dict(), "test_accuracy": 0.0},
               folder / f"classifier_mnist-5k_v{evaluate.CLASSIFIER_VERSION}.pt")
    return str(folder)


@pytest.fixture(autouse=True, scope="session")
def _folder_judges(tmp_path_factory):
    """Judges of the tests' folder datasets are cached in a temporary folder, not in the repo's data/
    (scripts run in this process; those run as subprocesses use ./data, as a user's would)."""
    import evaluate
    evaluate.FOLDER_JUDGES = str(tmp_path_factory.mktemp("judges"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from seed 0 and ends on one thread (a script's --threads must not leak)."""
    torch.manual_seed(0)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def wild_adapter(tiny_ckpt, tmp_path_factory):
    """A LoRA adapter (to_v, r 2) for the tiny model whose B is not zero, so that its strength shows."""
    from harness.adapters import base_fingerprint, save_adapter
    from harness.files import load_model
    from lora import inject_lora
    model, _, ckpt = load_model(tiny_ckpt)
    fingerprint = base_fingerprint(model)
    inject_lora(model, ["to_v"], 2, 2.0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("adapter") / "wild.safetensors")
    save_adapter(path, model, ["to_v"], 2, 2.0, False, ckpt["config"]["model"], fingerprint)
    return path
