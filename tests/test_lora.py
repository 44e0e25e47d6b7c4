"""LoRA: exact at init, merge/unmerge identities, only adapters train, adapter files are checked."""
import json
import os
import re
from dataclasses import asdict

import pytest
import torch
from torch import nn

from conftest import TINY, TINY_FLAGS, assert_close, run_script
import lora
from config import DiffusionConfig
from diffusion import Diffusion
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


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Conv2d(4, 6, 3, padding=1)], ids=["linear", "conv"])
def test_one_op_forward_equals_the_classic_low_rank_path(base):
    layer = lora.LoraLayer(base, r=2, alpha=4.0).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.scale = 0.5
    x = torch.randn(3, 6) if isinstance(base, nn.Linear) else torch.randn(3, 4, 7, 7)
    classic = base(x) + layer.low_rank(x) * (2.0 * 0.5)           # x W^T + b + s x A^T B^T
    assert_close(layer(x), classic, atol=1e-5, msg="x (W + s B A)^T + b vs the classic form")
    out = layer(x)
    out.sum().backward()                                          # gradients reach A and B
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_lora_dropout_acts_in_training_only():
    lin = nn.Linear(6, 5)
    layer = lora.LoraLayer(lin, r=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 6)
    full = lin(x) + x @ layer.lora_A.T @ layer.lora_B.T
    torch.manual_seed(0)
    dropped = layer.train()(x)
    assert not torch.allclose(dropped, full, atol=1e-4)           # some inputs to A were dropped
    assert_close(layer.eval()(x), full, atol=1e-5)                # eval: no dropout


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
    d = Diffusion(DiffusionConfig(timesteps=50, p_uncond=0.0))
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


def test_default_lora_set_up_trains_under_3_percent_of_the_default_model():
    from config import LoraConfig, ModelConfig
    model, lc = UNet(ModelConfig()), LoraConfig()
    total = sum(p.numel() for p in model.parameters())
    lora.inject_lora(model, lc.targets, lc.r, lc.alpha)
    lora.mark_only_lora_trainable(model)
    assert 0.01 < lora.count_trainable(model) / total <= 0.03


def test_inject_errors():
    model = UNet(TINY)
    with pytest.raises(lora.LoraError, match="matches no"):
        lora.inject_lora(model, r"\.nonexistent$", 4, 4.0)
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
        counts[preset] = lora.count_trainable(model)
    assert 0 < counts["attn"] < counts["attn+ff"] < counts["all-linear"] < total


def _save(model, path, fingerprint):
    lora.save_adapter(str(path), model, "attn", 4, 8.0, False, asdict(TINY), fingerprint, style="bold")


def test_adapter_round_trip_and_checks(tmp_path):
    torch.manual_seed(0)
    base_sd = UNet(TINY).state_dict()
    model, _ = lora_model()
    fp = lora.base_fingerprint(model)
    randomize_B(model)
    expected = model(*INPUTS)
    _save(model, tmp_path / "a.safetensors", fp)

    fresh = UNet(TINY).eval()
    fresh.load_state_dict(base_sd)
    assert lora.base_fingerprint(fresh) == fp
    lora.load_adapter(fresh, str(tmp_path / "a.safetensors"), asdict(TINY))
    assert torch.equal(fresh(*INPUTS), expected)

    other = UNet(TINY)                                  # same architecture, other weights
    with pytest.raises(lora.LoraError, match="other base weights"):
        lora.load_adapter(other, str(tmp_path / "a.safetensors"), asdict(TINY))
    with pytest.raises(lora.LoraError, match="another model"):
        lora.load_adapter(UNet(TINY), str(tmp_path / "a.safetensors"), {**asdict(TINY), "base_channels": 16})


def test_adapter_with_missing_or_unexpected_keys_fails(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    torch.manual_seed(0)
    base_sd = UNet(TINY).state_dict()
    model, _ = lora_model()
    _save(model, tmp_path / "a.safetensors", lora.base_fingerprint(model))
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
            lora.load_adapter(fresh, path, asdict(TINY))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(100))
    with pytest.raises(lora.LoraError, match="not a readable"):
        lora.load_adapter(UNet(TINY), str(junk), asdict(TINY))


def test_composing_two_adapters_adds_their_deltas(tmp_path):
    torch.manual_seed(0)
    base = UNet(TINY).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    fp = lora.base_fingerprint(base)
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
    lora.apply_adapters(composed, [str(tmp_path / "0.safetensors"), str(tmp_path / "1.safetensors")],
                        [0.5, 1.0], asdict(TINY))
    sd = composed.state_dict()
    for n in deltas[0]:
        expected = base_sd[n + ".weight"] + 0.5 * deltas[0][n] + deltas[1][n]
        assert_close(sd[n + ".weight"], expected, atol=1e-6, msg=n)


def test_lora_finetune_end_to_end(tiny_ckpt, tmp_path):
    out = str(tmp_path / "lora")
    r = run_script("lora_finetune.py", "--checkpoint", tiny_ckpt, "--style", "italic", "--max-steps", "3",
                   "--batch-size", "16", "--eval-n", "0", "--out", out, "--r", "2", "--targets", "attn+conv")
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stdout and "%" in r.stdout
    for f in ("adapter.safetensors", "base_vs_tuned.png", "strength_sweep.png", "loss.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 3 and 0 < summary["trainable"] < summary["total_params"]
    png = str(tmp_path / "s.png")
    r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--lora", os.path.join(out, "adapter.safetensors"),
                   "--lora-scale", "0.5", "--merge", "--steps", "3", "--n", "2", "--out", png)
    assert r.returncode == 0 and os.path.getsize(png) > 0, r.stderr


def test_sample_refuses_adapter_of_another_base(tiny_ckpt, tmp_path):
    other = str(tmp_path / "other")
    assert run_script("train.py", *TINY_FLAGS, "--max-steps", "1", "--seed", "5", "--out", other).returncode == 0
    out = str(tmp_path / "lora")
    assert run_script("lora_finetune.py", "--checkpoint", os.path.join(other, "ckpt.pt"), "--max-steps", "1",
                      "--batch-size", "16", "--eval-n", "0", "--no-figures", "--out", out).returncode == 0
    r = run_script("sample.py", "--checkpoint", tiny_ckpt, "--lora", os.path.join(out, "adapter.safetensors"),
                   "--steps", "2", "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "other base weights" in r.stderr and "Traceback" not in r.stderr
