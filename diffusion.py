"""The diffusion process, apart from the network: schedules, q(x_t | x_0), the training
loss, classifier-free guidance, the DDPM, DDIM and DPM-Solver++ samplers, and editing with
them (img2img, inpainting, negative labels, label blends).

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
            "half_log_snr": 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod)),  # lambda_t = log(alpha / sigma)
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

    def unconditional(self, y, scfg):
        """What guidance steers away from: the null label ("no label"), or scfg.negative if set
        (a negative label, as SD's negative prompt). One-hot weights when y is a blend."""
        away = self.null_label if scfg.negative < 0 else scfg.negative
        if y.is_floating_point():                                             # y: (B, num_classes + 1) weights
            return F.one_hot(torch.full(y.shape[:1], away, device=y.device), y.shape[1]).to(y.dtype)
        return torch.full_like(y, away)                                       # (B,)

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
            away = self.unconditional(y, scfg)
            out_cond, out_uncond = run_in_chunks(model, torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                                                 torch.cat([y, away])).chunk(2)           # 2 x (B, C, H, W)
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
        spaced ones for DDIM and DPM-Solver++. With strength s < 1 (img2img) the run starts at
        t = s (T - 1), with DDIM's step size: about s * steps of them."""
        top = round(scfg.strength * (self.T - 1))
        if scfg.sampler == "ddpm":
            return list(range(top, -1, -1))
        n = min(max(1, math.ceil(scfg.steps * scfg.strength)), top + 1)       # no timestep twice
        return torch.linspace(top, 0, n).round().long().tolist()

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

    def dpmpp_step(self, x, t, t_next, x0, prev):
        """One DPM-Solver++(2M) step x_t -> x_{t_next} (Lu et al. 2022, Alg. 2), solved exactly in
        lambda = log(alpha / sigma) (the half log-SNR) for a constant x_0 over the step. That x_0 is
        extrapolated from this step's prediction and the previous step's (prev = (t, x_0) of it) to
        the step's middle: second order. First order (= DDIM) at the first step, and at the last,
        which lands on the prediction (sigma = 0 at t_next = -1)."""
        if t_next < 0:
            return x0
        lam, s = self.half_log_snr, self.sqrt_one_minus_alphas_cumprod
        h = lam[t_next] - lam[t]
        d = x0
        if prev is not None:
            r = (lam[t] - lam[prev[0]]) / h               # the previous step's length over this one's
            d = x0 + (x0 - prev[1]) / (2 * r)             # (1 + 1/2r) x0 - (1/2r) x0_prev
        return s[t_next] / s[t] * x - self.sqrt_alphas_cumprod[t_next] * torch.expm1(-h) * d

    def denoise(self, model, x, t, t_next, y, scfg, generator, prev):
        """One reverse step of scfg's sampler x_t -> (x_{t_next}, the x_0 it predicted)."""
        eps, x0 = self.predict_eps_x0(model, x, t, y, scfg)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        if scfg.sampler == "dpmpp":
            return self.dpmpp_step(x, t, t_next, x0, prev), x0
        return self.step(x, t, t_next, eps, x0, noise, scfg), x0

    def keep(self, x, init, mask, t, generator):
        """Inpainting: x_t with its kept pixels (mask = 1) replaced by init drawn from q(x_t | init),
        so that they say what the image is, at x_t's noise level (t = -1: init itself)."""
        if mask is None:
            return x
        if t >= 0:
            noise = torch.randn(init.shape, generator=generator, device=init.device)
            init = self.q_sample(init, torch.full((len(init),), t, device=init.device), noise)
        return mask * init + (1 - mask) * x

    def renoise(self, x, t_from, t_to, generator):
        """x_{t_from} -> x_{t_to} (t_to > t_from) by the forward process: RePaint's step back up."""
        a = self.alphas_cumprod[t_to] / self.alphas_cumprod[t_from]     # alpha_bar from t_from to t_to
        return a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=generator, device=x.device)

    @torch.inference_mode()
    def sample(self, model, y, scfg=None, generator=None, trajectory=False, image_shape=(1, 28, 28),
               init=None, mask=None, on_step=None):
        """Draw images for labels y -> (B, C, 28, 28) in [-1, 1], from pure noise.

        y: labels (B,), or weights (B, num_classes + 1) over them: the context is then the blend
        of their context tokens. scfg: a SampleConfig (sampler, steps, guidance and its interval,
        strength, jumps); None: DDIM 50 at the model's own sample_guidance. init (B, C, 28, 28):
        img2img (SDEdit, Meng et al. 2022) -- start from init noised to t = strength (T - 1) (at
        strength 1 nothing of it would be left: pure noise, as without init). With
        mask (1 = keep): inpainting -- after every step the kept pixels are init noised to the new t
        (RePaint, Lugmayr et al. 2022), and scfg.jumps times the step is undone by the forward
        process and redone, to harmonise both parts. trajectory=True: also every x_t, x_T first.
        on_step(): called after every step (a progress bar).
        """
        scfg = scfg or SampleConfig(guidance=self.cfg.sample_guidance)
        if (scfg.strength < 1 and init is None) or (scfg.jumps and mask is None):
            raise ValueError("strength < 1 needs an init image, jumps a mask (they edit an image)")
        ts = self.timesteps(scfg)
        x = torch.randn((len(y), *image_shape), generator=generator, device=y.device)   # x_T ~ N(0, I)
        if init is not None and scfg.strength < 1:             # SDEdit: the image, noised to the first t
            x = self.q_sample(init, torch.full((len(y),), ts[0], device=y.device), x)
        frames, prev = [x], None
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else -1
            x_next, x0 = self.denoise(model, x, t, t_next, y, scfg, generator, prev)
            x_next = self.keep(x_next, init, mask, t_next, generator)
            for _ in range(scfg.jumps if mask is not None and t_next >= 0 else 0):   # RePaint's resampling:
                x_back = self.renoise(x_next, t_next, t, generator)                     # back up to t, step again
                x_next, x0 = self.denoise(model, x_back, t, t_next, y, scfg, generator, prev)
                x_next = self.keep(x_next, init, mask, t_next, generator)
            x, prev = x_next, (t, x0)
            if not torch.isfinite(x).all():      # a result that cannot be right stops here, not as a black grid
                raise SamplingError(f"x_t became non-finite (nan or inf) at sampling step {i + 1} of {len(ts)} "
                                    f"(t = {t}): the weights, adapter or guidance are broken")
            frames.append(x)
            if on_step:
                on_step()
        return (x, frames) if trajectory else x
