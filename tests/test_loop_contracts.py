"""The training loop's contracts, stated as tests: which samples each step sees, which noise,
at which learning rate, what a training setting changes, and when the loop must stop.

train.fit runs here on a one-parameter denoiser over 24 numbered images, so every step's
batch, timesteps and noise can be read back exactly (a step costs microseconds)."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

import train
from conftest import one_line_error, run_cli
from config import DiffusionConfig, TrainConfig
from diffusion import Diffusion
from harness import run
from harness.dist import Dist

N = 24                      # images; image i is filled with the number i, so a batch names its indices


class Scale(nn.Module):
    """The smallest denoiser: out = w * x_t (one parameter, a real gradient)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, y):
        return self.w * x


class Recording(Diffusion):
    """A Diffusion that records what each training step was given, and the learning rate it ran at."""

    def __init__(self, cfg, opt_box):
        super().__init__(cfg)
        self.steps, self.opt_box = [], opt_box

    def loss(self, model, x0, y, randomness=None):
        t, noise, drop = randomness
        lr = self.opt_box[0].param_groups[0]["lr"] if self.opt_box else None
        self.steps.append({"idx": x0[:, 0, 0, 0].round().long().tolist(), "y": y.tolist(), "t": t.clone(),
                           "noise": noise.clone(), "drop": drop.clone(), "lr": lr})
        return super().loss(model, x0, y, randomness)


def numbered_data():
    x = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 1, 4, 4).contiguous()
    return x, torch.arange(N) % 10


def run_fit(steps=None, saves=None, **flags):
    """train.fit over the numbered images -> (the recorded steps, the loop state, the model)."""
    kw = dict(batch_size=4, epochs=3, warmup_steps=2, log_every=1, ckpt_every=10 ** 6, device="cpu",
              channels_last=False)
    kw.update(flags)
    tcfg = TrainConfig(**kw)
    torch.manual_seed(0)
    model, opt_box = Scale(), []
    diffusion = Recording(DiffusionConfig(timesteps=50, p_uncond=0.3), opt_box)
    state = train.new_loop_state(model, list(model.parameters()), tcfg, N)
    opt_box.append(state["optimizer"])
    save = (lambda s: saves.append(s["step"])) if saves is not None else (lambda s: None)
    outcome = train.fit(model, diffusion, numbered_data(), tcfg, state, save, Dist("cpu"), list(model.parameters()))
    assert outcome == "done"
    return diffusion.steps, state, model


def sampler_order(seed, epoch, n=N):
    s = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize("seed", [0, 7])
def test_each_epoch_is_the_distributed_samplers_shuffle_for_that_epoch_and_seed(seed):
    steps, state, _ = run_fit(seed=seed)
    per_epoch = N // 4
    assert len(steps) == state["step"] == 3 * per_epoch
    for s, rec in enumerate(steps):
        epoch, i = divmod(s, per_epoch)
        assert rec["idx"] == sampler_order(seed, epoch)[4 * i:4 * i + 4], f"step {s}"
        assert rec["y"] == [k % 10 for k in rec["idx"]], "labels travel with their images"
    orders = [sum((r["idx"] for r in steps[e * per_epoch:(e + 1) * per_epoch]), []) for e in range(3)]
    assert all(sorted(o) == list(range(N)) for o in orders), "each epoch sees every image once"
    assert orders[0] != orders[1] != orders[2], "a new shuffle at every epoch"


def test_another_seed_gives_another_order_and_other_noise():
    a, _, _ = run_fit(seed=0)
    b, _, _ = run_fit(seed=1)
    assert [r["idx"] for r in a] != [r["idx"] for r in b]
    assert not torch.equal(a[0]["noise"], b[0]["noise"])


def test_the_randomness_of_step_s_is_drawn_for_step_s():
    """t, noise and dropped labels of global step s come from a generator seeded by (seed, s):
    the same in every run, never repeated by another step (an epoch does not restart them)."""
    steps, _, _ = run_fit(seed=3, t_power=2.0)
    again, _, _ = run_fit(seed=3, t_power=2.0)
    diffusion = Diffusion(DiffusionConfig(timesteps=50, p_uncond=0.3))
    for s, (rec, rec2) in enumerate(zip(steps, again)):
        assert torch.equal(rec["noise"], rec2["noise"]) and torch.equal(rec["t"], rec2["t"])
        g = torch.Generator().manual_seed((3 * 1_000_003 + s) % 2 ** 63)
        t, noise, drop = diffusion.draw(4, (1, 4, 4), "cpu", generator=g, t_power=2.0)
        assert torch.equal(rec["t"], t) and torch.equal(rec["noise"], noise) and torch.equal(rec["drop"], drop), s
    noises = [r["noise"] for r in steps]
    assert all(not torch.equal(noises[i], noises[j]) for i in range(len(noises)) for j in range(i)), \
        "two steps drew the same noise"


def test_learning_rate_warms_up_then_decays_to_exactly_half_and_zero():
    """warm-up W = 4 of 12 steps: step k < W runs at peak (k + 1) / W, step W at the peak, the
    middle of the decay (step W + 4) at exactly half, and the schedule ends at 0."""
    steps, state, _ = run_fit(lr=0.01, warmup_steps=4, epochs=2)      # 12 steps
    lrs = [r["lr"] for r in steps]
    assert len(lrs) == 12
    for k in range(4):
        assert lrs[k] == pytest.approx(0.01 * (k + 1) / 4), f"warm-up step {k}"
    assert lrs[3] == lrs[4] == pytest.approx(0.01), "the peak at the end of warm-up"
    assert lrs[8] == pytest.approx(0.005, abs=1e-12), "half-way through the decay: half the peak"
    for k in range(5, 12):
        assert lrs[k] == pytest.approx(0.005 * (1 + math.cos(math.pi * (k - 4) / 8))), f"decay step {k}"
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
    assert state["optimizer"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15), "0 at the end"


def test_max_steps_stops_early_without_changing_the_schedule():
    full, _, _ = run_fit(lr=0.01, warmup_steps=4, epochs=2)
    cut, state, _ = run_fit(lr=0.01, warmup_steps=4, epochs=2, max_steps=7)
    assert state["step"] == len(cut) == 7
    assert [r["lr"] for r in cut] == [r["lr"] for r in full[:7]]
    assert [r["idx"] for r in cut] == [r["idx"] for r in full[:7]]


def test_checkpoints_every_ckpt_every_steps_and_at_the_end():
    saves = []
    run_fit(ckpt_every=4, epochs=2, saves=saves)        # 12 steps
    assert saves == [4, 8, 12]
    saves = []
    run_fit(ckpt_every=5, epochs=2, saves=saves)
    assert saves == [5, 10, 12]


def test_losses_are_logged_every_log_every_steps_and_at_the_end():
    _, state, _ = run_fit(log_every=5, epochs=2)        # 12 steps
    assert [s for s, _ in state["losses"]] == [5, 10, 12]
    assert all(math.isfinite(v) for _, v in state["losses"])


def test_ema_follows_the_weights_with_its_decay():
    """EMA: the first update copies the weights, every later one is decay * ema + (1 - decay) * w."""
    model = Scale()
    tcfg = TrainConfig(ema_decay=0.9)
    state = train.new_loop_state(model, list(model.parameters()), tcfg, N)
    ema, expected = state["ema"], None
    for w in (1.0, 2.0, 4.0):
        model.w.data.fill_(w)
        ema.update_parameters(model)
        expected = w if expected is None else 0.9 * expected + 0.1 * w
        assert ema.module.w.item() == pytest.approx(expected)


def test_optimiser_gets_the_runs_lr_weight_decay_and_groups():
    model = Scale()
    tcfg = TrainConfig(lr=0.004, weight_decay=0.05)
    state = train.new_loop_state(model, list(model.parameters()), tcfg, N)
    opt = state["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 0.004 and opt.defaults["weight_decay"] == 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(0.004 / tcfg.warmup_steps), "the first warm-up step"
    groups = [{"params": [model.w], "lr": 0.001}]                  # LoRA+'s groups keep their own lr
    assert train.new_loop_state(model, groups, tcfg, N)["optimizer"].defaults["lr"] == 0.004
    assert train.new_loop_state(model, groups, tcfg, N)["optimizer"].param_groups[0]["initial_lr"] == 0.001


def one_step(model, tcfg, x0=None):
    """train.train_step on the numbered images' first batch -> (loss, state)."""
    diffusion = Diffusion(DiffusionConfig(timesteps=50))
    params = list(model.parameters())
    state = train.new_loop_state(model, params, tcfg, N)
    x0 = numbered_data()[0][:4] if x0 is None else x0
    g = torch.Generator().manual_seed(0)
    randomness = diffusion.draw(4, x0.shape[1:], "cpu", generator=g)
    loss = train.train_step(model, model, diffusion, x0, torch.arange(4), randomness, state, params, tcfg)
    return loss, state


def test_gradients_are_clipped_to_grad_clip_before_the_step():
    model = Scale()
    loss, state = one_step(model, TrainConfig(grad_clip=1e-3, lr=0.1, warmup_steps=0))
    assert model.w.grad.norm().item() == pytest.approx(1e-3, rel=1e-4), "the clipped gradient"
    exp_avg = state["optimizer"].state[model.w]["exp_avg"]         # (1 - beta1) g: the step saw the clipped g
    assert abs(exp_avg.item()) == pytest.approx(0.1 * 1e-3, rel=1e-4), "clipped before the optimiser step"
    unclipped = Scale()
    one_step(unclipped, TrainConfig(grad_clip=1.0, lr=0.1, warmup_steps=0))
    assert unclipped.w.grad.norm().item() > 1e-2, "the test needs a gradient above the clip"
    assert state["step"] == 0 and state["ema"].n_averaged.item() == 1


class SqrtScale(Scale):
    """out = sqrt(w) x at w = 0: a finite output and loss, an infinite gradient."""

    def forward(self, x, t, y):
        return self.w.sqrt() * x


def test_a_finite_loss_with_an_overflowing_gradient_stops_without_a_step_or_a_save():
    model = SqrtScale()
    model.w.data.zero_()
    tcfg = TrainConfig(batch_size=4, epochs=1, device="cpu", channels_last=False, ckpt_every=1, warmup_steps=0)
    state = train.new_loop_state(model, list(model.parameters()), tcfg, N)
    saves = []
    with pytest.raises(run.TrainingError) as e:
        train.fit(model, Diffusion(DiffusionConfig(timesteps=50)), numbered_data(), tcfg, state,
                 lambda s: saves.append(s["step"]), Dist("cpu"), list(model.parameters()))
    message = str(e.value)
    assert "became non-finite" in message and "gradient norm" in message and "at step 0" in message, message
    assert "stopped without saving" in message and "\n" not in message
    assert saves == [] and state["step"] == 0
    assert model.w.item() == 0.0, "no optimiser step with a non-finite gradient"
    assert state["ema"].n_averaged.item() == 0


def test_the_loss_curve_is_smoothed_by_an_ema_from_its_first_value():
    assert run.smoothed([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]
    assert run.smoothed([1.0, 11.0, 1.0]) == pytest.approx([1.0, 2.0, 1.9])
    assert run.smoothed([0.0, 1.0], decay=0.5) == [0.0, 0.5]


def test_resume_command_continues_this_run():
    tcfg = TrainConfig(out="runs/my run", max_steps=40)
    assert run.resume_command("train.py", tcfg) == "python train.py --out 'runs/my run' --resume --max-steps 40"
    assert run.resume_command("lora_finetune.py", TrainConfig(out="o"), "--checkpoint", "/a b/c.pt") == \
        "python lora_finetune.py --out o --resume --checkpoint '/a b/c.pt'"


def test_run_length_counts_whole_batches_and_max_steps_stops_early():
    assert run.run_length(100, TrainConfig(batch_size=32, epochs=3)) == (3, 9, 9)
    assert run.run_length(100, TrainConfig(batch_size=32, epochs=3, max_steps=4)) == (3, 9, 4)
    assert run.run_length(100, TrainConfig(batch_size=32, epochs=3, max_steps=50)) == (3, 9, 9)
    assert run.run_length(10, TrainConfig(batch_size=32, epochs=2)) == (1, 2, 2)


def test_a_run_is_counted_in_steps_unless_epochs_size_it():
    """--steps is the same work on any dataset; --epochs > 0 counts passes over it instead."""
    for n in (4_500, 60_000, 10):
        assert run.run_length(n, TrainConfig())[1:] == (700, 700)
    assert run.run_length(60_000, TrainConfig(steps=50, max_steps=20)) == (1875, 50, 20)
    assert run.run_length(4_500, TrainConfig(steps=50, epochs=2)) == (140, 280, 280)


def test_resume_extends_by_steps_and_refuses_a_plan_shorter_than_the_run():
    from dataclasses import asdict, replace
    stored = TrainConfig(steps=30, device="cpu")
    ckpt = {"config": {"train": asdict(stored)}, "data": "mnist-5k", "step": 20}
    assert run.resume_config(ckpt, replace(stored, steps=40), given={"steps"}).steps == 40
    with pytest.raises(run.TrainingError, match="--steps 25: the run was set for 30; on --resume --steps can only"):
        run.resume_config(ckpt, replace(stored, steps=25), given={"steps"})
    with pytest.raises(run.TrainingError, match="--epochs: this run is counted in steps \\(set for 30\\); on --resume "
                                                "give --steps to extend it"):
        run.resume_config(ckpt, replace(stored, epochs=1), given={"epochs"})   # 1 epoch could shorten it
    stored_epochs = {**ckpt, "config": {"train": asdict(TrainConfig(epochs=2, device="cpu"))}}
    with pytest.raises(run.TrainingError, match="--steps: this run is counted in epochs"):
        run.resume_config(stored_epochs, TrainConfig(steps=99), given={"steps"})
    got = run.resume_config(stored_epochs, TrainConfig(steps=99, epochs=3), given={"steps", "epochs"})
    assert (got.epochs, got.steps) == (3, 700), "an --epochs beside a preset's --steps: epochs"
    # an --epochs that plans fewer steps than the run has done is refused before a step is taken
    tcfg = TrainConfig(batch_size=8, epochs=1, device="cpu", channels_last=False)     # 1 x 24 / 8 = 3 steps
    state = {"step": 5}
    with pytest.raises(run.TrainingError, match="already at step 5; .* can only extend it \\(this plans 3 steps\\)"):
        run.Steps(numbered_data(), None, tcfg, state, Dist("cpu"))


def test_steps_and_epochs_together_are_one_clear_line():
    for script in ("train.py", "lora_finetune.py"):
        one_line_error(run_cli(script, "--steps", "10", "--epochs", "1"), "--steps and --epochs both size the run")


def test_resume_config_takes_the_stored_run_and_only_where_and_how_long_from_the_flags():
    from dataclasses import asdict, replace
    stored = TrainConfig(epochs=3, lr=0.002, out="old", device="cpu", threads=2, max_steps=0, log_every=7,
                         dataset="auto", ckpt_every=50)
    ckpt = {"config": {"train": asdict(stored)}, "data": "mnist-5k", "step": 20}
    flags = TrainConfig(epochs=5, lr=0.1, out="new", device="auto", threads=1, max_steps=30, log_every=3, ckpt_every=9)
    got = run.resume_config(ckpt, flags, given=set())
    assert got == replace(stored, out="new", device="auto", threads=1, max_steps=30, dataset="mnist-5k")
    got = run.resume_config(ckpt, flags, given={"epochs", "log_every", "ckpt_every"})
    assert (got.epochs, got.log_every, got.ckpt_every, got.lr) == (5, 3, 9, 0.002)
    assert run.resume_config(ckpt, replace(flags, epochs=3), given={"epochs"}).epochs == 3, "the same length is fine"
    with pytest.raises(run.TrainingError, match="--epochs 2: the run was set for 3"):
        run.resume_config(ckpt, replace(flags, epochs=2), given={"epochs"})
    with pytest.raises(run.TrainingError, match="--lr 0.1 \\(the run has 0.002\\)"):
        run.resume_config(ckpt, flags, given={"lr"})
    with pytest.raises(run.TrainingError, match="--max-steps 19: the run is already at step 20"):
        run.resume_config(ckpt, replace(flags, max_steps=19), given=set())
    assert run.resume_config(ckpt, replace(flags, max_steps=20), given=set()).max_steps == 20


def test_ctrl_c_saves_at_the_next_step_whatever_ckpt_every_says(monkeypatch):
    """SIGINT during step 3 (of 9): the loop finishes that step, saves a checkpoint of it (with
    --ckpt-every far away), says "interrupted" and gives Ctrl-C back to whoever had it."""
    import signal
    before = signal.getsignal(signal.SIGINT)
    calls = []
    real_loss = Recording.loss

    def loss(self, *args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)            # the StopFlag's handler, not KeyboardInterrupt
        return real_loss(self, *args)
    monkeypatch.setattr(Recording, "loss", loss)
    saves = []
    tcfg = TrainConfig(batch_size=4, epochs=3, log_every=1, ckpt_every=10 ** 6, device="cpu", channels_last=False)
    model = Scale()
    state = train.new_loop_state(model, list(model.parameters()), tcfg, N)
    outcome = train.fit(model, Recording(DiffusionConfig(timesteps=50), []), numbered_data(), tcfg, state,
                       lambda s: saves.append(s["step"]), Dist("cpu"), list(model.parameters()))
    assert (outcome, saves, state["step"], len(calls)) == ("interrupted", [3], 3, 3)
    assert signal.getsignal(signal.SIGINT) is before
