"""Every setting reaches its consumer: each field of SampleConfig, given as a flag, arrives in
the sampler and changes the images as its definition says; seeded noise streams continue across
batches and evaluation chunks; the guidance interval's ends sit where the docs put them; the
LoRA flags arrive in the layers, the optimiser and the adapter file; a checkpoint's config
rebuilds its model field for field."""
import json
import os
from dataclasses import asdict, astuple, fields, replace

import pytest
import torch
from conftest import TINY, TINY_FLAGS, TINY_T, model_flags, run_cli

import evaluate
import lora
import sample
from config import DiffusionConfig, LoraConfig, ModelConfig, SampleConfig
from diffusion import Diffusion
from harness import adapters, scripts
from harness.files import load_checkpoint, load_model
from unet import UNet

BASE = SampleConfig(steps=4, guidance=2.0)
# one non-default value per SampleConfig field, and what the sampler is then called with
CHANGED = {"sampler": "ddpm", "steps": 7, "guidance": 3.5, "eta": 0.6, "guide_from": 0.4, "guide_to": 0.5,
           "guidance_rescale": 0.7, "seed": 5, "negative": 1, "strength": 0.5, "jumps": 2}
# the fields that edit an image, with what they edit (sample.py only: --init, --mask)
IMAGE = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
LEFT = torch.zeros(1, 1, 28, 28)
LEFT[..., :14] = 1
EDITS = {"strength": {"init": IMAGE}, "jumps": {"init": IMAGE, "mask": LEFT}}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(TINY).eval(), Diffusion(DiffusionConfig(timesteps=TINY_T))


def direct(model, diffusion, y, scfg, init=None, mask=None):
    """diffusion.sample called by hand with scfg and its seed: the lowest function."""
    edit = {k: v.expand(len(y), -1, -1, -1) for k, v in (("init", init), ("mask", mask)) if v is not None}
    return diffusion.sample(model, y, scfg, generator=torch.Generator().manual_seed(scfg.seed), **edit)


def test_every_sample_config_field_has_a_changed_value_here():
    assert set(CHANGED) == {f.name for f in fields(SampleConfig)}, "a new field needs its test"


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_each_sampling_field_reaches_the_sampler_and_changes_the_images(tiny, field):
    model, diffusion = tiny
    scfg = replace(BASE, **{field: CHANGED[field]})
    if field == "guide_to":
        scfg = replace(scfg, guide_from=0.2)
    edit = EDITS.get(field, {})
    x, y, _ = sample.generate(model, diffusion, [3, 7], 2, scfg, **edit)
    assert y.tolist() == [3, 3, 7, 7]
    assert torch.equal(x, direct(model, diffusion, y, scfg, **edit)), f"{field}: generate differs from the sampler"
    before = sample.generate(model, diffusion, [3, 7], 2, BASE if field != "guide_to" else
                             replace(BASE, guide_from=0.2), **edit)[0]
    assert (x - before).abs().max() > 1e-4, f"{field} = {CHANGED[field]} changed nothing"


@pytest.mark.parametrize("script", ["sample", "evaluate"])
def test_each_sampling_flag_arrives_in_the_sample_config(script):
    """--sampler ddpm --steps 7 ... -> SampleConfig(sampler="ddpm", steps=7, ...), field by field;
    without --guidance the model's own sample_guidance."""
    parse_args = {"sample": scripts.sample_args, "evaluate": evaluate.parse_args}[script]
    diff_cfg = DiffusionConfig(timesteps=TINY_T, sample_guidance=1.25)
    for field, value in CHANGED.items():
        if script == "evaluate" and field in EDITS:
            continue                                          # evaluate.py edits no image: no such flag
        flag = "--" + field.replace("_", "-")
        extra = ["--guide-from", "0.2"] if field == "guide_to" else []
        extra += ["--sampler", "ddim"] if field != "sampler" and script == "sample" else []     # eta is DDIM's
        scfg = scripts.sample_config(parse_args([flag, str(value), *extra]), diff_cfg, 10)
        assert getattr(scfg, field) == value, field
        moved = {field, "guide_from"} if field == "guide_to" else {field}
        untouched = {f: v for f, v in asdict(scfg).items() if f not in moved}
        assert untouched == {f: v for f, v in asdict(SampleConfig(guidance=1.25)).items() if f in untouched}, field
    assert scripts.sample_config(parse_args([]), diff_cfg, 10).guidance == 1.25


def test_each_script_samples_with_its_default_sampler_and_each_sampler_with_its_steps():
    """sample.py: DPM-Solver++ at 10 steps (docs/sampling.md's table); evaluate.py: DDIM 50, on which
    the README's numbers are measured; --sampler alone brings its own default steps, never more than T."""
    cfg = DiffusionConfig(timesteps=TINY_T)
    got = lambda parse, argv, c=cfg: astuple(scripts.sample_config(parse(argv), c, 10))[:2]
    assert got(scripts.sample_args, []) == ("dpmpp", 10)
    assert got(scripts.sample_args, ["--sampler", "ddim"]) == ("ddim", 50)
    assert got(scripts.sample_args, ["--steps", "7"]) == ("dpmpp", 7)
    assert got(evaluate.parse_args, []) == ("ddim", 50)
    assert got(evaluate.parse_args, ["--sampler", "dpmpp"]) == ("dpmpp", 10)
    assert got(scripts.sample_args, ["--sampler", "ddim"], DiffusionConfig(timesteps=8)) == ("ddim", 8)
    assert got(scripts.sample_args, [], DiffusionConfig(timesteps=8)) == ("dpmpp", 8)
    with pytest.raises(scripts.SampleError, match="steps 9: must be between 1 and 8"):
        got(scripts.sample_args, ["--steps", "9"], DiffusionConfig(timesteps=8))


def test_batches_continue_one_noise_stream(tiny, monkeypatch):
    """With a cap of 2 images per batch, 6 images of one label are three different batches
    drawn from one generator, one after the other: exactly what three calls of the sampler
    with that one generator give. Under the cap a request is one unbatched call."""
    model, diffusion = tiny
    monkeypatch.setattr(sample, "MAX_BATCH", 2)
    x, y, _ = sample.generate(model, diffusion, [4], 6, BASE)
    batches = x.split(2)
    assert all((batches[i] - batches[j]).abs().max() > 1e-3 for i in range(3) for j in range(i)), \
        "every batch drew the same images: a freshly seeded generator per batch"
    g = torch.Generator().manual_seed(BASE.seed)
    by_hand = torch.cat([diffusion.sample(model, y[i:i + 2], BASE, generator=g)
                         for i in (0, 2, 4)])
    assert torch.equal(x, by_hand)
    monkeypatch.setattr(sample, "MAX_BATCH", 6)
    assert torch.equal(sample.generate(model, diffusion, [4], 6, BASE)[0], direct(model, diffusion, y, BASE))


def test_evaluation_chunks_draw_new_noise_each(tiny, monkeypatch):
    """evaluate_model samples in chunks, chunk i seeded with seed + i: two chunks never repeat
    each other's images, and each is what generate gives for its seed."""
    model, diffusion = tiny
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_images", lambda clf, x, y, real_x, real_y=None: seen.append((x, y)) or {})
    scfg = replace(BASE, seed=11)
    r, x, y = evaluate.evaluate_model(model, diffusion, None, None, 4, scfg, batch=20)   # 2 per digit per chunk
    assert x.shape[0] == 40 and y.tolist() == [d for d in range(10) for _ in range(2)] * 2
    assert torch.equal(seen[0][0], x) and "sampling_seconds" in r
    first, second = x[:20], x[20:]
    assert (first - second).abs().amax(dim=(1, 2, 3)).min() > 1e-3, "a chunk repeated the first one's images"
    assert torch.equal(first, sample.generate(model, diffusion, list(range(10)), 2, scfg)[0])
    assert torch.equal(second, sample.generate(model, diffusion, list(range(10)), 2, replace(scfg, seed=12))[0])


class CountingModel(torch.nn.Module):
    """Records the batch size of every call per timestep: 2B where guidance ran both passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, {}

    def forward(self, x, t, y):
        self.calls[int(t[0])] = self.calls.get(int(t[0]), 0) + len(x)
        return self.model(x, t, y)


@pytest.mark.parametrize("lo, hi", [(0.2, 0.6), (0.0, 0.5), (0.5, 1.0)])
def test_guidance_interval_includes_its_start_and_excludes_its_end(tiny, lo, hi):
    """lo <= t/T < hi: with T = 50, the guided steps of a DDPM run (every t) are exactly
    t = 50 lo .. 50 hi - 1, the boundary steps included / excluded as the definition says."""
    model, diffusion = tiny
    counting = CountingModel(model)
    scfg = SampleConfig(sampler="ddpm", guidance=3.0, guide_from=lo, guide_to=hi)
    sample.generate(counting, diffusion, [1, 2], 1, scfg)
    guided = sorted(t for t, n in counting.calls.items() if n == 4)
    assert guided == list(range(round(lo * TINY_T), round(hi * TINY_T))), (lo, hi)
    assert sorted(counting.calls) == list(range(TINY_T)) and set(counting.calls.values()) <= {2, 4}
    assert diffusion.guidance_at(round(lo * TINY_T), scfg) == 3.0
    if hi < 1:
        assert diffusion.guidance_at(round(hi * TINY_T), scfg) == 1.0


def test_every_lora_flag_arrives_in_the_layers_the_optimiser_and_the_adapter(tiny_ckpt, tmp_path, monkeypatch):
    """One fine-tuning run with every LoRA field off its default: r, alpha, rsLoRA and the
    targets are in the layers and the adapter file, lr_ratio_b in the optimiser's groups, the
    dropout in the wrapped layers, fused in how they run."""
    made = []
    real_inject = lora.inject_lora

    def spy(model, *args, **kwargs):
        names = real_inject(model, *args, **kwargs)
        made.append(model)
        return names
    monkeypatch.setattr(lora, "inject_lora", spy)
    out = str(tmp_path / "lora")
    r = run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, "--targets", "attn", "--r", "3", "--alpha", "5",
                "--rslora", "--lora-dropout", "0.25", "--lr-ratio-b", "4", "--no-fused",
                "--lr", "1e-3", "--max-steps", "2", "--batch-size", "8", "--eval-n", "0", "--no-figures",
                "--out", out)
    assert r.returncode == 0, r.stderr
    layers = dict(lora.named_lora_layers(made[0]))
    assert sorted(layers) == sorted(n for n, m in UNet(TINY).named_modules()
                                    if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out")))
    for layer in layers.values():
        assert (layer.r, layer.alpha, layer.use_rslora, layer.fused) == (3, 5.0, True, False)
        assert layer.scaling == pytest.approx(5 / 3 ** 0.5) and layer.dropout.p == 0.25
    ckpt = load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 4e-3], "LoRA+: B at lr_ratio_b * lr"
    assert ckpt["config"]["lora"] == asdict(LoraConfig(targets="attn", r=3, alpha=5.0, rslora=True,
                                                      lora_dropout=0.25, lr_ratio_b=4.0, fused=False))
    tensors, meta = adapters.read_adapter(os.path.join(out, "adapter.safetensors"))
    assert (meta["r"], meta["alpha"], meta["rslora"]) == ("3", "5.0", "True")
    assert json.loads(meta["layers"]) == list(layers)
    assert all(t.shape[0] == 3 for k, t in tensors.items() if k.endswith("lora_A"))


@pytest.mark.parametrize("flags, lora_config, train_config", [
    ([], {"style": "bold", "targets": "all", "r": 8, "alpha": 8.0}, {"lr": 4e-3, "t_power": 1.0}),   # bold's recipe
    (["--targets", "qkv", "--lr", "1e-3"], {"targets": "qkv", "r": 8, "alpha": 8.0}, {"lr": 1e-3, "t_power": 1.0}),
    (["--style", "italic"], {"style": "italic", "targets": "qkv", "r": 4, "alpha": 4.0}, {"lr": 2e-3, "t_power": 2.0}),
    (["--full"], {"style": "bold", "full": True}, {"lr": 2e-3, "t_power": 2.0}),             # the baseline: plain
])
def test_each_style_trains_with_its_recipe_and_a_given_flag_wins(tiny_ckpt, tmp_path, flags, lora_config,
                                                                  train_config):
    """config.STYLE_RECIPES arrives in the stored run, the optimiser and the printed set-up; a flag
    given explicitly replaces only its own field."""
    out = str(tmp_path / "l")
    r = run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, *flags, "--max-steps", "1", "--batch-size", "8",
                "--eval-n", "0", "--no-figures", "--out", out)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(os.path.join(out, "finetune_ckpt.pt"))
    assert {k: ckpt["config"]["lora"][k] for k in lora_config} == lora_config
    assert {k: ckpt["config"]["train"][k] for k in train_config} == train_config
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == train_config["lr"]
    assert f"lr {train_config['lr']:g}, t-power {train_config['t_power']:g}" in r.stdout


def test_a_checkpoint_rebuilds_its_model_field_for_field(tmp_path):
    """train.py with every ModelConfig field off its default: the stored config is those flags,
    load_model rebuilds exactly that UNet and its EMA weights."""
    cfg = ModelConfig(base_channels=24, channel_mults=(1, 1), num_res_blocks=2, context_tokens=3, context_dim=8,
                      attn_heads=3, ff_mult=3, dropout=0.1)
    for f in fields(ModelConfig):
        if f.name not in ("in_channels", "num_classes"):
            assert getattr(cfg, f.name) not in (f.default, getattr(TINY, f.name)), f.name
    flags = list(TINY_FLAGS)
    for i in range(0, len(model_flags(TINY)), 2):
        j = flags.index(model_flags(TINY)[i])
        flags[j + 1] = model_flags(cfg)[i + 1]
    out = str(tmp_path / "run")
    r = run_cli("train.py", *flags, "--timesteps", "20", "--schedule", "linear", "--prediction", "eps",
                "--min-snr-gamma", "5", "--p-uncond", "0.2", "--sample-guidance", "1.5",
                "--max-steps", "1", "--no-figures", "--out", out)
    assert r.returncode == 0, r.stderr
    model, diff_cfg, ckpt = load_model(os.path.join(out, "ckpt.pt"))
    assert model.cfg == cfg
    assert diff_cfg == DiffusionConfig(timesteps=20, schedule="linear", prediction="eps", min_snr_gamma=5.0,
                                       p_uncond=0.2, sample_guidance=1.5)
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    assert not model.training
