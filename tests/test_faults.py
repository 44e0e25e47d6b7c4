"""Faults users meet: kill -9 and Ctrl-C mid-run (real processes), a stdout that goes away,
NaNs, LoRA runs that are resumed, refused or fed a tiny folder."""
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_FLAGS, one_line_error, run_cli
from test_dataset import digit_folder

from config import TrainConfig
from harness.files import load_checkpoint
from harness.run import resume_command

FLAGS = [*TINY_FLAGS, "--epochs", "4", "--ckpt-every", "1", "--no-figures"]   # 4 x 281 steps; a save every step


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
    assert run_cli("train.py", *FLAGS, "--max-steps", "40", "--out", a).returncode == 0
    proc = start_training(b, "--max-steps", "40")
    wait_for(os.path.join(b, "ckpt.pt"), proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    assert proc.poll() is None, "the run ended before the kill: nothing was tested"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    step = load_checkpoint(os.path.join(b, "ckpt.pt"))["step"]          # still loadable
    assert 1 <= step < 40
    r = run_cli("train.py", "--resume", "--out", b, "--max-steps", "40", "--no-figures")
    assert r.returncode == 0, r.stderr
    ca, cb = load_checkpoint(os.path.join(a, "ckpt.pt")), load_checkpoint(os.path.join(b, "ckpt.pt"))
    for key in ("model", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} (killed at step {step})"
    assert sorted(os.listdir(b)) == ["ckpt.pt", "run.json"], "temp files left"


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "run")
    proc = start_training(out)
    wait_for(os.path.join(out, "ckpt.pt"), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted at step" in stdout and "Traceback" not in stderr
    step = int(stdout.split("interrupted at step ")[1].split(":")[0])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == step


def run_with_stdout(script, argv, stdout):
    """A real process whose stdout is `stdout`: a closed pipe ("closed") or the full device."""
    if stdout == "closed":
        read_end, out = os.pipe()
        os.close(read_end)                    # nobody reads: what `| head` does once it has its lines
    else:
        out = os.open("/dev/full", os.O_WRONLY)
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}    # stdout block-buffered, as usual
        return subprocess.run([sys.executable, script, *argv], cwd=ROOT, stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=600, env=env)
    finally:
        os.close(out)


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_sample_writes_every_file_when_stdout_goes_away(tiny_ckpt, tmp_path, stdout):
    """`sample.py ... --npz x.npz | head` and `> /dev/full`: printing the first path fails.
    The npz is still written, with the same images as a normal run. A closed pipe is how
    `| head` ends, so exit 0 with nothing on stderr; a full disk is one line and exit 1."""
    if stdout == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    argv = ["--checkpoint", tiny_ckpt, "--label", "3", "--n", "2", "--steps", "2"]
    ref = run_cli("sample.py", *argv, "--out", str(tmp_path / "ref.png"), "--npz", str(tmp_path / "ref.npz"))
    assert ref.returncode == 0, ref.stderr
    r = run_with_stdout("sample.py", [*argv, "--out", str(tmp_path / "s.png"), "--npz", str(tmp_path / "s.npz")],
                        stdout)
    assert np.array_equal(np.load(tmp_path / "s.npz")["images"], np.load(tmp_path / "ref.npz")["images"])
    assert (tmp_path / "s.png").read_bytes() == (tmp_path / "ref.png").read_bytes()
    if stdout == "closed":
        assert r.returncode == 0 and "rror" not in r.stderr, r.stderr
    else:
        one_line_error(r, "sample.py: error: could not print to stdout", "every file was written")


def test_training_goes_on_when_stdout_goes_away(tmp_path):
    """train.py prints its config first: `train.py | head -1` must not kill the run there."""
    out = str(tmp_path / "run")
    r = run_with_stdout("train.py", [*TINY_FLAGS, "--max-steps", "3", "--no-figures", "--out", out], "closed")
    assert r.returncode == 0 and "rror" not in r.stderr, r.stderr
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3


def test_non_finite_loss_stops_without_writing_nan(tmp_path, monkeypatch):
    """A loss that turns NaN at the third step (as a diverging run's does) stops the run there,
    before its step; an lr that could only diverge (1e30) is refused before any work."""
    import diffusion
    real_loss, calls = diffusion.Diffusion.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value
    monkeypatch.setattr(diffusion.Diffusion, "loss", loss)
    out = str(tmp_path / "run")
    one_line_error(run_cli("train.py", *FLAGS, "--max-steps", "20", "--out", out), "became non-finite", "at step 2")
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 2
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in ckpt[key].values()), f"non-finite {key} saved"
    one_line_error(run_cli("train.py", *FLAGS, "--lr", "1e30", "--out", str(tmp_path / "other")), "lr 1e+30")


def test_lora_few_shot_folder(tiny_ckpt, tmp_path):
    """10 images per digit are enough to run a LoRA fine-tune end to end."""
    root = digit_folder(str(tmp_path / "digits"))
    out = str(tmp_path / "lora")
    flags = ["--checkpoint", tiny_ckpt, "--dataset", "folder", "--style-dir", root, "--batch-size", "128",
             "--eval-n", "0", "--no-figures", "--out", out]                 # one batch of all 100 images
    r = run_cli("lora_finetune.py", *flags, "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "100 images" in r.stdout and os.path.getsize(os.path.join(out, "adapter.safetensors")) > 1000
    r = run_cli("lora_finetune.py", *flags, "--max-steps", "3", "--resume")   # the same flags resume it
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))["step"] == 3
    one_line_error(run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--dataset", "folder",
                           "--out", str(tmp_path / "l2")), "--style-dir")


def test_lora_finetune_resume_and_no_clobber(tiny_ckpt, tmp_path):
    out = str(tmp_path / "lora")
    flags = ["--checkpoint", tiny_ckpt, "--eval-n", "0", "--no-figures", "--out", out, "--batch-size", "16",
             "--epochs", "1"]
    assert run_cli("lora_finetune.py", *flags, "--max-steps", "2").returncode == 0
    one_line_error(run_cli("lora_finetune.py", *flags, "--max-steps", "2"), "--resume")
    r = run_cli("lora_finetune.py", *flags, "--max-steps", "4", "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    assert load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))["step"] == 4


def test_lora_resume_finds_its_base_and_the_hint_is_a_working_command(tiny_ckpt, tmp_path):
    """`lora_finetune.py --out DIR --resume` (what the interrupted run prints, give or take the
    flags) takes the base the run recorded: it used to look for runs/mnist/ckpt.pt. The printed
    command quotes its paths and keeps the run's --max-steps, which the checkpoint does not store."""
    out = str(tmp_path / "my lora")
    flags = ["--eval-n", "0", "--no-figures", "--batch-size", "16", "--epochs", "1"]
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, *flags, "--out", out, "--max-steps", "2").returncode == 0
    r = run_cli("lora_finetune.py", "--out", out, "--resume", "--max-steps", "3", *flags)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    assert load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))["step"] == 3
    tcfg = replace(TrainConfig(), out=out, max_steps=150)
    assert shlex.split(resume_command("lora_finetune.py", tcfg, "--checkpoint", tiny_ckpt)) == [
        "python", "lora_finetune.py", "--out", out, "--resume", "--checkpoint", tiny_ckpt, "--max-steps", "150"]


def test_lora_export_peft_survives_resume_overwrite_and_a_killed_export(tiny_ckpt, tmp_path):
    """The run's own peft/ export is replaced on --resume and --overwrite (it used to stop the run
    at its very end: "not an empty folder"), a killed export's temp file is cleaned up, and a
    file of the user's in peft/ is refused before any training, not after it."""
    out = str(tmp_path / "lora")
    peft_dir = os.path.join(out, "peft")
    flags = ["--checkpoint", tiny_ckpt, "--eval-n", "0", "--no-figures", "--out", out, "--batch-size", "16",
             "--epochs", "1", "--export-peft"]
    assert run_cli("lora_finetune.py", *flags, "--max-steps", "2").returncode == 0
    stale = os.path.join(peft_dir, ".adapter_model.safetensors.tmp-abcd1234.safetensors")
    open(stale, "w").close()                                   # what a kill -9 during the export leaves
    r = run_cli("lora_finetune.py", *flags, "--max-steps", "4", "--resume")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(peft_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file
    ema = load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))["ema"]
    exported = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    a_key = next(k for k in ema if k.endswith("lora_A"))          # the export holds step 4's weights
    assert torch.equal(exported[f"base_model.model.{a_key[:-len('.lora_A')]}.lora_A.weight"].flatten(),
                       ema[a_key].flatten())
    open(os.path.join(peft_dir, "notes.txt"), "w").close()
    one_line_error(run_cli("lora_finetune.py", *flags, "--max-steps", "6", "--resume"), "peft", "holds other files (notes.txt)")
    assert load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))["step"] == 4      # refused before training
    os.remove(os.path.join(peft_dir, "notes.txt"))
    assert run_cli("lora_finetune.py", *flags, "--max-steps", "2", "--overwrite").returncode == 0


def test_a_finished_lora_run_gets_a_late_peft_export_on_resume(tiny_ckpt, tmp_path):
    """--export-peft and --fused say how the adapter is exported and computed, not what it is:
    --resume takes them from the command line (a late export used to be refused as a conflict)."""
    out = str(tmp_path / "lora")
    flags = ["--checkpoint", tiny_ckpt, "--eval-n", "0", "--no-figures", "--out", out, "--batch-size", "16",
             "--epochs", "1", "--max-steps", "2"]
    assert run_cli("lora_finetune.py", *flags).returncode == 0
    r = run_cli("lora_finetune.py", *flags, "--resume", "--export-peft", "--no-fused")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(out, "peft"))) == ["adapter_config.json", "adapter_model.safetensors"]
    one_line_error(run_cli("lora_finetune.py", *flags, "--resume", "--r", "2"), "--r 2")     # what it is: refused


def test_truncated_adapter_is_refused(tiny_ckpt, tmp_path):
    out = str(tmp_path / "lora")
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--max-steps", "1", "--eval-n", "0",
                   "--no-figures", "--batch-size", "16", "--out", out).returncode == 0
    adapter = os.path.join(out, "adapter.safetensors")
    cut = str(tmp_path / "cut.safetensors")
    open(cut, "wb").write(open(adapter, "rb").read()[:300])
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--lora", cut, "--out", str(tmp_path / "x.png")),
                   cut)
    one_line_error(run_cli("sample.py", "--checkpoint", tiny_ckpt, "--lora", adapter, "--lora-scale", "1",
                           "--lora-scale", "2", "--out", str(tmp_path / "x.png")), "--lora-scale")


def test_weights_that_turn_non_finite_stop_training_before_a_save(tmp_path, monkeypatch):
    """An optimiser step that leaves a weight non-finite stops the run at that step; the
    checkpoint of the step before is the last one written."""
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = str(tmp_path / "run")
    one_line_error(run_cli("train.py", *FLAGS, "--max-steps", "10", "--out", out), "weights became non-finite",
                   "at step 2")
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 2
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in ckpt[key].values()), f"non-finite {key} saved"


@pytest.mark.parametrize("script", ["train.py", "tools/bench.py"])
def test_ctrl_c_while_the_script_starts_is_one_line(script):
    """Ctrl-C in the first second, while torch imports, is one line and exit 130: never a traceback,
    never an interrupt swallowed by a half-imported package."""
    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and err == f"{os.path.basename(script)}: interrupted\n", err
