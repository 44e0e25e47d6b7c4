"""Golden regression: fixed seeds, the tiny model (TINY, T = 50), and a few stored numbers of
the network's output, the training loss, DDIM / DDPM samples and a LoRA-wrapped forward.

Any change of a formula -- in the network, the schedule, the loss, the samplers, LoRA --
moves these numbers by far more than the tolerance (1e-5, enough for another CPU's
rounding), so it fails here even where no other test states that formula.

If a change is intended, regenerate the numbers with

    python tests/test_golden.py --regenerate

and say in the commit why they moved.
"""
import json
import os
import sys

import pytest
import torch
from conftest import TINY

import lora
from config import DiffusionConfig, SampleConfig
from diffusion import Diffusion
from unet import UNet

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
ATOL = 1e-5


def picks(x):
    """A 4 x 4 grid of values per image plus two whole-tensor statistics: (mean, mean square)."""
    x = x.detach().double()
    return {"grid": x[:, 0, 3::7, 3::7].flatten().tolist(),
            "mean": x.mean().item(), "mean_square": x.square().mean().item()}


def model_and_inputs():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    with torch.no_grad():
        model.conv_out.weight.mul_(0.5)       # moderate outputs: the samplers' x_0 clamp stays unsaturated
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 28, 28, generator=g)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = lambda cy, cx: torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30)
    x0 = torch.stack([blob(10, 14), blob(17, 12)])[:, None] * 1.4 - 0.7      # smooth, in [-0.7, 0.7]
    return model, x, x0


def steered(model, d, x0):
    """The network plus the exact v of a fixed smooth image x_0: samples land near x_0 (away
    from the clamp) and every step still runs the network, whose output shifts them."""
    def denoiser(x, t, y):
        a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return model(x, t, y) + (a * x - x0[:1]) / s                    # v = (a x_t - x_0) / s
    return denoiser


@torch.no_grad()
def compute():
    torch.set_num_threads(1)                  # the same summation order everywhere
    model, x, x0 = model_and_inputs()
    out = {}
    out["unet"] = picks(model(x, torch.tensor([3, 41]), torch.tensor([4, 10])))
    for prediction, gamma in (("eps", 0.0), ("v", 5.0)):
        d = Diffusion(DiffusionConfig(timesteps=50, prediction=prediction, min_snr_gamma=gamma, p_uncond=0.5))
        randomness = d.draw(2, x0.shape[1:], "cpu", torch.Generator().manual_seed(2))
        out[f"loss_{prediction}"] = d.loss(model, x0, torch.tensor([1, 7]), randomness).item()
    d = Diffusion(DiffusionConfig(timesteps=50))
    y = torch.tensor([2, 8])
    for name, kw in (("ddim", dict(sampler="ddim", steps=5, guidance=2.0)),
                     ("ddim_eta", dict(sampler="ddim", steps=5, guidance=1.5, eta=1.0)),
                     ("ddpm", dict(sampler="ddpm", guidance=1.0))):
        x_s = d.sample(steered(model, d, x0), y, SampleConfig(**kw), generator=torch.Generator().manual_seed(3))
        out[name] = picks(x_s)
        out[name]["saturated"] = (x_s.abs() > 0.999).float().mean().item()
    lora.inject_lora(model, [r"\.attn\.to_(q|k|v|out)$", r"\.conv(1|2)$"], r=2, alpha=4.0)
    g = torch.Generator().manual_seed(4)
    for layer in lora.lora_layers(model):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    lora.set_scale(model, 0.5)
    out["lora"] = picks(model(x, torch.tensor([3, 41]), torch.tensor([4, 10])))
    return out


def flatten(d, prefix=""):
    items = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            items.update(flatten(v, key + "."))
        elif isinstance(v, list):
            items.update({f"{key}[{i}]": x for i, x in enumerate(v)})
        else:
            items[key] = v
    return items


@pytest.fixture(scope="module")
def computed():
    n = torch.get_num_threads()
    try:
        return compute()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("part", ["unet", "loss_eps", "loss_v", "ddim", "ddim_eta", "ddpm", "lora"])
def test_matches_golden(computed, part):
    assert os.path.isfile(GOLDEN), f"{GOLDEN} missing: run `python tests/test_golden.py --regenerate`"
    golden = flatten({part: json.load(open(GOLDEN))[part]})
    got = flatten({part: computed[part]})
    assert got.keys() == golden.keys()
    bad = {k: (got[k], golden[k]) for k in golden if abs(got[k] - golden[k]) > ATOL}
    assert not bad, (f"{len(bad)} of {len(golden)} numbers moved (got, stored): "
                     f"{dict(list(bad.items())[:6])}; if intended: python tests/test_golden.py --regenerate")


def test_golden_numbers_are_informative():
    """Samples away from the clamp, losses away from zero: the stored numbers can move."""
    golden = json.load(open(GOLDEN))
    for name in ("ddim", "ddim_eta", "ddpm"):
        assert golden[name]["saturated"] < 0.01, f"{name}: too many pixels at the clamp"
    assert golden["loss_eps"] > 0.01 and golden["loss_v"] > 0.01


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_golden.py --regenerate")
    with open(GOLDEN, "w") as f:
        json.dump(compute(), f, indent=1)
        f.write("\n")
    print(f"wrote {GOLDEN}")
