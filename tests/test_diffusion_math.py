"""The diffusion maths, stated directly: schedules and posterior in closed form, the training
target and Min-SNR weights, guidance, and every sampler frame against an oracle denoiser.

The reference numbers are computed here in float64 from the formulas, not read back from
diffusion.py, so a wrong coefficient there cannot agree with itself. The oracle denoiser
knows x_0 and returns the exact eps (or v) for whatever x_t it is given; with it, DDIM
(eta = 0) must land on sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at every step, and DDPM frames
must have the mean and variance of the exact recursion. x_0 stays in [-0.6, 0.6], away from
the [-1, 1] clamp, so a wrong formula cannot hide behind saturation.
"""
import math

import numpy as np
import pytest
import torch
from conftest import assert_close

from config import DiffusionConfig, SampleConfig
from diffusion import Diffusion

T = 50
NULL = 10


def ref_schedule(T, schedule):
    """float64 numpy betas and alpha_bar, straight from Ho et al. / Nichol & Dhariwal."""
    if schedule == "cosine":
        s = 0.008
        f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    else:
        betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return betas, np.cumprod(1 - betas)


def ref_posterior(T, schedule):
    """q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, var), Eq. 7 of DDPM, in float64."""
    betas, abar = ref_schedule(T, schedule)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    c2 = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
    var = betas * (1 - abar_prev) / (1 - abar)
    return c1, c2, var


def rel_close(actual, expected, rtol, msg=""):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    err = np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-12)
    i = int(err.argmax())
    assert err[i] <= rtol, f"{msg}: relative error {err[i]:.3g} > {rtol} at index {i} ({actual.flat[i]} vs {expected.flat[i]})"


def buf(d, name):
    return getattr(d, name).double().numpy()


def make_x0(shape, seed=0):
    """Fixed 'images' with values in [-0.6, 0.6]: well inside the x_0 clamp."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 1.2 - 0.6)


class Oracle:
    """A denoiser that knows x_0 (float64, broadcast over the batch) and the true schedule:
    returns the exact eps = (x_t - a x_0) / s, or v = a eps - s x_0 = (a x_t - x_0) / s.

    Under guidance w it adds offsets to the conditional and unconditional outputs such that
    the guided combination uncond + w (cond - uncond) is exactly the target (at w = 1 the
    conditional output is exact and the unconditional one is off by delta); any other
    combination is off by a multiple of delta. Records the timesteps it is called at."""

    def __init__(self, x0, prediction, schedule="cosine", w=1.0, delta=0.0):
        self.x0, self.prediction = x0, prediction
        if w == 0:
            self.off_cond, self.off_uncond = delta, 0.0
        else:
            self.off_cond, self.off_uncond = delta * (1 - 1 / w), delta
        _, self.abar = ref_schedule(T, schedule)
        self.calls = []

    def __call__(self, x_t, t, y):
        assert (t == t[0]).all()
        self.calls.append(int(t[0]))
        a, s = math.sqrt(self.abar[int(t[0])]), math.sqrt(1 - self.abar[int(t[0])])
        x_t = x_t.double()
        target = (x_t - a * self.x0) / s if self.prediction == "eps" else (a * x_t - self.x0) / s
        null = (y == NULL).view(-1, *[1] * (x_t.ndim - 1))
        return (target + torch.where(null, self.off_uncond, self.off_cond)).float()


# ----- schedules and posterior -----

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_schedule_buffers_equal_the_closed_form(schedule, timesteps):
    d = Diffusion(DiffusionConfig(timesteps=timesteps, schedule=schedule))
    betas, abar = ref_schedule(timesteps, schedule)
    c1, c2, var = ref_posterior(timesteps, schedule)
    rtol = 2e-6
    rel_close(buf(d, "betas"), betas, rtol, "betas")
    rel_close(buf(d, "alphas_cumprod"), abar, rtol, "alphas_cumprod")
    rel_close(buf(d, "sqrt_alphas_cumprod"), np.sqrt(abar), rtol, "sqrt(alpha_bar)")
    rel_close(buf(d, "sqrt_one_minus_alphas_cumprod"), np.sqrt(1 - abar), rtol, "sqrt(1 - alpha_bar)")
    rel_close(buf(d, "snr"), abar / (1 - abar), rtol, "snr")
    rel_close(buf(d, "posterior_mean_coef1"), c1, rtol, "posterior_mean_coef1")
    rel_close(buf(d, "posterior_mean_coef2"), c2, rtol, "posterior_mean_coef2")
    rel_close(buf(d, "posterior_variance")[1:], var[1:], rtol, "posterior_variance")
    assert buf(d, "posterior_variance")[0] == 0.0           # beta~_0 = 0: the last step is x_0 itself
    log_clipped = np.log(np.concatenate([var[1:2], var[1:]]))
    assert_close(torch.from_numpy(buf(d, "posterior_log_variance_clipped")), torch.from_numpy(log_clipped),
                 atol=1e-5, msg="log(beta~_t), t = 0 clipped to t = 1")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_posterior_is_consistent_with_the_marginals(schedule):
    """Derivation-free check: if x_t ~ N(sqrt(abar_t) x_0, 1 - abar_t), then one posterior step
    gives x_{t-1} ~ N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}): c1 + c2 sqrt(abar_t) = sqrt(abar_{t-1})
    and c2^2 (1 - abar_t) + var = 1 - abar_{t-1}, for the buffers diffusion.py holds."""
    d = Diffusion(DiffusionConfig(timesteps=T, schedule=schedule))
    abar = buf(d, "alphas_cumprod")
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    c1, c2, var = buf(d, "posterior_mean_coef1"), buf(d, "posterior_mean_coef2"), buf(d, "posterior_variance")
    assert np.abs(c1 + c2 * np.sqrt(abar) - np.sqrt(abar_prev)).max() < 1e-5
    assert np.abs(c2 ** 2 * (1 - abar) + var - (1 - abar_prev)).max() < 1e-5


# ----- forward process, training target, loss weights -----

def fixed_batch(prediction, schedule="cosine", B=6, seed=0):
    x0 = make_x0((B, 1, 5, 5), seed).float()
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(B, 1, 5, 5, generator=g)
    t = torch.tensor([0, 3, 12, 25, 37, 49])[:B]            # snr from ~1e4 down to ~1e-5
    _, abar = ref_schedule(T, schedule)
    a = torch.from_numpy(np.sqrt(abar)[t.numpy()]).view(-1, 1, 1, 1)
    s = torch.from_numpy(np.sqrt(1 - abar)[t.numpy()]).view(-1, 1, 1, 1)
    x_t = a * x0.double() + s * noise.double()
    target = noise.double() if prediction == "eps" else a * noise.double() - s * x0.double()
    snr = torch.from_numpy(abar[t.numpy()] / (1 - abar[t.numpy()]))
    return x0, noise, t, x_t, target, snr


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_exact_target_gives_zero_loss(prediction, gamma):
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction, min_snr_gamma=gamma))
    x0, noise, t, x_t, target, _ = fixed_batch(prediction)
    seen = {}

    def model(x, tt, y):
        seen.update(x=x, t=tt, y=y)
        return target.float()
    drop = torch.tensor([True, False, False, True, False, False])
    loss = d.loss(model, x0, torch.arange(6), randomness=(t, noise, drop)).item()
    assert_close(seen["x"].double(), x_t, atol=2e-6, msg="x_t given to the model vs the closed form")
    assert torch.equal(seen["t"], t)
    assert seen["y"].tolist() == [NULL, 1, 2, NULL, 4, 5]         # dropped labels become the null label
    assert 0 <= loss < 1e-11, f"the exact {prediction} target gives loss {loss}"


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_equals_its_formula(prediction, gamma):
    """Model = target + c_i (one constant per image): MSE_i = c_i^2, and the loss is
    mean_i weight_i c_i^2 with weight 1, or Min-SNR-gamma (Hang et al. 2023):
    min(snr, gamma) / snr for eps, min(snr, gamma) / (snr + 1) for v."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction, min_snr_gamma=gamma))
    x0, noise, t, _, target, snr = fixed_batch(prediction)
    c = torch.tensor([0.3, -0.5, 0.7, 0.2, -0.4, 0.6], dtype=torch.float64)
    model = lambda x, tt, y: (target + c.view(-1, 1, 1, 1)).float()
    loss = d.loss(model, x0, torch.arange(6), randomness=(t, noise, torch.zeros(6, dtype=torch.bool))).item()
    if gamma == 0:
        weight = torch.ones(6, dtype=torch.float64)
    else:
        weight = snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)
    assert 0 < weight.min() < weight.max() <= 1 or gamma == 0        # the weights really differ here
    expected = (weight * c ** 2).mean().item()
    assert abs(loss - expected) <= 1e-5 * expected, f"loss {loss} vs formula {expected}"


def test_q_sample_broadcasts_one_timestep_per_image():
    d = Diffusion(DiffusionConfig(timesteps=T))
    x0, noise, t, x_t, _, _ = fixed_batch("eps")
    assert_close(d.q_sample(x0, t, noise).double(), x_t, atol=2e-6)


# ----- predict_eps_x0 and guidance -----

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("w", [1.0, 3.0, 0.0])
@pytest.mark.parametrize("t", [1, 10, 25, 40])
def test_predict_eps_x0_round_trip_with_guidance(prediction, w, t):
    """Oracle outputs whose guided combination uncond + w (cond - uncond) is the exact target:
    predict_eps_x0 must give back (eps, x_0) exactly. delta is big enough that any other
    combination (swapped, w - 1, no guidance) is visibly off, small enough never to clamp."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction))
    x0 = make_x0((1, 3, 3))                                   # one x_0, broadcast over the batch
    noise = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, abar = ref_schedule(T, "cosine")
    x_t = (math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * noise).float()
    delta = 0.05 * math.sqrt(abar[t])                          # moves x_0 by <= 0.05 (eps) or 0.05 s (v)
    oracle = Oracle(x0, prediction, w=w, delta=delta)
    eps, x0_hat = d.predict_eps_x0(oracle, x_t, t, torch.tensor([1, 2, 3, 4]), SampleConfig(guidance=w))
    assert oracle.calls == [t]                                 # one network call (cond + uncond batched)
    assert_close(x0_hat.double(), x0.expand_as(x0_hat), atol=2e-5, msg="x_0")
    # eps is recomputed from the true x_t; compare with the eps that x_t really carries
    eps_true = (x_t.double() - math.sqrt(abar[t]) * x0) / math.sqrt(1 - abar[t])
    assert_close(eps.double(), eps_true, atol=2e-5, msg="eps")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_guidance_formula_on_arbitrary_outputs(prediction):
    """cond and uncond outputs that have nothing to do with each other: x_0 follows from
    out = uncond + w (cond - uncond) by the prediction's algebra (checked to stay unclamped)."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction))
    t, w = 20, 2.5
    _, abar = ref_schedule(T, "cosine")
    a, s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
    g = torch.Generator().manual_seed(5)
    x_t = torch.rand(3, 1, 4, 4, generator=g) * 0.8 - 0.4
    cond, uncond = torch.rand(2, 3, 1, 4, 4, generator=g) * 0.2 - 0.1
    model = lambda x, tt, y: torch.where((y == NULL).view(-1, 1, 1, 1), uncond.repeat(2, 1, 1, 1)[:len(y)],
                                         cond.repeat(2, 1, 1, 1)[:len(y)])
    out = uncond.double() + w * (cond.double() - uncond.double())
    if prediction == "eps":
        x0 = (x_t.double() - s * out) / a
    else:
        x0 = a * x_t.double() - s * out
    assert x0.abs().max() < 0.9, "test set-up: x_0 must stay clear of the clamp"
    eps_hat, x0_hat = d.predict_eps_x0(model, x_t, t, torch.tensor([0, 4, 9]), SampleConfig(guidance=w))
    assert_close(x0_hat.double(), x0, atol=2e-5, msg="x_0 from the guided output")
    assert_close(eps_hat.double(), (x_t.double() - a * x0) / s, atol=2e-5, msg="eps consistent with x_0")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_clamped_x0_keeps_eps_consistent(prediction):
    """When the prediction leaves [-1, 1], x_0 is clamped and eps re-derived from it."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction))
    t = 30
    a, s = d.sqrt_alphas_cumprod[t], d.sqrt_one_minus_alphas_cumprod[t]
    x_t = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    raw = torch.linspace(-2, 2, 16).flip(0).view(1, 1, 4, 4)          # the unclamped x_0 wanted
    out = (x_t - a * raw) / s if prediction == "eps" else (a * x_t - raw) / s
    eps, x0 = d.predict_eps_x0(lambda x, tt, y: out, x_t, t, torch.tensor([2]), SampleConfig(guidance=1.0))
    assert_close(x0, raw.clamp(-1, 1), atol=1e-5)
    assert_close(eps, (x_t - a * x0) / s, atol=1e-5)


# ----- samplers against the oracle -----

def ddim_steps(steps):
    """DDIM's timesteps: `steps` evenly spaced from T - 1 down to 0, rounded (no ties here)."""
    raw = np.linspace(T - 1, 0, steps)
    assert np.abs(raw - np.floor(raw) - 0.5).min() > 0.01, "pick steps without rounding ties"
    return np.round(raw).astype(int).tolist()


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps,w", [(6, 1.0), (8, 1.0), (50, 1.0), (6, 3.0)])
def test_ddim_frames_follow_the_closed_form(prediction, schedule, steps, w):
    """eta = 0 and an exact denoiser: every frame is x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    at the t of the step list, with the same eps all the way (the one x_T carries), and the
    last frame is x_0."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction, schedule=schedule))
    x0 = make_x0((1, 3, 3))
    oracle = Oracle(x0, prediction, schedule, w=w, delta=0.02)
    y = torch.tensor([1, 5, 7])
    x, frames = d.sample(oracle, y, SampleConfig(sampler="ddim", steps=steps, guidance=w, eta=0.0),
                         generator=torch.Generator().manual_seed(0), trajectory=True, image_shape=(1, 3, 3))
    ts = ddim_steps(steps)
    assert oracle.calls == ts, "the network is called at the step list's timesteps, in order"
    assert len(frames) == steps + 1 and torch.equal(frames[-1], x)
    _, abar = ref_schedule(T, schedule)
    # float32 rounding: eps-prediction recovers x_0 = (x_t - s eps) / a, which divides the
    # rounding of x_t (~1e-7) by a = sqrt(abar_t), ~2e-3 at t = T - 1 of the cosine schedule
    fp = lambda t: 2e-5 + (3e-6 / math.sqrt(abar[t]) if prediction == "eps" else 0.0)
    x_T = frames[0].double()
    eps = (x_T - math.sqrt(abar[ts[0]]) * x0) / math.sqrt(1 - abar[ts[0]])
    for i in range(1, steps):
        t, t_prev = ts[i], ts[i - 1]
        expected = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
        assert_close(frames[i].double(), expected, atol=4 * fp(ts[0]), msg=f"frame {i} (t = {t})")
        # and one step from the previous frame, to float32 precision
        eps_i = (frames[i - 1].double() - math.sqrt(abar[t_prev]) * x0) / math.sqrt(1 - abar[t_prev])
        assert_close(frames[i].double(), math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps_i,
                     atol=fp(t_prev), msg=f"step into frame {i} (t = {t_prev} -> {t})")
    assert_close(x.double(), x0.expand_as(x), atol=2e-5, msg="final frame is x_0")


def moment_check(frames, x0, means, variances, what):
    """Per frame, with B images of P pixels (all independent given x_0), tolerances of 5
    standard errors: the mean residual (a constant offset), its slope along x_0 (a wrong
    coefficient of x_0), and the pooled variance (Gaussian: relative sd sqrt(2 / (B P)))."""
    x0 = x0.flatten()
    for i, (f, m, v) in enumerate(zip(frames, means, variances)):
        f = f.double()
        B = f.shape[0]
        resid = (f - m).flatten(1)                                # (B, P), mean 0, variance v
        e = resid.mean(dim=0)                                    # (P,): each ~ N(0, v / B)
        P = e.numel()
        offset, sd_offset = e.mean().item(), math.sqrt(v / (B * P))
        slope, sd_slope = (e @ x0 / (x0 @ x0)).item(), math.sqrt(v / (B * (x0 @ x0).item()))
        assert abs(offset) <= 5 * sd_offset, f"{what} frame {i}: mean offset {offset:.3g} (sd {sd_offset:.3g})"
        assert abs(slope) <= 5 * sd_slope, f"{what} frame {i}: mean off by {slope:.3g} x_0 (sd {sd_slope:.3g})"
        var_hat = resid.square().mean().item()
        tol_var = 5 * v * math.sqrt(2 / (B * P))
        assert abs(var_hat - v) <= tol_var, \
            f"{what} frame {i}: variance {var_hat:.5g} vs {v:.5g} (tolerance {tol_var:.3g})"


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_frames_have_the_closed_form_mean_and_variance(prediction):
    """Ancestral sampling with an exact denoiser: x_{t-1} = c1_t x_0 + c2_t x_t + sqrt(var_t) z
    (no noise at t = 0). From x_T ~ N(0, I) the mean and variance of every frame follow the
    float64 recursion m <- c1 x_0 + c2 m, v <- c2^2 v + var; the last frame is x_0 exactly."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction=prediction))
    x0 = make_x0((1, 32, 32))                                      # 1024 pixels per image
    B = 100                                                      # one network call per step
    x, frames = d.sample(Oracle(x0, prediction), torch.zeros(B, dtype=torch.long), SampleConfig(sampler="ddpm",
                         guidance=1.0), generator=torch.Generator().manual_seed(0), trajectory=True,
                         image_shape=(1, 32, 32))
    c1, c2, var = ref_posterior(T, "cosine")
    m, v = torch.zeros_like(x0), 1.0
    means, variances = [m], [v]
    for t in range(T - 1, -1, -1):
        m = c1[t] * x0 + c2[t] * m
        v = c2[t] ** 2 * v + (var[t] if t > 0 else 0.0)
        means.append(m)
        variances.append(v)
    assert len(frames) == T + 1
    moment_check(frames[:-1], x0, means[:-1], variances[:-1], "ddpm")
    assert_close(x.double(), x0.expand_as(x), atol=2e-5, msg="final frame is x_0")


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_with_eta_frames_have_the_closed_form_mean_and_variance(eta):
    """DDIM with eta > 0: x_prev = sqrt(ap) x_0 + sqrt(1 - ap - sigma^2) eps + sigma z with
    sigma^2 = eta^2 (1 - ap) / (1 - a) (1 - a / ap) (Song et al. 2021, Eq. 16)."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction="v"))
    x0 = make_x0((1, 32, 32))
    steps, B = 8, 100
    ts = ddim_steps(steps)
    x, frames = d.sample(Oracle(x0, "v"), torch.zeros(B, dtype=torch.long), SampleConfig(sampler="ddim", steps=steps,
                         guidance=1.0, eta=eta), generator=torch.Generator().manual_seed(1), trajectory=True,
                         image_shape=(1, 32, 32))
    _, abar = ref_schedule(T, "cosine")
    m, v = torch.zeros_like(x0), 1.0
    means, variances = [m], [v]
    for i, t in enumerate(ts):
        a = abar[t]
        ap = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        sigma2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
        k = math.sqrt(max(1 - ap - sigma2, 0.0)) / math.sqrt(1 - a)       # the weight of x_t via eps
        m = math.sqrt(ap) * x0 + k * (m - math.sqrt(a) * x0)
        v = k ** 2 * v + sigma2
        means.append(m)
        variances.append(v)
    moment_check(frames[:-1], x0, means[:-1], variances[:-1], f"ddim eta={eta}")
    assert_close(x.double(), x0.expand_as(x), atol=2e-5, msg="final frame is x_0")


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_adds_exactly_sigma_of_fresh_noise_per_step(eta):
    """The marginals of DDIM do not depend on eta (that is its point), so the frames' moments
    cannot tell eta from eta^2. The step itself can: given x_t, x_prev - sqrt(ap) x_0 - k (x_t -
    sqrt(a) x_0) is the fresh noise sigma z, with sigma^2 = eta^2 (1 - ap) / (1 - a) (1 - a / ap)."""
    d = Diffusion(DiffusionConfig(timesteps=T, prediction="v"))
    x0 = make_x0((1, 32, 32)).double()
    steps, B = 8, 100
    ts = ddim_steps(steps)
    _, frames = d.sample(Oracle(x0.float(), "v"), torch.zeros(B, dtype=torch.long), SampleConfig(sampler="ddim", steps=steps,
                         guidance=1.0, eta=eta), generator=torch.Generator().manual_seed(2), trajectory=True,
                         image_shape=(1, 32, 32))
    _, abar = ref_schedule(T, "cosine")
    for i, t in enumerate(ts[:-1]):
        a, ap = abar[t], abar[ts[i + 1]]
        sigma2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
        k = math.sqrt(1 - ap - sigma2) / math.sqrt(1 - a)
        fresh = frames[i + 1].double() - math.sqrt(ap) * x0 - k * (frames[i].double() - math.sqrt(a) * x0)
        n = fresh.numel()
        assert abs(fresh.mean().item()) < 5 * math.sqrt(sigma2 / n), (i, fresh.mean().item())
        assert abs(fresh.var().item() / sigma2 - 1) < 5 * math.sqrt(2 / n) + 1e-3, (i, fresh.var().item(), sigma2)
