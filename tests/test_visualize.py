"""visualize.py on the tiny model: attention capture changes no number, its maps are
distributions over the L tokens, the one-token trap starves W_q/W_k, the gradient check
flags dead parameters, and every figure decodes to the right frames and sizes."""
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import TINY, assert_close
from PIL import Image
from torch import nn

import lora
import visualize as V
from config import DiffusionConfig, SampleConfig
from cross_attn import CrossAttention, capture_attention
from diffusion import Diffusion
from harness import adapters
from harness.files import CheckpointError, save_checkpoint
from unet import UNet

INPUTS = (torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 30, 45]), torch.tensor([0, 3, 7, 10]))
BLOCKS_PER_LEVEL = {28: 3, 14: 5}     # TINY: down 1 + up 2 at 28x28; down 1 + mid 2 + up 2 at 14x14
HEALTHY = TINY        # every parameter gets a gradient (conv_block.norm keeps >= 2 channels per group)


def tiny_model(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return UNet(cfg).eval()


def save_tiny(path, model):
    save_checkpoint(str(path), {"model": model.state_dict(), "ema": model.state_dict(), "data": "mnist-5k",
                                "config": {"model": asdict(model.cfg), "diffusion": asdict(DiffusionConfig(timesteps=50))}})
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint, and a folder dataset of 2 blob 'digits' per label (fast to load)."""
    root = tmp_path_factory.mktemp("viz")
    g = np.random.default_rng(0)
    for d in range(10):
        os.makedirs(root / "data" / str(d))
        for i in range(2):
            img = np.zeros((28, 28), np.uint8)
            img[6 + d:20, 8:12 + 2 * i] = 255
            img[g.integers(0, 28, 30), g.integers(0, 28, 30)] = 200
            Image.fromarray(img).save(root / "data" / str(d) / f"{i}.png")
    return {"ckpt": save_tiny(root / "ckpt.pt", tiny_model()),
            "healthy": save_tiny(root / "healthy.pt", tiny_model(cfg=HEALTHY)), "data": ["--dataset", "folder", "--data-dir", str(root / "data"), "--batch-size", "20"]}


# ----- capture -----

def test_capture_changes_no_number_and_unhooks():
    model = tiny_model()
    expected = model(*INPUTS)
    with capture_attention(model) as records:
        assert torch.equal(model(*INPUTS), expected)
    assert len(records) == sum(BLOCKS_PER_LEVEL.values())
    model(*INPUTS)
    assert len(records) == sum(BLOCKS_PER_LEVEL.values()), "hooks left behind after the with"


def test_captured_weights_are_distributions_with_level_shapes():
    model = tiny_model()
    with capture_attention(model) as records:
        model(*INPUTS)
    levels = {}
    for r in records:
        B, h, N, L = r["weights"].shape
        assert (B, h, L) == (4, TINY.attn_heads, TINY.context_tokens)
        assert (r["weights"] >= 0).all()
        assert_close(r["weights"].sum(-1), torch.ones(B, h, N), atol=1e-5, msg=r["name"])
        H = int(N ** 0.5)
        assert r["out"].shape == (4, N, TINY.base_channels * (1 if H == 28 else 2))
        levels[H] = levels.get(H, 0) + 1
    assert levels == BLOCKS_PER_LEVEL


def test_explicit_weights_are_the_ones_sdpa_applies():
    """to_out(softmax(q k^T / sqrt(d)) v) written out == the fused forward, for every block."""
    model = tiny_model()
    with capture_attention(model) as records:
        model(*INPUTS)
    ctx = model.context(INPUTS[2])
    for r, m in zip(records, [m for m in model.modules() if isinstance(m, CrossAttention)]):
        B, h, N, L = r["weights"].shape
        v = m.to_v(ctx).view(B, L, h, -1).transpose(1, 2)                          # (B, h, L, C/h)
        out = m.to_out((r["weights"] @ v).transpose(1, 2).reshape(B, N, -1))
        assert_close(out, r["out"], atol=1e-5, msg=r["name"])


# ----- attention study and statistics -----

def test_attention_study_shapes_and_timesteps():
    model = tiny_model()
    d = Diffusion(DiffusionConfig(timesteps=50))
    study = V.attention_study(model, d, 3, SampleConfig(steps=10))
    ts = d.timesteps(SampleConfig(steps=10))
    assert [s["t"] for s in study] == [min(ts, key=lambda t: abs(t - f * 50)) for f in V.T_FRACTIONS]
    for s in study:
        assert s["x0"].shape == (2, 28, 28) and s["x_t"].shape == (28, 28) and s["x0"].abs().max() <= 1
        for b in s["blocks"]:
            assert b["weights"].shape == (2, TINY.context_tokens, b["H"], b["H"])
            assert_close(b["weights"].sum(1), torch.ones(2, b["H"], b["H"]), atol=1e-5)
    assert {H: len(bs) for H, bs in V.by_level(study[0]["blocks"]).items()} == BLOCKS_PER_LEVEL


def fake_study(weights, out_y, out_null):
    H = weights.shape[-1]
    block = {"name": "b", "H": H, "weights": weights, "head_entropy": torch.ones(2),
             "out": torch.stack([out_y, out_null])}
    return [{"t": 10, "x_t": torch.zeros(28, 28), "x0": torch.zeros(2, 28, 28), "blocks": [block]}]


def test_stats_uniform_and_one_hot_attention():
    uniform = torch.full((2, 4, 7, 7), 0.25)
    row = V.attention_stats(fake_study(uniform, torch.ones(8, 7, 7), torch.zeros(8, 7, 7)))[0]
    assert row["level"] == 7 and row["blocks"] == 1
    assert_close(torch.tensor(row["entropy"]), torch.ones(2), atol=1e-6)
    assert_close(torch.tensor(row["token_std"]), torch.zeros(2), atol=1e-7)
    assert row["steer"] == (1.0, 1.0) and row["out"] == (1.0, 1.0) and row["steer_contrast"] == (0.0, 0.0)
    one_hot = torch.zeros(2, 4, 7, 7)
    one_hot[:, 0, :4] = 1.0
    one_hot[:, 1, 4:] = 1.0                                  # each pixel picks one token: entropy 0
    half = torch.ones(8, 7, 7)
    half[:, :, :3] = 0                                       # the label changes only 4 of 7 columns
    row = V.attention_stats(fake_study(one_hot, torch.ones(8, 7, 7), half))[0]
    assert row["entropy"][1] < 1e-6 and row["token_std"][0] > 0.2
    assert abs(row["steer"][0] - 3 / 7) < 1e-6 and row["steer_contrast"][0] > 1


# ----- the one-token trap and the gradient check -----

def test_one_token_model_starves_wq_wk_only():
    model = tiny_model()
    one = V.one_token_model(model)
    assert model.cfg.context_tokens == 2 and model.context(INPUTS[2]).shape[1] == 2   # original untouched
    assert one.context(INPUTS[2]).shape == (4, 1, TINY.context_dim)
    assert torch.equal(one.context(INPUTS[2])[:, 0], model.context(INPUTS[2])[:, 0])
    d = Diffusion(DiffusionConfig(timesteps=50))
    x0, y = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    randomness = V.batch_randomness(d, x0)
    many, single = V.qkv_grad_norms(model, d, x0, y, randomness), V.qkv_grad_norms(one, d, x0, y, randomness)
    assert list(many) == list(single) and len(many) == sum(BLOCKS_PER_LEVEL.values())
    for b in many:
        assert min(many[b]) > 0, b
        q, k, v = single[b]
        assert v > 1e-4 and q < 1e-6 * v and k < 1e-6 * v, (b, single[b])   # ~1e-10: fused-kernel rounding


def test_gradient_report_healthy_and_injected_faults():
    d = Diffusion(DiffusionConfig(timesteps=50))
    x0, y = torch.rand(10, 1, 28, 28) * 2 - 1, torch.arange(10)
    randomness = V.batch_randomness(d, x0)
    model = tiny_model(cfg=HEALTHY)
    groups, problems = V.gradient_report(model, d, x0, y, randomness)
    assert problems == [] and groups["label_emb"][0] == 1 and all(n > 0 for _, n in groups.values())

    model.unused = nn.Parameter(torch.zeros(3))                 # a parameter the loss never sees
    with torch.no_grad():                                       # a sub-layer cut off: to_out = 0
        model.up[0].transformer.attn.to_out.weight.zero_()
        model.up[0].transformer.attn.to_out.bias.zero_()
    _, problems = V.gradient_report(model, d, x0, y, randomness)
    dead = dict(problems)
    assert "no gradient" in dead["unused"]
    assert {f"up.0.transformer.attn.to_{p}.weight" for p in "qkv"} <= set(dead)
    assert "up.0.transformer.attn.to_out.weight" not in dead

    model = tiny_model(cfg=HEALTHY)
    with torch.no_grad():
        model.conv_out.weight[0, 0, 0, 0] = float("nan")
    _, problems = V.gradient_report(model, d, x0, y, randomness)
    assert ("loss", "non-finite (nan)") in problems and any("non-finite" in w for _, w in problems[1:])


def test_check_finds_a_time_projection_killed_by_groupnorm():
    """The check's first real find: with one channel per GroupNorm group (TINY's 8 channels in
    8 groups, before conv_block.norm kept >= 2 per group) the time embedding cannot enter."""
    d = Diffusion(DiffusionConfig(timesteps=50))
    x0, y = torch.rand(10, 1, 28, 28) * 2 - 1, torch.arange(10)
    model = tiny_model()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm) and m.num_channels == 8:
            m.num_groups = 8                                   # one channel per group, as before
    _, problems = V.gradient_report(model, d, x0, y, V.batch_randomness(d, x0))
    dead = {name for name, _ in problems}
    assert {"down.0.time_proj.weight", "up.3.time_proj.weight", "up.4.time_proj.weight"} <= dead
    assert not [n for n in dead if n.startswith(("down.2", "mid", "up.0", "up.1"))]    # 16 channels: alive


# ----- the script -----

def decode(path):
    with Image.open(path) as im:
        frames = []
        for k in range(getattr(im, "n_frames", 1)):
            im.seek(k)
            frames.append(np.asarray(im.convert("L")))
    return frames


def test_main_writes_every_figure_and_docs_copies(run, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    stale = os.path.join(os.path.dirname(run["ckpt"]), ".denoising.gif.tmp-ab12cd34.gif")
    open(stale, "w").close()                       # a killed earlier visualize.py's: removed (no ".tmp" below)
    assert V.main(["--checkpoint", run["ckpt"], "--steps", "6", "--docs", str(docs), "--threads", "1",
                   *run["data"]]) == 0
    printed = capsys.readouterr().out
    assert "entropy/logL" in printed and "L=2 vs L=1" in printed
    folder = os.path.dirname(run["ckpt"])
    names = [n for fig in V.FIGURES for n in V.NAMES[fig]]
    for name in names:
        frames = decode(os.path.join(folder, name))
        assert all(f.shape == frames[0].shape for f in frames)
        h, w = frames[0].shape
        assert h >= 120 and w >= 300, (name, frames[0].shape)
        assert all(f.std() > 10 for f in frames), f"{name}: a frame of one colour"
        assert open(os.path.join(folder, name), "rb").read() == open(docs / name, "rb").read()
        assert os.path.getsize(docs / name) < 300_000
    film = decode(os.path.join(folder, "denoising.gif"))
    assert len(film) == 7           # 6 DDIM steps + the held result
    assert film[0].shape == (22 + 2 * 2 * 30 + 6 + 4, 44 + 2 * 300 + 4), "zoom 2 pixels per pixel, two strips"
    assert np.abs(film[0].astype(int) - film[-1]).mean() > 5, "the film does not move"
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_check_passes_a_healthy_model_and_fails_a_cut_off_layer(run, tmp_path, capsys):
    assert V.main(["--check", "--checkpoint", run["healthy"], *run["data"]]) == 0
    assert "check: ok" in capsys.readouterr().out
    model = tiny_model(cfg=HEALTHY)
    with torch.no_grad():
        model.down[0].transformer.attn.to_out.weight.zero_()
        model.down[0].transformer.attn.to_out.bias.zero_()
    cut = save_tiny(tmp_path / "cut.pt", model)
    assert V.main(["--check", "--checkpoint", cut, *run["data"]]) == 1
    out = capsys.readouterr().out
    assert "DEAD down.0.transformer.attn.to_q.weight" in out and "check: FAILED" in out


def make_adapter(path, trained=True):
    model = tiny_model(cfg=HEALTHY)
    fingerprint = adapters.base_fingerprint(model)
    lora.inject_lora(model, "attn", 2, 2.0)
    if trained:
        with torch.no_grad():
            for layer in lora.lora_layers(model):
                layer.lora_B.normal_(0, 0.1)
    adapters.save_adapter(str(path), model, "attn", 2, 2.0, False, asdict(HEALTHY), fingerprint)
    return str(path)


def test_check_with_adapter(run, tmp_path, capsys):
    path = make_adapter(tmp_path / "a.safetensors")
    assert V.main(["--check", "--checkpoint", run["healthy"], "--lora", path, *run["data"]]) == 0
    out = capsys.readouterr().out
    assert "ok   64 adapter tensors loaded as stored (32 layers)\n" in out
    assert "FAIL" not in out and "ok   each layer linear in scale" in out
    untrained = make_adapter(tmp_path / "b.safetensors", trained=False)     # B = 0: A gets no gradient
    assert V.main(["--check", "--checkpoint", run["healthy"], "--lora", untrained, *run["data"]]) == 1
    assert "DEAD up.4.transformer.attn.to_q.lora_A" in capsys.readouterr().out


def test_adapter_checks_catch_a_wrong_merge(monkeypatch):
    """A merge that folds in twice the update must fail the merged-vs-unmerged check."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = make_adapter(os.path.join(tmp, "a.safetensors"))
        model = tiny_model(cfg=HEALTHY)
        real = lora.LoraLayer.delta_weight
        monkeypatch.setattr(lora.LoraLayer, "merge", lambda self: (
            setattr(self, "weight_before_merge", self.base.weight.detach().clone()),
            self.base.weight.data.add_(2 * real(self, self.scale)), setattr(self, "merged_scale", self.scale)))
        results = V.adapter_checks(model, path, asdict(HEALTHY), *INPUTS)
    assert [ok for c, _, ok in results if c.startswith("merged")] == [False]


def test_bad_input_is_one_clear_error(run, tmp_path, capsys):
    with pytest.raises(V.VisualizeError, match="--label 12"):
        V.main(["--checkpoint", run["ckpt"], "--label", "12"])
    with pytest.raises(CheckpointError, match="not found"):
        V.main(["--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(V.VisualizeError, match="--figures"):
        V.main(["--checkpoint", run["ckpt"], "--figures", "attention,nope"])
    with pytest.raises(V.VisualizeError, match="steps 60"):
        V.main(["--checkpoint", run["ckpt"], "--steps", "60"])
    with pytest.raises(SystemExit, match="2"):
        V.main(["--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_by_level_orders_the_blocks_finest_first():
    blocks = [{"H": 7, "i": 0}, {"H": 28, "i": 1}, {"H": 14, "i": 2}, {"H": 28, "i": 3}]
    levels = V.by_level(blocks)
    assert list(levels) == [28, 14, 7]
    assert [b["i"] for b in levels[28]] == [1, 3], "blocks keep their order inside a level"


def test_real_batch_is_balanced_and_seeded_and_the_batch_drops_every_8th_label(tmp_path):
    from test_dataset import digit_folder
    root = digit_folder(str(tmp_path / "digits"), per_digit=3)
    x, y = V.real_batch("folder", root, 20, "cpu", seed=0)
    assert x.shape == (20, 1, 28, 28) and y.bincount().tolist() == [2] * 10
    x2, _ = V.real_batch("folder", root, 20, "cpu", seed=0)
    x3, _ = V.real_batch("folder", root, 20, "cpu", seed=1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert V.real_batch("folder", root, 7, "cpu")[1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    d = Diffusion(DiffusionConfig(timesteps=50, p_uncond=0.0, sample_guidance=1.0))
    t, noise, drop = V.batch_randomness(d, x, seed=3)
    assert drop.tolist() == [i % 8 == 0 for i in range(20)], "only every 8th label, with p_uncond 0"
    g = torch.Generator().manual_seed(3)
    t2, noise2, _ = d.draw(20, (1, 28, 28), "cpu", generator=g)
    assert torch.equal(t, t2) and torch.equal(noise, noise2)


def test_entropy_fraction_is_over_the_last_dimension_by_default():
    w = torch.zeros(3, 5, 4)
    w[..., 0] = 1.0                                         # every row one-hot over the last dim
    assert V.entropy_fraction(w).shape == (3, 5) and V.entropy_fraction(w).abs().max() < 1e-6
    assert_close(V.entropy_fraction(torch.full((3, 5, 4), 0.25)), torch.ones(3, 5), atol=1e-6)
    assert_close(V.entropy_fraction(torch.full((2, 8), 0.5), dim=0), torch.ones(8), atol=1e-6)
