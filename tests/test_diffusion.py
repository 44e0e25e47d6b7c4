"""The process: schedules, the closed-form forward process, samplers, guidance."""
import pytest
import torch
from conftest import TINY, assert_close

import diffusion
from config import DiffusionConfig, SampleConfig
from diffusion import Diffusion, cosine_betas, linear_betas
from unet import UNet


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule):
    d = Diffusion(DiffusionConfig(schedule=schedule))
    a = d.alphas_cumprod
    assert a.dtype == torch.float32 and len(a) == 1000
    assert (a > 0).all() and (a < 1).all() and (a[1:] < a[:-1]).all()
    assert a[-1] < 0.01 and a[0] > 0.99     # ends near pure noise, starts near the data


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("T", [2, 10, 20, 50])
def test_short_schedules_stay_a_diffusion(schedule, T):
    """Every T the config allows: betas in (0, 1), alpha_bar strictly decreasing and > 0, so the
    SNR, the posterior and the Min-SNR weight stay finite (the linear schedule's betas, scaled by
    1000 / T, would pass 1 below T = 20 and make alpha_bar negative)."""
    d = Diffusion(DiffusionConfig(schedule=schedule, timesteps=T))
    assert (d.betas > 0).all() and (d.betas < 1).all()
    a = d.alphas_cumprod
    assert (a > 0).all() and (a < 1).all() and (a[1:] < a[:-1]).all()
    for name in ("snr", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "sqrt_one_minus_alphas_cumprod"):
        assert torch.isfinite(getattr(d, name)).all(), name


def test_schedules_are_computed_in_float64():
    assert cosine_betas(100).dtype == torch.float64 and linear_betas(100).dtype == torch.float64


def test_q_sample_matches_closed_form():
    d = Diffusion(DiffusionConfig(timesteps=100))
    x0, noise, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.tensor([0, 50, 99])
    abar = torch.cumprod(1 - cosine_betas(100), 0)[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    assert_close(d.q_sample(x0, t, noise).double(), expected, atol=1e-5)


def test_q_sample_statistics():
    """x_t has mean sqrt(abar) x0 and variance 1 - abar, per the forward process."""
    d = Diffusion(DiffusionConfig(timesteps=100))
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 60)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    abar = d.alphas_cumprod[60]
    assert abs(xt.mean() - 0.5 * abar.sqrt()) < 0.02 and abs(xt.var() - (1 - abar)) < 0.03


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_perfect_model_recovers_x0(prediction):
    """Fed the true eps (or v), predict_eps_x0 returns the true x_0: the algebra is right."""
    d = Diffusion(DiffusionConfig(timesteps=100, prediction=prediction))
    x0, noise, t = torch.rand(2, 1, 28, 28) * 1.8 - 0.9, torch.randn(2, 1, 28, 28), 40
    xt = d.q_sample(x0, torch.tensor([t, t]), noise)
    a, s = d.sqrt_alphas_cumprod[t], d.sqrt_one_minus_alphas_cumprod[t]
    target = noise if prediction == "eps" else a * noise - s * x0
    oracle = lambda x, tt, y: target
    eps, x0_hat = d.predict_eps_x0(oracle, xt, t, torch.tensor([1, 2]), SampleConfig(guidance=1.0))
    assert_close(x0_hat, x0, atol=1e-4)
    assert_close(eps, noise, atol=1e-3)


def test_guidance_combines_cond_and_uncond_in_one_batch():
    d = Diffusion(DiffusionConfig(timesteps=10), num_classes=10)
    calls = []

    def model(x, t, y):
        calls.append(len(y))
        return torch.where((y == 10).view(-1, 1, 1, 1), 1.0, 3.0).expand_as(x).clone()
    out = d.predict_eps_x0(model, torch.zeros(2, 1, 4, 4), 5, torch.tensor([1, 2]), SampleConfig(guidance=2.5))[0]
    # eps_uncond + w (eps_cond - eps_uncond) = 1 + 2.5 * 2 = 6 before the x_0 clamp re-derives eps
    assert calls == [4]
    a, s = d.sqrt_alphas_cumprod[5], d.sqrt_one_minus_alphas_cumprod[5]
    x0 = ((0 - s * 6.0) / a).clamp(-1, 1)
    assert_close(out, torch.full_like(out, float((0 - a * x0) / s)), atol=1e-5)


def test_cpu_chunks_give_the_same_numbers():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    d = Diffusion(DiffusionConfig(timesteps=50), num_classes=10)
    n = diffusion.CPU_CHUNK + 37                          # the guided batch is 2n: three chunks
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    calls = []

    def counted(*args):
        calls.append(len(args[0]))
        return model(*args)
    with torch.no_grad():
        eps, x0 = d.predict_eps_x0(counted, x, 20, y, SampleConfig(guidance=2.0))
        tt = torch.full((2 * n,), 20)
        out_c, out_u = model(torch.cat([x, x]), tt, torch.cat([y, torch.full_like(y, 10)])).chunk(2)
    assert max(calls) <= diffusion.CPU_CHUNK and sum(calls) == 2 * n
    a, s = d.sqrt_alphas_cumprod[20], d.sqrt_one_minus_alphas_cumprod[20]
    v = out_u + 2.0 * (out_c - out_u)
    assert_close(x0, (a * x - s * v).clamp(-1, 1), atol=1e-4, msg="chunked vs one batch")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_samples(sampler):
    model = UNet(TINY).eval()
    d = Diffusion(DiffusionConfig(timesteps=20))
    y = torch.tensor([0, 5])
    run = lambda seed: d.sample(model, y, SampleConfig(sampler=sampler, steps=5),
                                 generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 1, 28, 28) and a.abs().max() <= 1.0 + 1e-6


def test_trajectory_has_one_frame_per_step():
    d = Diffusion(DiffusionConfig(timesteps=20))
    x, frames = d.sample(UNet(TINY).eval(), torch.tensor([3]), SampleConfig(steps=7), trajectory=True)
    assert len(frames) == 8 and torch.equal(frames[-1], x)


def test_loss_label_dropout_uses_null_label():
    d = Diffusion(DiffusionConfig(timesteps=10, p_uncond=0.5))
    seen = []
    d.loss(lambda x, t, y: (seen.append(y), torch.zeros_like(x))[1], torch.zeros(1000, 1, 2, 2),
           torch.full((1000,), 3))
    frac = (seen[0] == 10).float().mean().item()
    assert 0.4 < frac < 0.6 and set(seen[0].tolist()) == {3, 10}


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_t_power_draws_timesteps_with_density_t_to_the_k_minus_1(k):
    d = Diffusion(DiffusionConfig(timesteps=1000))
    t, _, _ = d.draw(200_000, (1, 1, 1), "cpu", torch.Generator().manual_seed(0), t_power=k)
    assert t.min() >= 0 and t.max() <= 999
    u = (t.double() + 0.5) / 1000
    for q in (0.25, 0.5, 0.75):          # P(t / T < q) = q^k for density ~ t^(k-1)
        assert abs((u < q).double().mean().item() - q ** k) < 0.005
    if k == 1.0:                         # uniform keeps DDPM's exact draw (old runs reproduce)
        same = torch.randint(0, 1000, (200_000,), generator=torch.Generator().manual_seed(0))
        assert torch.equal(t, same)


def test_guidance_interval_guides_only_inside_it():
    """--guide-from/--guide-to: w at the steps with lo <= t/T < hi, one plain pass (w = 1) elsewhere."""
    from config import SampleConfig
    d = Diffusion(DiffusionConfig(timesteps=100))
    passes = []

    def model(x, t, y):
        passes.append((int(t[0]), len(y)))
        return torch.zeros_like(x)
    scfg = SampleConfig(steps=10, guidance=3.0, guide_from=0.3, guide_to=0.7)
    d.sample(model, torch.tensor([1, 2]), scfg, generator=torch.Generator().manual_seed(0))
    assert passes and all((n == 4) == (30 <= t < 70) for t, n in passes)   # 2 labels: guided = 4 images
    assert {n for _, n in passes} == {2, 4}
    assert d.guidance_at(0, SampleConfig(guidance=3.0)) == d.guidance_at(99, SampleConfig(guidance=3.0)) == 3.0


def test_guidance_interval_outside_every_step_is_the_plain_model():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    d = Diffusion(DiffusionConfig(timesteps=20))
    y = torch.tensor([3, 8])
    run = lambda w, lo: d.sample(model, y, SampleConfig(steps=4, guidance=w, guide_from=lo),
                                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(run(5.0, 0.96), run(1.0, 0.0))    # ddim 4 of T 20 visits t = 19, 13, 6, 0
    assert not torch.equal(run(5.0, 0.9), run(1.0, 0.0))


@pytest.mark.parametrize("lo, hi", [(0.5, 0.5), (0.7, 0.2), (-0.1, 0.5), (0.2, 1.5), (float("nan"), 1.0)])
def test_bad_guidance_interval_refused(lo, hi):
    from config import SampleConfig
    with pytest.raises(ValueError, match="guidance interval|guide_from .*finite"):
        SampleConfig(guide_from=lo, guide_to=hi)


def test_guidance_rescale_matches_the_conditional_spread():
    """phi = 1: the guided output has the conditional output's per-image std; phi = 0: plain CFG;
    in between: the straight mix of the two (Lin et al. 2024, Alg. 2)."""
    d = Diffusion(DiffusionConfig(timesteps=100))
    torch.manual_seed(0)
    cond, uncond = 0.1 * torch.randn(2, 1, 6, 6), 0.05 * torch.randn(2, 1, 6, 6)

    def model(x, t, y):
        return torch.where((y == 10).view(-1, 1, 1, 1), uncond.repeat(2, 1, 1, 1)[:len(y)], cond.repeat(2, 1, 1, 1)[:len(y)])
    x_t, y, t = torch.zeros(2, 1, 6, 6), torch.tensor([4, 7]), 99    # at t = T - 1, x0 = -s v: v read back exactly
    s = d.sqrt_one_minus_alphas_cumprod[t]
    v_of = lambda phi: -d.predict_eps_x0(model, x_t, t, y, SampleConfig(guidance=3.0, guidance_rescale=phi))[1] / s
    plain = uncond + 3.0 * (cond - uncond)
    assert plain.abs().max() * s < 1      # stays inside the x_0 clamp
    assert_close(v_of(0.0), plain, atol=1e-5)
    full = v_of(1.0)
    assert_close(full.std((1, 2, 3)), cond.std((1, 2, 3)), atol=1e-5)
    assert_close(full, plain * cond.std((1, 2, 3), keepdim=True) / plain.std((1, 2, 3), keepdim=True), atol=1e-5)
    assert_close(v_of(0.7), 0.7 * full + 0.3 * plain, atol=1e-5)


def test_sampling_without_a_guidance_uses_the_models_sample_guidance():
    """Diffusion.sample without a SampleConfig is DDIM 50 at the DiffusionConfig's sample_guidance, exactly."""
    d = Diffusion(DiffusionConfig(timesteps=100, sample_guidance=1.5), num_classes=10)
    y = torch.tensor([1, 7])
    model = lambda x, t, y: 0.1 * x + 0.01 * y.view(-1, 1, 1, 1).float()     # the label (or null 10) matters
    run = lambda *scfg: d.sample(model, y, *scfg, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run(), run(SampleConfig(guidance=1.5))) and not torch.equal(run(), run(SampleConfig()))
    assert not torch.equal(run(), run(SampleConfig(guidance=1.5, steps=49)))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_draw_drops_labels_with_probability_p_uncond(p):
    """Classifier-free guidance learns the unconditional model from the labels dropped here: a
    share p_uncond of them, independent of t; the noise is standard normal."""
    d = Diffusion(DiffusionConfig(timesteps=100, p_uncond=p, sample_guidance=2.0 if p else 1.0))
    t, noise, drop = d.draw(100_000, (1, 2, 2), "cpu", torch.Generator().manual_seed(0))
    assert abs(drop.double().mean().item() - p) < 0.005
    if 0 < p:
        assert abs(t[drop].double().mean().item() - t[~drop].double().mean().item()) < 1.5
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert t.min() == 0 and t.max() == 99
