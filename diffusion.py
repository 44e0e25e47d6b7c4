"""The diffusion process, apart from the network: schedules, q(x_t | x_0), the training
loss, classifier-free guidance, and the DDPM and DDIM samplers.

Any denoiser `model(x_t, t, y)` works; nothing here knows the architecture.
Notation of Ho et al. 2020 (DDPM): betas, alphas_cumprod (alpha_bar_t), posterior q(x_{t-1} | x_t, x_0).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from config import SampleConfig


def linear_betas(T):
    """Ho et al.: betas rising linearly from 1e-4 to 0.02 (scaled to T steps), float64. At
    T <= 20 the scaled betas would reach 1 (alpha_bar 0 or negative): capped at 0.999, as cosine's."""
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T, s=0.008):
    """Nichol & Dhariwal: alpha_bar_t = cos^2(((t/T + s) / (1 + s)) * pi/2), float64."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=0.999)


# Images per network call when sampling on a CPU. Bigger batches fall out of cache there:
# 2.3 ms per image at 100, 2.9 at 200, 3.6 at 400 (default model, 2-core Xeon). GPUs take all.
CPU_CHUNK = 100


def run_in_chunks(model, x, t, y):
    """model(x, t, y), on a CPU in chunks of CPU_CHUNK images (each image is independent)."""
    if x.device.type != "cpu" or len(x) <= CPU_CHUNK:
        return model(x, t, y)
    return torch.cat([model(*c) for c in zip(x.split(CPU_CHUNK), t.split(CPU_CHUNK), y.split(CPU_CHUNK))])


class SamplingError(RuntimeError):
    """Sampling went off the rails (x_t became nan or inf): broken weights or settings, not images."""


def extract(a, t, ndim):
    """Gather a[t] for a batch of timesteps and shape it (B, 1, 1, 1) to broadcast over images."""
    return a[t].view(-1, *([1] * (ndim - 1)))


def classifier_free_guidance(out_cond, out_uncond, w):
    """out = out(no label) + w * (out(y) - out(no label))  (Ho & Salimans 2022).

    w = 1 is the plain conditional model; w > 1 steps further from the unconditional
    prediction, towards what makes the image *this* digit; w = 0 ignores the label."""
    return out_uncond + w * (out_cond - out_uncond)


def rescale_guidance(out, out_cond, phi):
    """Lin et al. 2024 ("Common diffusion noise schedules are flawed", Alg. 2): scale the guided
    output back to the per-image standard deviation of the conditional one, mixed in with
    weight phi in [0, 1]. Guidance beyond w = 1 inflates the output, which draws bolder, more
    saturated strokes than real digits have."""
    dims = tuple(range(1, out.ndim))                                      # (C, H, W) of each image
    rescaled = out * out_cond.std(dims, keepdim=True) / out.std(dims, keepdim=True).clamp_min(1e-8)
    return phi * rescaled + (1 - phi) * out


class Diffusion(nn.Module):
    """Holds the schedule as buffers (so .to(device) moves it) and runs the process."""

    def __init__(self, cfg, num_classes=10):
        super().__init__()
        self.cfg = cfg
        self.T = cfg.timesteps
        self.null_label = num_classes          # index of the "no label" embedding
        betas = cosine_betas(self.T) if cfg.schedule == "cosine" else linear_betas(self.T)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)                       # alpha_bar_t
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)   # alpha_bar_{t-1}
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # beta~_t
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),                      # sqrt(alpha_bar_t)
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),      # sqrt(1 - alpha_bar_t)
            "snr": alphas_cumprod / (1 - alphas_cumprod),                      # alpha_bar / (1 - alpha_bar)
            "posterior_variance": posterior_variance,
            # log(beta~_t), with beta~_0 = 0 replaced by beta~_1 so the log stays finite
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2],
                                                                   posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ----- forward process and training -----

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, the closed form of q(x_t | x_0)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def draw(self, B, shape, device, generator=None, t_power=1.0):
        """The randomness of one training batch: timesteps t, noise eps, which labels to drop.

        t is uniform on 0..T-1 (DDPM), or with t_power k != 1 drawn as T * u^(1/k), u uniform:
        density ~ t^(k-1). k = 2 puts 75% of the samples in the noisier half (t >= T/2), where
        a digit's overall shape -- its slant, say -- is decided; uniform puts 50% there.
        """
        if t_power == 1.0:
            t = torch.randint(0, self.T, (B,), device=device, generator=generator)
        else:
            u = torch.rand(B, device=device, generator=generator)
            t = (self.T * u ** (1.0 / t_power)).long().clamp(max=self.T - 1)
        noise = torch.randn((B, *shape), device=device, generator=generator)
        drop = torch.rand(B, device=device, generator=generator) < self.cfg.p_uncond
        return t, noise, drop

    def loss(self, model, x0, y, randomness=None):
        """Algorithm 1 of DDPM: random t, noise x_0, regress the target with MSE.

        Labels are replaced by the null label with probability p_uncond, so the same
        network also learns the unconditional model that guidance needs. `randomness`
        = (t, noise, drop) from draw(), or None to draw them here.
        """
        t, noise, drop = randomness or self.draw(x0.shape[0], x0.shape[1:], x0.device)
        y = torch.where(drop, torch.full_like(y, self.null_label), y)
        x_t = self.q_sample(x0, t, noise)
        if self.cfg.prediction == "eps":
            target = noise
        else:  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022)
            target = (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                      - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)
        mse = F.mse_loss(model(x_t, t, y), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.cfg.min_snr_gamma > 0:  # Min-SNR-gamma: stop easy, low-noise steps dominating
            snr = self.snr[t]
            weight = snr.clamp(max=self.cfg.min_snr_gamma)
            mse = mse * weight / (snr if self.cfg.prediction == "eps" else snr + 1)
        return mse.mean()

    # ----- the reverse process -----

    def guidance_at(self, t, scfg):
        """The guidance scale w at timestep t: scfg.guidance where guide_from <= t/T < guide_to,
        else 1 (the plain conditional model: one network pass instead of two).

        Kynkaanniemi et al. 2024 ("Applying guidance in a limited interval improves sample
        and distribution quality"): guidance at the noisiest steps mostly pulls every sample
        towards the same few prototypes (less diversity), at the least noisy ones it does
        little; the middle is where it buys label fidelity. The default interval is all of T.
        """
        return scfg.guidance if scfg.guide_from <= t / self.T < scfg.guide_to else 1.0

    def predict_eps_x0(self, model, x_t, t, y, scfg):
        """The network's output at timestep t, guided as scfg says -> (eps, x_0).

        The conditional and unconditional passes run as one batch (on a CPU, in chunks of
        CPU_CHUNK images: faster there, the same numbers); then classifier-free guidance, then
        (optional) the guidance rescale.
        """
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)   # (B,)
        w = self.guidance_at(t, scfg)
        if w == 1.0:
            out = run_in_chunks(model, x_t, tt, y)
        else:
            null = torch.full_like(y, self.null_label)
            out_cond, out_uncond = run_in_chunks(model, torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                                                 torch.cat([y, null])).chunk(2)           # 2 x (B, C, H, W)
            out = classifier_free_guidance(out_cond, out_uncond, w)
            if scfg.guidance_rescale > 0:
                out = rescale_guidance(out, out_cond, scfg.guidance_rescale)
        return self.eps_and_x0(out, x_t, t)

    def eps_and_x0(self, out, x_t, t):
        """The network's output (eps or v) at timestep t -> (eps, x_0), x_0 clipped to [-1, 1]."""
        a, s = self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        if self.cfg.prediction == "eps":
            eps = out
            x0 = (x_t - s * eps) / a
        else:                                  # v = a eps - s x_0, and x_t = a x_0 + s eps
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        x0 = x0.clamp(-1, 1)                   # pixels live in [-1, 1]
        eps = (x_t - a * x0) / s               # keep eps consistent with the clipped x_0
        return eps, x0

    def timesteps(self, scfg):
        """The timesteps a sampler visits, noisiest first: all T for DDPM, scfg.steps evenly
        spaced ones for DDIM."""
        if scfg.sampler == "ddpm":
            return list(range(self.T - 1, -1, -1))
        return torch.linspace(self.T - 1, 0, scfg.steps).round().long().tolist()

    def step(self, x, t, t_prev, eps, x0, noise, scfg):
        """One reverse step x_t -> x_{t_prev} (t_prev = -1: the last step, to x_0).

        DDPM (Algorithm 2 of Ho et al.): x_{t-1} ~ q(x_{t-1} | x_t, x_0 = the prediction), no
        noise on the final step. DDIM (Song et al. 2021): x_prev = sqrt(abar_prev) x_0 +
        sqrt(1 - abar_prev - sigma^2) eps + sigma z, with sigma = 0 (deterministic) at eta = 0.
        `noise` is drawn by the caller at every step, used or not, so that every setting reads
        the same random stream; DDPM steps from t to t - 1 and ignores t_prev.
        """
        if scfg.sampler == "ddpm":
            mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * x
            std = (0.5 * self.posterior_log_variance_clipped[t]).exp()
            return mean + (std * noise if t > 0 else 0)
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else x.new_tensor(1.0)
        a_t = self.alphas_cumprod[t]
        sigma = scfg.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * noise

    @torch.inference_mode()
    def sample(self, model, y, scfg=None, generator=None, trajectory=False, image_shape=(1, 28, 28)):
        """Draw images for labels y (B,) -> (B, C, 28, 28) in [-1, 1], from pure noise.

        scfg: a SampleConfig (sampler, steps, guidance, eta, guidance interval and rescale);
        None: DDIM 50 at the model's own DiffusionConfig.sample_guidance. With trajectory=True
        also returns every x_t, x_T first (frames[i] is the input of timesteps(scfg)[i]).
        """
        scfg = scfg or SampleConfig(guidance=self.cfg.sample_guidance)
        shape = (len(y), *image_shape)
        x = torch.randn(shape, generator=generator, device=y.device)          # x_T ~ N(0, I)
        ts = self.timesteps(scfg)
        frames = [x]
        for i, t in enumerate(ts):
            eps, x0 = self.predict_eps_x0(model, x, t, y, scfg)
            noise = torch.randn(shape, generator=generator, device=y.device)
            x = self.step(x, t, ts[i + 1] if i + 1 < len(ts) else -1, eps, x0, noise, scfg)
            if not torch.isfinite(x).all():      # a result that cannot be right stops here, not as a black grid
                raise SamplingError(f"x_t became non-finite (nan or inf) at sampling step {i + 1} of {len(ts)} "
                                    f"(t = {t}): the weights, adapter or guidance are broken")
            frames.append(x)
        return (x, frames) if trajectory else x
