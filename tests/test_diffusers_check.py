"""Our schedules and samplers, number for number against diffusers' (as test_lora_peft.py does
for LoRA against peft). diffusers is a test-only dependency.

Where we chose differently (the DDIM step grid), the test shows the difference.
"""
import pytest
import torch
from torch import nn

from config import DiffusionConfig, SampleConfig
from diffusion import Diffusion, cosine_betas, linear_betas

diffusers = pytest.importorskip("diffusers")

T = 1000


class ToyDenoiser(nn.Module):
    """A fixed, seeded network with the UNet's signature: its outputs are far from any exact
    solution, and its x_0 predictions often leave [-1, 1] (so clipping is exercised)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, y):
        return torch.tanh(self.conv(x)) * (1.5 + t.float().view(-1, 1, 1, 1) / T)


def noise_batch(seed, n=3):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_cosine_schedule_is_diffusers_squaredcos_cap_v2():
    ours = cosine_betas(T).float()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)           # measured: identical
    assert ours[-1] == pytest.approx(0.999)                      # both cap the last beta


def test_linear_schedule_is_diffusers_linear_at_T_1000():
    ours = linear_betas(T).float()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").betas
    torch.testing.assert_close(ours, theirs, rtol=3e-7, atol=0)   # float32 rounding: 1 ulp


def run_diffusers(scheduler, model, x, y, timesteps, generator=None):
    """diffusers' sampling loop, the model unguided (w = 1)."""
    for t in timesteps:
        out = model(x, torch.full((len(x),), int(t)), y)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def test_full_ddpm_run_matches_diffusers_with_the_same_noise():
    d, model, y = Diffusion(DiffusionConfig()), ToyDenoiser(), torch.arange(3)
    scfg = SampleConfig(sampler="ddpm", guidance=1.0)
    ours = d.sample(model, y, scfg, generator=torch.Generator().manual_seed(0))
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.0,
                                    variance_type="fixed_small")
    sched.set_timesteps(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 28, 28, generator=g)                  # the same x_T, then the same noise per step
    theirs = run_diffusers(sched, model, x, y, sched.timesteps, generator=g)
    # 1,000 float32 steps drift by 3e-4; diffusers' other variance ("fixed_large") is 0.019 away
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
    assert (ours - noise_batch(1)).abs().mean() > 0.1            # not a trivial result


def test_ddim_matches_diffusers_on_a_grid_both_use(monkeypatch):
    """diffusers' DDIM steps from t to t - T // steps; on its "leading" grid ours gives the same
    numbers, clipping and the eps re-derived from the clipped x_0 included."""
    d, model, y = Diffusion(DiffusionConfig()), ToyDenoiser(), torch.arange(3)
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction", clip_sample=True, set_alpha_to_one=True,
                                    timestep_spacing="leading")
    sched.set_timesteps(20)
    grid = sched.timesteps.tolist()                              # 950, 900, ..., 0
    monkeypatch.setattr(d, "timesteps", lambda scfg: grid)
    ours = d.sample(model, y, SampleConfig(steps=20, guidance=1.0), generator=torch.Generator().manual_seed(0))
    x = noise_batch(0)
    for t in grid:
        out = model(x, torch.full((3,), t), y)
        x = sched.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)               # measured: 3e-6


def test_our_ddim_grid_differs_from_diffusers_on_purpose():
    """Ours runs from T - 1 (where x_T ~ N(0, I) is right) down to t = 0 (the cleanest
    prediction); diffusers' leading grid starts at 950 for 20 steps and its trailing one ends at 49."""
    d = Diffusion(DiffusionConfig())
    ours = d.timesteps(SampleConfig(steps=20))
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading")
    sched.set_timesteps(20)
    assert ours[0] == T - 1 and ours[-1] == 0 and sched.timesteps[0] == 950
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    sched.set_timesteps(20)
    assert sched.timesteps[0] == T - 1 and sched.timesteps[-1] == 49


@pytest.mark.parametrize("steps", [5, 20])
def test_dpmpp_matches_diffusers_dpm_solver_multistep_given_our_timesteps(steps):
    d, model, y = Diffusion(DiffusionConfig()), ToyDenoiser(), torch.arange(3)
    scfg = SampleConfig(sampler="dpmpp", steps=steps, guidance=1.0)
    ours = d.sample(model, y, scfg, generator=torch.Generator().manual_seed(0))
    # sample_max_value 1 makes diffusers' dynamic thresholding exactly our clipping of x_0 to [-1, 1]
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                                  prediction_type="v_prediction", algorithm_type="dpmsolver++",
                                                  solver_order=2, thresholding=True, sample_max_value=1.0,
                                                  final_sigmas_type="zero", lower_order_final=True)
    sched.set_timesteps(timesteps=d.timesteps(scfg))
    theirs = run_diffusers(sched, model, noise_batch(0), y, sched.timesteps)
    # measured: 6e-5 at 5 steps, 8e-6 at 20; diffusers' other second-order form ("heun") is 0.49 / 0.04 away
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3e-4)
    first_order = d.sample(model, y, SampleConfig(steps=steps, guidance=1.0),
                           generator=torch.Generator().manual_seed(0))          # DDIM: DPM-Solver++'s order 1
    assert (ours - first_order).abs().max() > 1e-2               # the second order does something
