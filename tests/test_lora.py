"""LoRA: exact at init, merge/unmerge identities, only adapters train, adapter files are checked."""
import os
import re
from dataclasses import asdict

import pytest
import torch
from conftest import TINY, assert_close
from torch import nn

import lora
import visualize
from config import DiffusionConfig
from diffusion import Diffusion
from harness import adapters
from unet import UNet

INPUTS = (torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 30, 45]), torch.tensor([0, 3, 7, 10]))


def lora_model(targets="attn", r=4, alpha=8.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = UNet(TINY).eval()
    names = lora.inject_lora(model, targets, r, alpha, **kw)
    return model, names


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_init_and_scale_zero_equal_base_exactly():
    torch.manual_seed(0)
    base = UNet(TINY).eval()
    expected = base(*INPUTS)
    names = lora.inject_lora(base, "attn", 4, 8.0)
    assert len(names) == 4 * sum(1 for n, _ in base.named_modules() if n.endswith(".attn"))
    assert torch.equal(base(*INPUTS), expected)               # B = 0: exactly the base model
    randomize_B(base)
    assert not torch.equal(base(*INPUTS), expected)
    lora.set_scale(base, 0.0)
    assert torch.equal(base(*INPUTS), expected)               # scale 0: exactly the base model


def test_layer_math_and_scaling():
    lin = nn.Linear(6, 5)
    layer = lora.LoraLayer(lin, r=2, alpha=8.0)
    assert layer.scaling == 4.0 and lora.LoraLayer(nn.Linear(6, 5), 4, 8.0, use_rslora=True).scaling == 4.0
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2) and (layer.lora_B == 0).all()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.scale = 0.5
    x = torch.randn(3, 6)
    assert_close(layer(x), lin(x) + 0.5 * 4.0 * x @ layer.lora_A.T @ layer.lora_B.T, atol=1e-5)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


LAYERS = {"linear": (lambda: nn.Linear(6, 5), (3, 6)), "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 7, 7)),
          "strided-conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 9, 9))}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_readable_forward_is_the_article_form_and_equals_the_fused_one(kind):
    make, shape = LAYERS[kind]
    base = make()
    layer = lora.LoraLayer(base, r=2, alpha=4.0)                   # scaling = alpha / r = 2
    x = torch.randn(shape)
    for fused in (False, True):                                   # B = 0: both are exactly the base layer
        layer.fused = fused
        assert torch.equal(layer(x), base(x)), f"fused={fused}"
    with torch.no_grad():
        layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape))  # a trained-looking B
    A, B = layer.lora_A, layer.lora_B
    if kind == "linear":
        detour = x @ A.T @ B.T                                    # B(A(x))
    else:                                                         # k x k conv to r channels, 1 x 1 conv back
        h = nn.functional.conv2d(x, A.view(2, 4, 3, 3), stride=base.stride, padding=1)
        detour = nn.functional.conv2d(h, B[:, :, None, None])
    for scale in (0.5, 1.0):
        layer.scale = scale
        layer.fused = False
        readable = layer(x)
        assert_close(readable, base(x) + scale * 2.0 * detour, atol=1e-6, msg="base(x) + s alpha/r B(A(x))")
        layer.fused = True
        assert_close(layer(x), readable, atol=1e-6, msg=f"fused vs readable at scale {scale}")
        assert not torch.equal(readable, base(x))
    for fused in (False, True):                                   # gradients reach A and B either way
        layer.fused = fused
        layer.zero_grad()
        layer(x).sum().backward()
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_set_fused_switches_every_layer_and_keeps_the_model_output():
    model, _ = lora_model("attn+conv")
    randomize_B(model)
    readable = model(*INPUTS)
    lora.set_fused(model, True)
    assert all(layer.fused for layer in lora.lora_layers(model))
    assert_close(model(*INPUTS), readable, atol=1e-5, msg="fused UNet vs readable UNet")
    lora.set_fused(model, False)
    assert torch.equal(model(*INPUTS), readable)


def test_lora_dropout_acts_in_training_only():
    lin = nn.Linear(6, 5)
    layer = lora.LoraLayer(lin, r=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 6)
    full = lin(x) + x @ layer.lora_A.T @ layer.lora_B.T
    for fused in (False, True):               # the fused form has no dropout: training never uses it
        layer.fused = fused
        torch.manual_seed(0)
        dropped = layer.train()(x)
        assert not torch.allclose(dropped, full, atol=1e-4)       # some inputs to A were dropped
        assert_close(layer.eval()(x), full, atol=1e-5)            # eval: no dropout
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    assert torch.equal(layer(x), a) and not torch.equal(layer(x), a)   # random masks, seeded


@pytest.mark.parametrize("targets", ["attn", "attn+conv"])
def test_merge_equals_unmerged_and_unmerge_restores(targets):
    model, _ = lora_model(targets)
    randomize_B(model)
    lora.set_scale(model, 0.7)
    before = {n: p.clone() for n, p in model.named_parameters()}
    unmerged = model(*INPUTS)
    for layer in lora.lora_layers(model):
        layer.merge()
    assert_close(model(*INPUTS), unmerged, atol=1e-5, msg="merged vs unmerged")
    with pytest.raises(lora.LoraError, match="already merged"):
        lora.lora_layers(model)[0].merge()
    for layer in lora.lora_layers(model):
        layer.unmerge()
    for n, p in model.named_parameters():
        assert_close(p, before[n], atol=1e-6, msg=n)
    model.eval()   # eval() must not merge anything
    assert all(layer.merged_scale is None for layer in lora.lora_layers(model))


def test_conv_lora_is_a_low_rank_update_of_the_kernel():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = lora.LoraLayer(conv, r=2, alpha=4.0)
    assert layer.lora_A.shape == (2, 4 * 3 * 3) and layer.lora_B.shape == (6, 2)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(layer(x), conv(x))                      # B = 0: exactly the base conv
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = 2.0 * (layer.lora_B @ layer.lora_A).view(6, 4, 3, 3)   # scaling alpha / r = 2, rank <= 2
    expected = nn.functional.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=1)
    assert_close(layer(x), expected, atol=1e-5, msg="conv LoRA vs conv with W + scaling B A")
    assert torch.linalg.matrix_rank(delta.view(6, -1)) == 2


def test_presets_wrap_the_layers_they_name():
    attns = [n for n, m in UNet(TINY).named_modules() if n.endswith(".attn")]
    model = UNet(TINY)
    names = lora.inject_lora(model, "qkv", 2, 2.0)                # the article's choice: no to_out
    assert set(names) == {f"{a}.to_{p}" for a in attns for p in "qkv"}
    assert set(lora.inject_lora(UNet(TINY), "attn", 2, 2.0)) == {f"{a}.to_{p}" for a in attns for p in ("q", "k", "v", "out")}
    assert "PRESETS" not in vars(lora) and set(lora.TARGET_PRESETS) == \
        {"qkv", "attn", "attn+ff", "all-linear", "conv", "attn+conv", "all"}
    model = UNet(TINY)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(lora.inject_lora(model, "all-linear", 2, 2.0)) == linears     # every nn.Linear, no conv
    model = UNet(TINY)
    names = lora.inject_lora(model, "conv", 2, 2.0)
    resnet_convs = [n for n, m in model.named_modules() if re.search(r"\.conv(1|2)$", n)]
    assert names and set(names) == set(resnet_convs)
    assert all(isinstance(model.get_submodule(n).base, nn.Conv2d) for n in names)


def test_param_groups_give_B_its_own_learning_rate():
    model, names = lora_model("attn")
    lora.mark_only_lora_trainable(model)
    a_group, b_group = lora.param_groups(model, 1e-3, 16.0)
    assert a_group["lr"] == 1e-3 and b_group["lr"] == 16e-3
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in b_group["params"]} == {f"{n}.lora_B" for n in names}
    assert {by_id[id(p)] for p in a_group["params"]} == {f"{n}.lora_A" for n in names}


def test_only_lora_trains_and_every_adapter_gets_gradient():
    model, names = lora_model([lora.ATTN, r"\.ff\.net\.(0|2)$", r"\.conv(1|2)$"])
    lora.mark_only_lora_trainable(model)
    model.train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    d = Diffusion(DiffusionConfig(timesteps=50, p_uncond=0.0, sample_guidance=1.0))
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    for step in range(3):
        opt.zero_grad()
        d.loss(model, x0, torch.arange(8)).backward()
        if step == 1:   # after one step B != 0, so A gets gradient too
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and p.grad.abs().max() > 0, f"{n}: zero gradient"
        opt.step()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{m}" for n in names for m in "AB"}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert any(n.endswith("to_q") for n in names) and any(n.endswith("to_k") for n in names)


def test_default_lora_set_up_is_the_articles_and_trains_under_3_percent():
    """The card: lora_finetune.py's default wraps nn.Linear layers only -- W_q, W_k, W_v of every
    cross-attention, the article's choice -- and trains at most 3% of the default model."""
    from config import LoraConfig, ModelConfig
    model, lc = UNet(ModelConfig()), LoraConfig()
    total = sum(p.numel() for p in model.parameters())
    names = lora.inject_lora(model, lc.targets, lc.r, lc.alpha)
    lora.mark_only_lora_trainable(model)
    assert all(isinstance(model.get_submodule(n).base, nn.Linear) for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"to_q", "to_k", "to_v"} and len(names) == 3 * 11
    assert 0.01 < n_trainable(model) / total <= 0.03


def test_inject_errors():
    model = UNet(TINY)
    with pytest.raises(lora.LoraError, match="matches no"):
        lora.inject_lora(model, r"\.nonexistent$", 4, 4.0)
    with pytest.raises(lora.LoraError, match="a preset name is used alone: --targets qkv"):
        lora.inject_lora(model, "qkv,conv", 4, 4.0)               # in a list, a preset's name is a regex
    lora.inject_lora(model, "attn", 4, 4.0)
    with pytest.raises(lora.LoraError, match="already has LoRA"):
        lora.inject_lora(model, "attn", 4, 4.0)
    for bad, message in ((",", "no LoRA targets"), ("(", "not a valid regular expression")):
        with pytest.raises(lora.LoraError, match=message):
            lora.inject_lora(UNet(TINY), bad, 4, 4.0)


def test_trainable_fraction_of_presets():
    total = sum(p.numel() for p in UNet(TINY).parameters())
    counts = {}
    for preset in ("attn", "attn+ff", "all-linear", "conv"):
        model, _ = lora_model(preset)
        lora.mark_only_lora_trainable(model)
        counts[preset] = n_trainable(model)
    assert 0 < counts["attn"] < counts["attn+ff"] < counts["all-linear"] < total


def _save(model, path, fingerprint):
    adapters.save_adapter(str(path), model, "attn", 4, 8.0, False, asdict(TINY), fingerprint, style="bold")


def test_adapter_round_trip_and_checks(tmp_path):
    torch.manual_seed(0)
    base_sd = UNet(TINY).state_dict()
    model, _ = lora_model()
    fp = adapters.base_fingerprint(model)
    randomize_B(model)
    expected = model(*INPUTS)
    _save(model, tmp_path / "a.safetensors", fp)

    fresh = UNet(TINY).eval()
    fresh.load_state_dict(base_sd)
    assert adapters.base_fingerprint(fresh) == fp
    adapters.load_adapter(fresh, str(tmp_path / "a.safetensors"), asdict(TINY))
    assert torch.equal(fresh(*INPUTS), expected)

    other = UNet(TINY)                                  # same architecture, other weights
    with pytest.raises(lora.LoraError, match="other base weights"):
        adapters.load_adapter(other, str(tmp_path / "a.safetensors"), asdict(TINY))
    with pytest.raises(lora.LoraError, match="another model"):
        adapters.load_adapter(UNet(TINY), str(tmp_path / "a.safetensors"), {**asdict(TINY), "base_channels": 16})


def test_adapter_with_missing_or_unexpected_keys_fails(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    base_sd = UNet(TINY).state_dict()
    model, _ = lora_model()
    _save(model, tmp_path / "a.safetensors", adapters.base_fingerprint(model))
    tensors = load_file(str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    first = sorted(tensors)[0]
    for name, broken, message in (("missing", {k: v for k, v in tensors.items() if k != first}, f"missing ['{first}']"),
                                  ("unexpected", {**tensors, "mid.0.lora_X": torch.zeros(1)}, "unexpected ['mid.0.lora_X']"),
                                  ("shape", {**tensors, first: torch.zeros(3, 3)}, "has shape (3, 3)")):
        path = str(tmp_path / f"{name}.safetensors")
        save_file(broken, path, metadata=meta)
        fresh = UNet(TINY)
        fresh.load_state_dict(base_sd)
        with pytest.raises(lora.LoraError, match=re.escape(message)):
            adapters.load_adapter(fresh, path, asdict(TINY))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(100))
    with pytest.raises(lora.LoraError, match="not a readable"):
        adapters.load_adapter(UNet(TINY), str(junk), asdict(TINY))


def test_adapter_without_layers_metadata_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    model, _ = lora_model()
    path = str(tmp_path / "a.safetensors")
    _save(model, path, adapters.base_fingerprint(model))
    with safe_open(path, "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "layers"}   # as files of the old format
    save_file(load_file(path), path, metadata=meta)
    fresh = UNet(TINY)
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    with pytest.raises(lora.LoraError, match="predates this format") as e:
        adapters.load_adapter(fresh, path, asdict(TINY))
    assert "\n" not in str(e.value) and not lora.lora_layers(fresh)


def known_update_model(r=2):
    """A TINY UNet with LoRA on q, k, v and the convs, A and B set to seeded random values."""
    model, names = lora_model([lora.QKV, lora.CONV], r=r, alpha=4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    return model, names


def test_update_stats_are_the_norms_and_singular_values_of_BA():
    model, names = known_update_model(r=2)
    lora.set_scale(model, 0.5)
    stats = lora.update_stats(model)
    assert sorted(s["name"] for s in stats) == sorted(names)                  # every wrapped layer, once
    for s in stats:
        layer = model.get_submodule(s["name"])
        W = layer.base.weight.detach().reshape(len(layer.lora_B), -1)           # (out, in*k*k)
        dW = 0.5 * (4.0 / 2) * layer.lora_B.detach() @ layer.lora_A.detach()    # scale * alpha / r * B A
        assert abs(s["rel_norm"] - (dW.norm() / W.norm()).item()) < 1e-6 * s["rel_norm"] + 1e-9
        sv, expected = torch.tensor(s["singular_values"]), torch.linalg.svdvals(dW)
        assert_close(sv, expected, atol=1e-5 * expected[0].item(), msg=s["name"])
        assert sv[1] > 1e-3 * sv[0] and (sv[2:] <= 1e-5 * sv[0]).all()          # rank 2: nothing beyond r
    for layer in lora.lora_layers(model):                       # merged: the same update, W without it
        layer.merge()
    for merged, s in zip(lora.update_stats(model), stats):
        assert abs(merged["rel_norm"] - s["rel_norm"]) < 1e-4 * s["rel_norm"]


def test_update_figure_is_a_real_png(tmp_path):
    import numpy as np
    from PIL import Image
    model, _ = known_update_model()
    path = str(tmp_path / "update.png")
    visualize.save_update_figure(lora.update_stats(model), path)
    assert os.path.getsize(path) > 10_000 and os.listdir(tmp_path) == ["update.png"]   # no temp file left
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 200
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20                # bars, heat map, text
    with pytest.raises(lora.LoraError, match="no LoRA layers"):
        visualize.save_update_figure([], path)


def test_composing_two_adapters_adds_their_deltas(tmp_path):
    torch.manual_seed(0)
    base = UNet(TINY).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    fp = adapters.base_fingerprint(base)
    deltas = {}
    for i, seed in enumerate((1, 2)):
        m = UNet(TINY).eval()
        m.load_state_dict(base_sd)
        lora.inject_lora(m, "attn", 4, 8.0)
        randomize_B(m, seed)
        deltas[i] = {n: l.delta_weight(1.0) for n, l in m.named_modules() if isinstance(l, lora.LoraLayer)}
        _save(m, tmp_path / f"{i}.safetensors", fp)
    composed = UNet(TINY).eval()
    composed.load_state_dict(base_sd)
    adapters.apply_adapters(composed, [str(tmp_path / "0.safetensors"), str(tmp_path / "1.safetensors")],
                        [0.5, 1.0], asdict(TINY))
    sd = composed.state_dict()
    for n in deltas[0]:
        expected = base_sd[n + ".weight"] + 0.5 * deltas[0][n] + deltas[1][n]
        assert_close(sd[n + ".weight"], expected, atol=1e-6, msg=n)


def test_side_by_side_draws_every_panel_from_the_same_noise_at_its_own_strength(tmp_path):
    """lora_finetune's comparison figures: each panel samples digits 0..9 (n each) from a
    generator seeded alike, at the LoRA scale of its column; the model is left at scale 1."""
    torch.manual_seed(0)
    model = UNet(TINY)
    lora.inject_lora(model, "qkv", 2, 2.0)
    seen = []

    class Recorder:
        def sample(self, m, y, generator=None):
            seen.append((lora.lora_layers(m)[0].scale, y.tolist(), torch.randn(4, generator=generator).tolist()))
            return torch.zeros(len(y), 1, 28, 28)
    path = str(tmp_path / "sweep.png")
    visualize.side_by_side([model] * 3, ["a", "b", "c"], Recorder(), path, n=2, seed=5, scales=[0.0, 0.5, 2.0])
    noise = torch.randn(4, generator=torch.Generator().manual_seed(5)).tolist()     # a fresh generator per panel
    assert seen == [(s, [d for d in range(10) for _ in range(2)], noise) for s in (0.0, 0.5, 2.0)]
    assert all(layer.scale == 1.0 for layer in lora.lora_layers(model))
    assert os.path.getsize(path) > 1000
