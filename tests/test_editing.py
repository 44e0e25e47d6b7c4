"""Sampling and editing: DPM-Solver++, img2img, inpainting, negative labels, label blends, and
sample.py's flags for them (bad input: one line, nothing written)."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_T, one_line_error, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import sample
from config import DiffusionConfig, SampleConfig
from diffusion import Diffusion
from unet import UNet


@pytest.fixture(scope="module")
def tiny():
    """A tiny untrained UNet (outputs far from exact) and its T = 50 diffusion."""
    torch.manual_seed(0)
    return UNet(TINY).eval(), Diffusion(DiffusionConfig(timesteps=TINY_T))


def draw(tiny, y, scfg, **edit):
    model, d = tiny
    return d.sample(model, y, scfg, generator=torch.Generator().manual_seed(0), **edit)


def test_dpmpp_with_two_steps_is_ddim(tiny):
    """DPM-Solver++(2M) is first order at its first and last step: at 2 steps it is DDIM."""
    y = torch.arange(4)
    a = draw(tiny, y, SampleConfig(sampler="dpmpp", steps=2))
    b = draw(tiny, y, SampleConfig(sampler="ddim", steps=2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = draw(tiny, y, SampleConfig(sampler="dpmpp", steps=10))
    assert (c - draw(tiny, y, SampleConfig(sampler="ddim", steps=10))).abs().max() > 1e-3


def test_dpmpp_works_for_eps_models_with_guidance_interval():
    torch.manual_seed(0)
    model, d = UNet(TINY).eval(), Diffusion(DiffusionConfig(timesteps=TINY_T, prediction="eps"))
    x = d.sample(model, torch.arange(3), SampleConfig(sampler="dpmpp", steps=8, guidance=3.0, guide_from=0.2))
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-5


@settings(max_examples=60, deadline=None)
@given(strength=st.floats(0.001, 1.0), steps=st.integers(1, 1000), T=st.integers(2, 1000),
       sampler=st.sampled_from(["ddim", "dpmpp", "ddpm"]))
def test_img2img_timesteps_start_at_strength_and_never_repeat(strength, steps, T, sampler):
    d = Diffusion(DiffusionConfig(timesteps=T))
    scfg = SampleConfig(sampler=sampler, steps=min(steps, T), strength=strength)
    ts = d.timesteps(scfg)
    assert ts[0] == round(strength * (T - 1)) and (ts[-1] == 0 or len(ts) == 1)   # 1 step: from the top
    assert all(a > b for a, b in zip(ts, ts[1:]))                       # strictly decreasing: no h = 0
    if sampler != "ddpm":
        assert len(ts) == min(max(1, -(-scfg.steps * strength // 1)), ts[0] + 1)


images = st.integers(0, 2 ** 32 - 1).map(lambda seed: torch.rand(2, 1, 28, 28, generator=torch.Generator()
                                                                   .manual_seed(seed)) * 2 - 1)


@settings(max_examples=10, deadline=None)
@given(init=images, seed=st.integers(0, 1000), sampler=st.sampled_from(["ddim", "dpmpp", "ddpm"]))
def test_strength_near_zero_returns_the_input(tiny, init, seed, sampler):
    """One step at t = 0, where sigma is 0.006 at T = 1000: even an untrained model returns the
    image to within 0.05 per pixel, 0.01 on average (about one grey level of 255)."""
    model, d = tiny[0], Diffusion(DiffusionConfig())
    x = d.sample(model, torch.arange(2), SampleConfig(sampler=sampler, steps=10, strength=1e-4),
                 generator=torch.Generator().manual_seed(seed), init=init)
    assert (x - init).abs().max() < 0.05 and (x - init).abs().mean() < 0.01


@settings(max_examples=10, deadline=None)
@given(init=images, seed=st.integers(0, 1000), sampler=st.sampled_from(["ddim", "dpmpp"]))
def test_strength_one_is_plain_sampling_from_the_same_seed(tiny, init, seed, sampler):
    model, d = tiny
    plain = d.sample(model, torch.arange(2), SampleConfig(sampler=sampler, steps=6),
                     generator=torch.Generator().manual_seed(seed))
    edited = d.sample(model, torch.arange(2), SampleConfig(sampler=sampler, steps=6),
                      generator=torch.Generator().manual_seed(seed), init=init)
    assert torch.equal(plain, edited)
    weak = d.sample(model, torch.arange(2), SampleConfig(sampler=sampler, steps=6, strength=0.3),
                    generator=torch.Generator().manual_seed(seed), init=init)
    assert (weak - init).abs().mean() < (plain - init).abs().mean()


@settings(max_examples=10, deadline=None)
@given(init=images, seed=st.integers(0, 1000), strength=st.sampled_from([0.3, 1.0]), jumps=st.integers(0, 2))
def test_a_mask_that_keeps_everything_returns_the_input_exactly(tiny, init, seed, strength, jumps):
    model, d = tiny
    x = d.sample(model, torch.arange(2), SampleConfig(steps=4, strength=strength, jumps=jumps),
                 generator=torch.Generator().manual_seed(seed), init=init, mask=torch.ones_like(init))
    assert torch.equal(x, init)


def test_negative_null_label_is_plain_guidance_bit_for_bit(tiny):
    y = torch.tensor([1, 5, 7])
    plain = draw(tiny, y, SampleConfig(steps=5, guidance=3.0))
    assert torch.equal(draw(tiny, y, SampleConfig(steps=5, guidance=3.0, negative=TINY.num_classes)), plain)
    assert not torch.equal(draw(tiny, y, SampleConfig(steps=5, guidance=3.0, negative=2)), plain)


@pytest.mark.parametrize("sampler,jumps", [("ddim", 0), ("ddpm", 0), ("dpmpp", 0), ("ddim", 2)])
def test_inpainting_keeps_the_kept_pixels_exactly(tiny, sampler, jumps):
    y, init = torch.arange(3), torch.rand(3, 1, 28, 28) * 2 - 1
    mask = torch.zeros(3, 1, 28, 28)
    mask[..., :14] = 1
    x = draw(tiny, y, SampleConfig(sampler=sampler, steps=5, jumps=jumps), init=init, mask=mask)
    assert torch.equal(x[..., :14], init[..., :14])
    assert (x[..., 14:] - init[..., 14:]).abs().mean() > 0.1            # the rest is drawn


def test_jumps_cost_one_more_network_call_each(tiny):
    model, d = tiny
    calls = []
    counting = lambda x, t, y: calls.append(len(x)) or model(x, t, y)
    mask = torch.ones(2, 1, 28, 28)
    d.sample(counting, torch.arange(2), SampleConfig(steps=5, guidance=1.0, jumps=2), init=torch.zeros(2, 1, 28, 28),
             mask=mask)
    assert len(calls) == 5 + 2 * 4                                      # no jumps at the last step


def test_negative_label_replaces_the_null_label_in_guidance(tiny):
    model, d = tiny
    x, y, t, w = torch.randn(2, 1, 28, 28), torch.tensor([7, 7]), 30, 2.5
    eps, _ = d.predict_eps_x0(model, x, t, y, SampleConfig(guidance=w, negative=1))
    tt = torch.full((2,), t)
    out = model(x, tt, torch.tensor([1, 1])) + w * (model(x, tt, y) - model(x, tt, torch.tensor([1, 1])))
    expected, _ = d.eps_and_x0(out, x, t)
    torch.testing.assert_close(eps, expected, rtol=0, atol=1e-5)
    plain, _ = d.predict_eps_x0(model, x, t, y, SampleConfig(guidance=w))
    assert (plain - eps).abs().max() > 1e-4


def test_one_hot_blend_is_the_label_and_a_half_blend_is_the_mean_context(tiny):
    model, _ = tiny
    y = torch.tensor([3, 8])
    weights = torch.nn.functional.one_hot(y, 11).float()
    assert torch.equal(model.context(weights), model.context(y))
    half = torch.zeros(1, 11)
    half[0, 3] = half[0, 8] = 0.5
    torch.testing.assert_close(model.context(half)[0], model.context(y).mean(0), rtol=0, atol=1e-6)
    a = draw(tiny, weights, SampleConfig(steps=4))
    b = draw(tiny, y, SampleConfig(steps=4))
    assert torch.equal(a, b)                                             # guidance's null label too


def test_a_single_batch_shows_progress_over_the_denoising_steps(tiny):
    model, d = tiny
    steps = []
    d.sample(model, torch.arange(2), SampleConfig(steps=7), on_step=lambda: steps.append(1))
    assert len(steps) == 7
    x, y, _ = sample.generate(model, d, [1, 2], 3, SampleConfig(steps=4), progress=True)
    assert x.shape == (6, 1, 28, 28) and y.tolist() == [1, 1, 1, 2, 2, 2]


def digit_png(path, size=(28, 28), mask=False):
    """A white bar on black (a "1", read as MNIST reads it), or a mask keeping the left half."""
    a = np.zeros(size[::-1], np.uint8)
    w, h = size
    if mask:
        a[:, : w // 2] = 255
    else:
        a[h // 7: h - h // 7, w * 2 // 7: w * 3 // 7] = 255
    Image.fromarray(a).save(path)
    return str(path)


def test_sample_py_img2img_inpainting_blend_and_negative_write_their_grids(tiny_ckpt, tmp_path):
    big, init, mask = digit_png(tmp_path / "big.png", (56, 56)), digit_png(tmp_path / "in.png"), \
        digit_png(tmp_path / "mask.png", mask=True)
    runs = {"i2i": ["--init", big, "--strength", "0.5"], "inp": ["--init", init, "--mask", mask, "--jumps", "1"],
            "blend": ["--label", "3:0.25,8:0.75"], "neg": ["--negative", "1"], "dpm": ["--sampler", "dpmpp"]}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.png"
        r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "2", "--steps", "4", "--out", str(out), *flags)
        assert r.returncode == 0, r.stderr
        assert Image.open(out).size == (62, 32)                           # 2 digits with padding
    grid = np.asarray(Image.open(tmp_path / "inp.png").convert("L"))[2:30, 2:30].astype(int)   # the first digit
    kept = np.asarray(Image.open(init))[:, :14].astype(int)
    assert np.abs(grid[:, :14] - kept).max() <= 1                         # the kept left half is the image


@pytest.mark.parametrize("flags,needle", [
    (["--strength", "0.5"], "--strength edits an image"),
    (["--mask", "M"], "--mask edits an image"),
    (["--init", "MISSING", "--strength", "0.5"], "not a readable image"),
    (["--init", "NOTIMG", "--strength", "0.5"], "not a readable image"),
    (["--init", "IN", "--mask", "SMALL"], "must have the image's size"),
    (["--init", "IN", "--strength", "0"], "strength 0.0: must be in (0, 1]"),
    (["--init", "IN", "--strength", "1.5"], "must be in (0, 1]"),
    (["--init", "IN", "--jumps", "2"], "--jumps resamples an inpainting"),
    (["--init", "IN", "--mask", "M", "--jumps", "99"], "jumps 99"),
    (["--label", "3:0.5,8:0.4"], "sum to 0.9, not 1"),
    (["--label", "3:0.5,3:0.5"], "each digit 0..9 once"),
    (["--label", "3:x,8:1"], "is not a number"),
    (["--label", "3:-0.5,8:1.5"], "must be in (0, 1]"),
    (["--label", "12"], "must be a digit 0..9"),
    (["--negative", "10"], "--negative 10"),
    (["--label", "7", "--negative", "7"], "--negative 7 is also a --label"),
    (["--label", "all", "--negative", "1"], "--negative 1 is also a --label"),
    (["--sampler", "dpmpp", "--eta", "0.5"], "only DDIM takes eta"),
    (["--sampler", "euler"], "unknown sampler"),
    (["--label", "3:0.5,8:0.5", "--npz", "OUT.npz"], "a blend has none"),
    (["--init", "IN", "--strength", "0.5", "--out", "IN"], "is the --init being read"),
])
def test_bad_editing_input_is_one_line_and_writes_nothing(tiny_ckpt, tmp_path, flags, needle):
    paths = {"IN": digit_png(tmp_path / "in.png"), "M": digit_png(tmp_path / "m.png", mask=True),
             "SMALL": digit_png(tmp_path / "small.png", (20, 20)), "MISSING": str(tmp_path / "missing.png"),
             "NOTIMG": str(tmp_path / "notimg.png"), "OUT.npz": str(tmp_path / "out.npz")}
    (tmp_path / "notimg.png").write_text("not an image")
    before = {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)}
    out = str(tmp_path / "grid.png")
    argv = [paths.get(f, f) for f in flags]
    argv = argv if "--out" in argv else argv + ["--out", out]
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "2", "--steps", "3", *argv)
    one_line_error(r, needle)
    assert {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("script,extra", [("evaluate.py", ["--n", "1"]), ("visualize.py", ["--figures", "blend"])])
@pytest.mark.parametrize("negative", ["10", "-2"])
def test_evaluate_and_visualize_refuse_a_negative_label_outside_the_digits(tiny_ckpt, script, extra, negative):
    r = run_cli(script, "--checkpoint", tiny_ckpt, "--negative", negative, *extra)
    one_line_error(r, "negative")


@pytest.mark.parametrize("flags,needle", [
    (["--guidance", "1", "--negative", "1"], "--negative would change nothing: guidance 1"),
    (["--guidance", "1", "--guidance-rescale", "0.7"], "--guidance-rescale would change nothing"),
    (["--guide-from", "0.9", "--guide-to", "0.91", "--guidance", "5"], "none of the 3 sampled steps"),
    (["--init", "examples/five.png"], "--init at --strength 1 starts from pure noise"),
    (["--label", "3: 0.5,8:0.5"], "(no spaces)"),
])
def test_editing_flags_that_would_change_nothing_are_refused(tiny_ckpt, tmp_path, flags, needle):
    r = run_cli("sample.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "3", "--out", str(tmp_path / "x.png"),
                *flags)
    one_line_error(r, needle)
    assert os.listdir(tmp_path) == []


def test_ddpm_needs_no_steps_below_a_small_T(tmp_path):
    """--sampler ddpm takes all T steps: a model with T < 50 samples with it, without --steps."""
    from conftest import TINY_FLAGS
    r = run_cli("train.py", *TINY_FLAGS, "--timesteps", "4", "--max-steps", "1", "--no-figures", "--out",
                str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    r = run_cli("sample.py", "--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--n", "1", "--sampler", "ddpm",
                "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr


def test_editing_figures_follow_the_seed(tiny_ckpt, tmp_path):
    import shutil
    pngs = []
    for seed in (0, 5):
        folder = tmp_path / str(seed)
        folder.mkdir()
        shutil.copy(tiny_ckpt, folder / "ckpt.pt")
        r = run_cli("visualize.py", "--checkpoint", str(folder / "ckpt.pt"), "--figures", "blend", "--steps", "2",
                    "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        pngs.append((folder / "blend.png").read_bytes())
    assert pngs[0] != pngs[1]


def test_evaluate_names_the_digit_its_negative_label_leaves_unguided(tiny_ckpt, quick_judge, tmp_path):
    out = tmp_path / "e.json"
    r = run_cli("evaluate.py", "--checkpoint", tiny_ckpt, "--n", "1", "--steps", "2", "--negative", "3",
                "--data-dir", quick_judge, "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "digit 3 is the --negative label too" in r.stdout
    assert json.loads(out.read_text())["sampling"]["unguided_digits"] == [3]


def test_negative_tool_counts_each_label_with_and_without_its_negative(tiny_ckpt, quick_judge):
    """tools/negative.py: per pair and scale, two lines whose counts add up to n; the first (away
    from "no label") is sample.py's plain guided draw, the second differs from it."""
    r = run_cli("tools/negative.py", "--checkpoint", tiny_ckpt, "--pairs", "3:1", "--guidance", "3", "--n", "6",
                "--data-dir", quick_judge)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("label 3 w 3 away from")]
    assert len(lines) == 2 and "no label" in lines[0] and lines[1].split(":")[0].endswith(" 1")
    counts = [json.loads(line.split("all ")[1]) for line in lines]
    assert [sum(c) for c in counts] == [6, 6] and all(len(c) == 10 for c in counts)


@pytest.mark.parametrize("flags,message", [
    (["--pairs", "7:7"], "two different digits"), (["--pairs", "7"], "label:away pairs"),
    (["--pairs", "7:12"], "digits 0..9"), (["--guidance", "1"], "a negative label changes nothing"),
    (["--guidance", "x"], "expected scales"), (["--n", "0"], "--n 0"), (["--sampler", "euler"], "choose from"),
])
def test_negative_tool_refuses_bad_flags_in_one_line(tiny_ckpt, quick_judge, flags, message):
    r = run_cli("tools/negative.py", "--checkpoint", tiny_ckpt, "--data-dir", quick_judge, *flags)
    one_line_error(r, message)


def test_negative_figure_pairs_each_label_with_its_negative_from_the_same_noise(tiny_ckpt, tmp_path, monkeypatch):
    """visualize.py --figures negative: row pairs (plain, away from a digit), the same seed per row."""
    import visualize
    calls = []
    monkeypatch.setattr(visualize, "image_table", lambda rows, names, cols, title, path: calls.append((rows, names)))
    model, d = UNet(TINY).eval(), Diffusion(DiffusionConfig(timesteps=TINY_T))
    visualize.editing_figure("negative", model, d, SampleConfig(steps=3, guidance=3.0), str(tmp_path / "n.png"))
    rows, names = calls[0]
    assert names == ["7", "7, not 1", "9", "9, not 4", "4", "4, not 9"]
    plain = d.sample(model, torch.full((visualize.NEGATIVE_NOISES,), 7), SampleConfig(steps=3, guidance=3.0),
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(rows[0], plain) and not torch.equal(rows[1], plain)
