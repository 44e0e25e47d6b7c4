"""The scripts end to end on the tiny model, in-process: what they write, resume, the same
numbers as before the refactor, sampling output and flags."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_FLAGS, one_line_error, run_cli, run_script

import evaluate
from config import SampleConfig
from harness.files import load_checkpoint


def test_train_writes_its_checkpoint(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)                          # (the figures: test_figures_grids_and_eval_n_of_a_run)
    assert ckpt["step"] == 3 and ckpt["config"]["model"]["base_channels"] == 8
    assert set(ckpt) >= {"model", "ema", "optimizer", "scheduler", "rng", "config"}


def test_same_numbers_as_pinned(tiny_ckpt, tmp_path):
    """The tiny run's losses, its EMA weights and a grid of samples, pinned. They were the
    same before and after the loop.py / SampleConfig refactor; they changed deliberately once,
    when conv_block.norm stopped putting one channel per GroupNorm group (TINY's 8 channels).
    A change here must be deliberate."""
    ckpt = load_checkpoint(tiny_ckpt)
    losses = [round(loss, 5) for _, loss in ckpt["losses"]]
    assert losses == [0.95697, 0.86483, 0.82903], losses
    assert abs(sum(v.double().sum().item() for v in ckpt["ema"].values()) - 459.80891) < 1e-4   # CPU threads: rounding
    npz = str(tmp_path / "s.npz")
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--label", "all", "--n", "2", "--sampler", "ddim", "--steps", "3",
                "--seed", "1", "--npz", npz, "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    im = np.load(npz)["images"]
    pinned = np.array([[70, 58, 0, 0], [0, 56, 111, 73], [129, 218, 58, 187], [132, 0, 192, 99]])
    assert np.abs(im[0, 10:14, 10:14].astype(int) - pinned).max() <= 1      # +-1: rounding across CPUs
    assert abs(int(im.sum()) - 1721484) <= 20


def test_resume_equals_uninterrupted_run(tmp_path):
    """3 steps, stop, resume for 3 more == 6 steps in one go, bit for bit (model and EMA)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = [*TINY_FLAGS, "--ckpt-every", "100", "--no-figures"]
    assert run_cli("train.py", *flags, "--max-steps", "6", "--out", a).returncode == 0
    assert run_cli("train.py", *flags, "--max-steps", "3", "--out", b).returncode == 0
    r = run_cli("train.py", "--resume", "--max-steps", "6", "--out", b, "--no-figures")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    ca, cb = load_checkpoint(a + "/ckpt.pt"), load_checkpoint(b + "/ckpt.pt")
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for name, tensor in ca[key].items():
            assert torch.equal(tensor, cb[key][name]), f"{key}.{name} differs after resume"


def test_eval_every_logs_the_quality_curve_and_resume_keeps_it(tmp_path, quick_judge, monkeypatch):
    import csv

    monkeypatch.setattr(evaluate.QualityCurve, "STEPS", 2)      # the bookkeeping is under test, not the quality
    out = str(tmp_path / "run")
    flags = [*TINY_FLAGS, "--eval-every", "2", "--data-dir", quick_judge, "--out", out, "--no-figures"]
    assert run_cli("train.py", *flags, "--max-steps", "5").returncode == 0
    assert run_cli("train.py", "--resume", "--max-steps", "7", "--out", out, "--no-figures").returncode == 0
    with open(os.path.join(out, "eval_curve.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 5, 6, 7]              # every 2 steps and at each run's end
    assert [int(r["images"]) for r in rows] == [16 * int(r["step"]) for r in rows]
    minutes = [float(r["train_minutes"]) for r in rows]
    assert minutes == sorted(minutes) and minutes[0] > 0
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["floor"]) > 0
        assert abs(float(r["frechet_ratio"]) - float(r["frechet"]) / float(r["floor"])) < 1e-6
    from PIL import Image
    with Image.open(os.path.join(out, "eval_curve.png")) as im:
        assert len(set(im.convert("L").tobytes())) > 10


def test_sample_writes_png_and_npz(tiny_ckpt, tmp_path):
    png, npz = str(tmp_path / "g.png"), str(tmp_path / "g.npz")
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--label", "all", "--n", "3", "--steps", "4",
                "--out", png, "--npz", npz, "--show-steps")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    with Image.open(png) as im:           # 10 rows of 3 digits, 28 px + 2 px padding
        assert im.size == (3 * 30 + 2, 10 * 30 + 2)
    with Image.open(str(tmp_path / "g_steps.png")) as im:
        assert len(set(im.convert("L").tobytes())) > 10     # a drawn figure, not a blank page
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [d for d in range(10) for _ in range(3)]
    with Image.open(png) as im:                # tile (row d, column c) is the npz's image 3 d + c
        grid = np.asarray(im.convert("L")).astype(int)
    for i in range(30):
        r, c = divmod(i, 3)
        tile = grid[2 + 30 * r:2 + 30 * r + 28, 2 + 30 * c:2 + 30 * c + 28]
        assert np.abs(tile - images[i]).max() <= 1, i


def test_sample_same_seed_same_images(tiny_ckpt, tmp_path):
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        npz = str(tmp_path / f"{name}.npz")
        r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "2", "--steps", "3", "--seed", seed,
                    "--out", str(tmp_path / f"{name}.png"), "--npz", npz)
        assert r.returncode == 0, r.stderr
        outs.append(np.load(npz)["images"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("flags, message", [
    (["--label", "10"], "--label 10"),
    (["--label", "x"], "--label x"),
    (["--label", "\u00b2"], "--label"),                       # str.isdigit() says yes to a superscript
    (["--steps", "0"], "steps 0"),
    (["--steps", "51"], "steps 51"),                          # beyond the model's T = 50
    (["--n", "0"], "--n 0"),
    (["--guidance", "nan"], "guidance nan"),
    (["--eta", "1.5"], "eta 1.5"),
    (["--sampler", "euler"], "euler"),
    (["--seed", str(2 ** 64)], "seed"),
    (["--out", "/nonexistent/dir/x.png"], "not writable"),
])
def test_sample_bad_flags(tiny_ckpt, tmp_path, flags, message):
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "x.png"), *flags)
    one_line_error(r, message)
    assert not os.path.exists(tmp_path / "x.png")


def test_sample_missing_default_checkpoint(tmp_path):
    """A fresh folder with the code and no runs/: a real `python sample.py` says what to do."""
    for f in glob.glob(os.path.join(ROOT, "*.py")):
        shutil.copy(f, tmp_path)
    shutil.copytree(os.path.join(ROOT, "harness"), tmp_path / "harness")
    r = run_script("sample.py", cwd=str(tmp_path))
    one_line_error(r, "python train.py")


def test_train_bad_flags(tmp_path):
    for flags, message in ((["--batch-size", "0"], "batch_size"), (["--context-tokens", "1"], "context_tokens"),
                           (["--epochs", "-1"], "epochs"), (["--lr", "nan"], "lr"), (["--device", "tpu"], "tpu")):
        r = run_cli("train.py", *TINY_FLAGS, *flags, "--out", str(tmp_path / "r"))
        one_line_error(r, message)
        assert not os.path.exists(tmp_path / "r"), flags


def test_existing_run_is_not_clobbered(tiny_ckpt):
    out = os.path.dirname(tiny_ckpt)
    before = os.path.getmtime(tiny_ckpt)
    r = run_cli("train.py", *TINY_FLAGS, "--out", out)
    one_line_error(r, "--resume")
    assert os.path.getmtime(tiny_ckpt) == before


@pytest.mark.parametrize("script, flags, message", [
    ("train.py", ["--batch-size", "0"], "batch_size"),
    ("sample.py", ["--label", "10"], "--label 10"),
    ("evaluate.py", ["--n", "0"], "--n 0"),
    ("lora_finetune.py", ["--r", "0"], "r must be"),
])
def test_a_real_process_prints_one_line(script, flags, message, tmp_path):
    """Through a real interpreter (the __main__ path), not only cli() in-process."""
    r = run_script(script, *flags, "--out" if script != "evaluate.py" else "--json", str(tmp_path / "x"))
    one_line_error(r, message)


def test_lora_finetune_end_to_end(tiny_ckpt, tmp_path, monkeypatch):
    """A LoRA run writes its adapter, figures, summary and peft export; sample.py applies it."""
    from diffusion import Diffusion
    sample = Diffusion.sample

    def figures_in_5_steps(self, model, y, scfg=None, **kw):    # the figures' 270 samples: 5 DDIM steps, not 50
        return sample(self, model, y, scfg or SampleConfig(guidance=self.cfg.sample_guidance, steps=5), **kw)
    monkeypatch.setattr(Diffusion, "sample", figures_in_5_steps)
    out = str(tmp_path / "lora")
    r = run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--style", "italic", "--max-steps", "3",
                "--batch-size", "16", "--eval-n", "0", "--out", out, "--r", "2", "--targets", "qkv", "--export-peft")
    assert r.returncode == 0, r.stderr
    assert "on 24 layers (qkv)" in r.stdout          # to_q, to_k, to_v of the tiny model's 8 blocks
    from PIL import Image
    for f in ("base_vs_tuned.png", "strength_sweep.png", "loss.png", "lora_update.png"):
        with Image.open(os.path.join(out, f)) as im:
            assert len(set(im.convert("L").tobytes())) > 10, f
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 3 and 0 < summary["trainable"] < summary["total_params"]
    assert len(summary["update"]) == 24 and all(u["rel_norm"] > 0 for u in summary["update"])
    assert sorted(os.listdir(os.path.join(out, "peft"))) == ["adapter_config.json", "adapter_model.safetensors"]
    png = str(tmp_path / "s.png")
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--lora", os.path.join(out, "adapter.safetensors"),
                "--lora-scale", "0.5", "--merge", "--steps", "3", "--n", "2", "--out", png)
    assert r.returncode == 0 and os.path.getsize(png) > 0, r.stderr


@pytest.mark.parametrize("targets, slant, suggests", [("qkv", 0.75, True), ("qkv", 0.85, False),
                                                      ("conv", 0.75, False), ("all", 0.75, False),
                                                      ("attn", 0.75, True)])
def test_italic_below_80_percent_suggests_the_convolution_command(tiny_ckpt, tmp_path, monkeypatch,
                                                                   targets, slant, suggests):
    """The one-line suggestion after the style evaluation: only for a slant shift < 80%, and
    not to a run that already adapts the convolutions."""
    import lora_finetune
    monkeypatch.setattr(lora_finetune, "style_evaluation", lambda *a, **k: {"shift": {"slant": slant, "ink": 0.0}})
    r = run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--style", "italic", "--max-steps", "1",
                "--batch-size", "16", "--eval-n", "1", "--no-figures", "--targets", targets, "--out", str(tmp_path / "l"))
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if lora_finetune.BEST_ITALIC in l]
    assert len(lines) == (1 if suggests else 0)
    assert not suggests or lines[0].startswith(f"slant shift {100 * slant:.0f}% < 80%")
    if suggests and targets == "qkv":             # followed as printed: this base, into a new folder
        import shlex
        command = shlex.split(lines[0].split("`")[1])
        assert command[:2] == ["python", "lora_finetune.py"]
        r = run_cli("lora_finetune.py", *command[2:], "--max-steps", "1", "--eval-n", "0", "--no-figures")
        assert r.returncode == 0 and f"base: {os.path.abspath(tiny_ckpt)}" in r.stdout, r.stderr
        assert os.path.isfile(tmp_path / "l-all-r8" / "adapter.safetensors")


def test_sample_refuses_adapter_of_another_base(tiny_ckpt, tmp_path):
    other = str(tmp_path / "other")
    assert run_cli("train.py", *TINY_FLAGS, "--max-steps", "1", "--seed", "5", "--out", other,
                   "--no-figures").returncode == 0
    out = str(tmp_path / "lora")
    assert run_cli("lora_finetune.py", "--checkpoint", os.path.join(other, "ckpt.pt"), "--max-steps", "1",
                   "--batch-size", "16", "--eval-n", "0", "--no-figures", "--out", out).returncode == 0
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--lora", os.path.join(out, "adapter.safetensors"),
                "--steps", "2", "--out", str(tmp_path / "x.png"))
    one_line_error(r, "other base weights")


def test_preset_long_resumes_a_run_stored_before_sample_guidance_existed(tmp_path):
    """--preset long sets --sample-guidance 1.5 for new runs; resuming with it a run whose stored
    config has no such field (sampled at 2) is not refused as a contradicting flag."""
    out = tmp_path / "r"
    flags = [*TINY_FLAGS, "--preset", "long", "--no-figures", "--out", str(out)]
    assert run_cli("train.py", *flags, "--max-steps", "1").returncode == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["diffusion"]["sample_guidance"] == 1.5
    del ckpt["config"]["diffusion"]["sample_guidance"]              # as written before the field existed
    torch.save(ckpt, out / "ckpt.pt")
    r = run_cli("train.py", *flags, "--max-steps", "2", "--resume")
    assert r.returncode == 0, r.stderr
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 2 and resumed["config"]["diffusion"]["sample_guidance"] == 2.0


def test_figures_grids_and_eval_n_of_a_run(tmp_path, monkeypatch):
    """The end of a run: the loss curve, the 10 x 10 grid of the EMA weights' samples (sampled
    with the run's own settings), --sample-every 2's step grids at steps 2 and 4, and --eval-n 3:
    the final evaluation samples 3 per digit of the EMA weights with the run's sampling (its
    sample_guidance), against the real test digits and their labels. The sampler is stubbed:
    each call's images are one grey level, so every PNG shows which call drew it."""
    from PIL import Image

    import train
    drawn, scored, weights = [], [], []

    def generate(model, diffusion, labels, n, scfg, **kw):
        drawn.append((model.training, labels, n, scfg))
        return torch.full((10 * n, 1, 28, 28), -0.5 + 0.25 * len(drawn)), None, None
    monkeypatch.setattr(train, "generate", generate)
    monkeypatch.setattr(train.evaluate, "get_classifier", lambda dataset, data_dir: ("judge", 0.9))

    def evaluate_model(model, diffusion, clf, real_x, n, scfg, real_y=None):
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        scored.append((model.training, clf, len(real_x), n, scfg, real_y.bincount().tolist()))
        return {"score": 1}, None, None
    monkeypatch.setattr(train.evaluate, "evaluate_model", evaluate_model)
    monkeypatch.setattr(train.evaluate, "print_report", lambda r, acc, dataset: scored.append((r, acc)))
    out = str(tmp_path / "run")
    r = run_cli("train.py", *TINY_FLAGS, "--max-steps", "5", "--sample-every", "2", "--eval-n", "3",
                "--sample-guidance", "1.5", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "trained 5 steps" in r.stdout
    assert drawn == [(False, list(range(10)), 10, SampleConfig(guidance=1.5))] * 3
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.png", "run.json", "samples.png", "samples_000002.png",
                                       "samples_000004.png"]
    for name, level in (("samples_000002.png", -0.25), ("samples_000004.png", 0.0), ("samples.png", 0.25)):
        with Image.open(os.path.join(out, name)) as im:
            grid = np.asarray(im.convert("L"))
        assert grid.shape == (10 * 30 + 2, 10 * 30 + 2)
        assert (grid[2:30, 2:30] == round((level + 1) / 2 * 255)).all(), name
    with Image.open(os.path.join(out, "loss.png")) as im:
        assert im.size[0] > 300 and len(set(im.convert("L").tobytes())) > 10
    assert scored == [(False, "judge", 2000, 3, SampleConfig(guidance=1.5), [200] * 10), ({"score": 1}, 0.9)]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert all(torch.equal(weights[0][k], ckpt["ema"][k]) for k in ckpt["ema"]), "the EMA weights are scored"
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["ema"])
