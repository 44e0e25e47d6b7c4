"""config.py: every group of settings is a checked dataclass, and the flags come from it."""
import math
from dataclasses import fields

import pytest

import evaluate
from config import (STYLE_RECIPES, DiffusionConfig, LoraConfig, ModelConfig, SampleConfig, TrainConfig,
                    config_from_dict)
from harness import scripts


@pytest.mark.parametrize("cls, bad, message", [
    (ModelConfig, {"context_tokens": 1}, "context_tokens"),
    (ModelConfig, {"attn_heads": 3}, "divisible"),
    (DiffusionConfig, {"prediction": "x0"}, "prediction"),
    (TrainConfig, {"batch_size": 0}, "batch_size"),
    (TrainConfig, {"ema_decay": 1.0}, "ema_decay"),
    (LoraConfig, {"r": 0}, "r must"),
    (LoraConfig, {"style": "folder"}, "--style-dir"),
    (SampleConfig, {"steps": 0}, "steps 0"),
    (SampleConfig, {"guidance": math.nan}, "guidance nan"),
    (SampleConfig, {"guidance": -1.0}, "guidance -1.0"),
    (SampleConfig, {"eta": math.nan}, "eta nan"),
    (SampleConfig, {"sampler": "euler"}, "euler"),
    (SampleConfig, {"seed": 2 ** 64}, "seed"),
])
def test_bad_values_are_refused_with_the_field_named(cls, bad, message):
    with pytest.raises(ValueError, match=message):
        cls(**bad)


def test_steps_beyond_the_models_T_are_refused():
    SampleConfig(steps=50).check_steps(50)
    with pytest.raises(ValueError, match="between 1 and 50"):
        SampleConfig(steps=51).check_steps(50)


@pytest.mark.parametrize("parse_args, groups", [
    (scripts.train_args, (ModelConfig, DiffusionConfig, TrainConfig)),
    (scripts.sample_args, (SampleConfig,)),
    (evaluate.parse_args, (SampleConfig,)),
    (scripts.finetune_args, (LoraConfig,)),
])
def test_flags_are_generated_from_the_dataclasses(parse_args, groups):
    """Each field is a flag whose default is the dataclass default: one source of truth. The
    exceptions: a sampler's --guidance is unset (None) until the checkpoint's sample_guidance fills
    it, and its --steps until sample_config() does (so that --sampler ddpm can refuse a --steps given);
    sample.py's sampler is DPM-Solver++ (docs/sampling.md, How many steps)."""
    args = parse_args([])
    for cls in groups:
        for f in fields(cls):
            if parse_args is evaluate.parse_args and f.name in scripts.EDIT_FIELDS:
                assert not hasattr(args, f.name)               # they edit an image: sample.py only
                continue
            expected = None if cls is SampleConfig and f.name in ("guidance", "steps") else f.default
            if parse_args is scripts.sample_args and f.name == "sampler":
                expected = "dpmpp"
            assert getattr(args, f.name) == expected, (cls.__name__, f.name)


def test_stored_config_with_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        config_from_dict(ModelConfig, {"base_channels": 8, "wings": 2})
    assert config_from_dict(ModelConfig, {"channel_mults": [1, 2]}).channel_mults == (1, 2)   # JSON lists


def test_presets_set_their_flags_and_explicit_flags_win():
    """--preset long is the previous default recipe (94k images); a flag given explicitly beats it."""
    args = scripts.train_args(["--preset", "long"])
    assert (args.steps, args.epochs, args.batch_size, args.lr, args.ema_decay, args.t_power) == (
        1470, 0, 64, 2e-3, 0.995, 1.0)                               # 21 epochs of the 4,500 digits, in steps
    assert args.base_channels == ModelConfig().base_channels          # the same model as the default
    assert scripts.train_args(["--preset", "long", "--epochs", "3"]).epochs == 3
    assert {"steps", "lr", "t_power"} <= scripts.train_args(["--preset", "long"]).given
    assert args.sample_guidance == 1.5 and scripts.train_args([]).sample_guidance == 2.0   # long: sampled at w 1.5


# Every bound of every checked field: the value at the edge is accepted, the nearest value past it
# is refused with the field named. (cls, field, accepted at the edge, refused past it)
EDGES = [
    (ModelConfig, "dropout", [0.0, 0.99], [-0.01, 1.0]), (ModelConfig, "num_res_blocks", [0, 16], [-1, 17]),
    (ModelConfig, "context_tokens", [2, 256], [1, 257]), (ModelConfig, "context_dim", [1, 4096], [0, 4097]),
    (ModelConfig, "ff_mult", [1, 16], [0, 17]), (ModelConfig, "attn_heads", [1], [0]),
    (ModelConfig, "base_channels", [8, 4096], [0, 4, 12, 4104]), (ModelConfig, "channel_mults", [(1,), (1, 2, 64)],
                                                                   [(), (1, 2, 4, 8), (1, 0), (1, 65)]),
    (ModelConfig, "in_channels", [1], [3]), (ModelConfig, "num_classes", [10], [9]),
    (DiffusionConfig, "timesteps", [2, 100_000], [1, 100_001]),
    (DiffusionConfig, "p_uncond", [0.0, 0.99], [-0.1, 1.0]), (DiffusionConfig, "min_snr_gamma", [0.0, 5.0], [-1.0]),
    (DiffusionConfig, "sample_guidance", [0.0, 100.0], [-0.1, 100.1]),
    (DiffusionConfig, "schedule", ["cosine", "linear"], ["sigmoid"]),
    (DiffusionConfig, "prediction", ["eps", "v"], ["x0"]),
    (TrainConfig, "steps", [1], [0]), (TrainConfig, "epochs", [0, 1], [-1]), (TrainConfig, "batch_size", [1], [0]), (TrainConfig, "ckpt_every", [1], [0]),
    (TrainConfig, "log_every", [1], [0]), (TrainConfig, "warmup_steps", [0], [-1]),
    (TrainConfig, "max_steps", [0], [-1]),
    (TrainConfig, "sample_every", [0], [-1]), (TrainConfig, "eval_every", [0], [-1]),
    (TrainConfig, "eval_n", [0, 10_000], [-1, 10_001]), (TrainConfig, "threads", [0, 4096], [-1, 4097]),
    (TrainConfig, "weight_decay", [0.0, 1.0], [-0.1, 1.01]), (TrainConfig, "lr", [1e-9, 1.0], [0.0, 1.01]),
    (TrainConfig, "grad_clip", [1e-9], [0.0]), (TrainConfig, "t_power", [1e-3], [0.0]),
    (TrainConfig, "ema_decay", [0.0, 0.999], [-0.1, 1.0]), (TrainConfig, "seed", [0, 2 ** 63 - 1], [-1, 2 ** 63]),
    (TrainConfig, "dataset", ["auto", "mnist", "mnist-5k", "folder"], ["cifar"]),
    (TrainConfig, "precision", ["fp32", "bf16"], ["fp16"]),
    (LoraConfig, "r", [1, 4096], [0, 4097]), (LoraConfig, "alpha", [1e-6, 1e6], [0.0, 1.1e6]),
    (LoraConfig, "lr_ratio_b", [1e-3], [0.0]), (LoraConfig, "lora_dropout", [0.0, 0.99], [-0.1, 1.0]),
    (LoraConfig, "style", ["bold", "italic"], ["gothic"]),
    (SampleConfig, "steps", [1], [0]), (SampleConfig, "guidance", [0.0, 100.0], [-0.01, 100.01]),
    (SampleConfig, "eta", [0.0, 1.0], [-0.01, 1.01]), (SampleConfig, "guide_from", [0.0, 0.99], [-0.01, 1.0]),
    (SampleConfig, "guide_to", [0.01, 1.0], [0.0, 1.01]), (SampleConfig, "guidance_rescale", [0.0, 1.0], [-0.1, 1.1]),
    (SampleConfig, "seed", [0, 2 ** 63 - 1], [-1, 2 ** 63]), (SampleConfig, "sampler", ["ddim", "dpmpp", "ddpm"], ["euler"]),
    (SampleConfig, "negative", [-1, 0, 10], [-2]), (SampleConfig, "strength", [1e-6, 1.0], [0.0, 1.01]),
    (SampleConfig, "jumps", [0, 20], [-1, 21]),
]


WIDE = ("base_channels", "context_dim", "ff_mult", "num_res_blocks", "context_tokens")   # one message for the sizes


@pytest.mark.parametrize("cls, field, ok, bad", EDGES, ids=[f"{c.__name__}.{f}" for c, f, _, _ in EDGES])
def test_every_bound_accepts_its_edge_and_refuses_past_it(cls, field, ok, bad):
    base = {"attn_heads": 1} if cls is ModelConfig and field in ("base_channels", "channel_mults") else {}
    base = {"sample_guidance": 1.0} if field == "p_uncond" else base     # p_uncond 0 leaves guidance nothing
    for v in ok:
        assert getattr(cls(**{**base, field: v}), field) == v, (field, v)
    for v in bad:
        with pytest.raises(ValueError) as e:
            cls(**{**base, field: v})
        message = str(e.value)
        assert field in message or (field in WIDE and message.startswith("widths beyond")), (field, v, message)


def test_no_label_dropout_means_no_guidance():
    """p_uncond 0 trains no unconditional output, which guidance w != 1 pushes away from."""
    with pytest.raises(ValueError, match="p_uncond 0 trains no unconditional model"):
        DiffusionConfig(p_uncond=0.0)
    assert DiffusionConfig(p_uncond=0.0, sample_guidance=1.0).sample_guidance == 1.0


def test_every_checked_field_has_its_edges_listed():
    listed = {(c, f) for c, f, _, _ in EDGES}
    for cls in (ModelConfig, DiffusionConfig, TrainConfig, LoraConfig, SampleConfig):
        for f in fields(cls):
            if f.type in (bool, "bool") or isinstance(f.default, bool) or f.name in (
                    "data_dir", "out", "device", "targets", "style_dir"):
                continue                                        # switches and free text: no bounds
            assert (cls, f.name) in listed, f"{cls.__name__}.{f.name}: no edge test"


def test_field_types_are_checked_bools_are_not_numbers():
    """A tampered checkpoint's config: True for an int, a string for a float, a list of bools for
    the widths, an inf are refused; an int where a float goes is fine."""
    for cls, field, bad in ((TrainConfig, "epochs", True), (TrainConfig, "lr", "0.1"), (TrainConfig, "lr", True),
                            (ModelConfig, "channel_mults", (True, 2)), (ModelConfig, "channel_mults", [1, 2]),
                            (SampleConfig, "guidance", math.inf), (LoraConfig, "rslora", 1),
                            (TrainConfig, "dataset", 5), (ModelConfig, "base_channels", 16.0)):
        with pytest.raises(ValueError, match=field):
            cls(**{field: bad})
    assert TrainConfig(lr=1).lr == 1 and SampleConfig(guidance=3).guidance == 3


def test_the_defaults_are_the_measured_recipe():
    """README's and docs/training.md's numbers were measured with these defaults: a default that
    changes silently makes them untrue. Change one here only together with the docs."""
    assert ModelConfig() == ModelConfig(1, 16, (1, 2, 4), 1, 10, 4, 64, 4, 2, 0.0)
    assert DiffusionConfig() == DiffusionConfig(1000, "cosine", "v", 0.0, 0.1, 2.0)
    t = TrainConfig()
    assert (t.dataset, t.steps, t.epochs, t.max_steps, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.grad_clip,
            t.t_power, t.ema_decay, t.seed, t.channels_last, t.precision, t.compile, t.ckpt_every, t.log_every,
            t.eval_n, t.eval_every) == ("auto", 700, 0, 0, 32, 3e-3, 0.0, 100, 1.0, 2.0, 0.99, 0, True, "fp32", False,
                                        500, 10, 20, 0)
    assert LoraConfig() == LoraConfig("bold", "qkv", 4, 4.0, 0.0, False, 1.0, False, "", True, False)
    assert SampleConfig() == SampleConfig("ddim", 50, 2.0, 0.0, 0.0, 1.0, 0.0, 0, -1, 1.0, 0)
    assert scripts.FINETUNE_DEFAULTS == {"out": "", "steps": 840, "batch_size": 64, "lr": 2e-3,
                                               "warmup_steps": 20, "ema_decay": 0.99, "t_power": 2.0,
                                               "ckpt_every": 200, "eval_n": 20}
    assert STYLE_RECIPES == {"bold": {"targets": "all", "r": 8, "alpha": 8.0, "lr": 4e-3, "t_power": 1.0},
                             "italic": {}, "folder": {}}


def test_each_style_recipe_names_real_fields_of_a_known_style():
    """A recipe's key that is no config field would be set on the flags and silently ignored."""
    known = {f.name for f in fields(LoraConfig)} | {f.name for f in fields(TrainConfig)}
    for style, recipe in STYLE_RECIPES.items():
        LoraConfig(style=style, style_dir="d" if style == "folder" else "")           # a style LoraConfig takes
        assert set(recipe) <= known - {"style", "style_dir", "full", "out", "dataset"}, style
        for name, value in recipe.items():                                            # the flags' own types
            default = getattr(LoraConfig, name, getattr(TrainConfig, name, None))
            assert type(value) is type(default), (style, name)
