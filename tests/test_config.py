"""config.py: every group of settings is a checked dataclass, and the flags come from it."""
import math
from dataclasses import fields

import pytest

import evaluate
import lora_finetune
import sample
import train
from config import (DiffusionConfig, LoraConfig, ModelConfig, SampleConfig, TrainConfig, config_from_dict)


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


@pytest.mark.parametrize("module, groups", [
    (train, (ModelConfig, DiffusionConfig, TrainConfig)),
    (sample, (SampleConfig,)),
    (evaluate, (SampleConfig,)),
    (lora_finetune, (LoraConfig,)),
])
def test_flags_are_generated_from_the_dataclasses(module, groups):
    """Each field is a flag whose default is the dataclass default: one source of truth. The one
    exception: a sampler's --guidance is unset (None) until the checkpoint's sample_guidance fills it."""
    args = module.parse_args([])
    for cls in groups:
        for f in fields(cls):
            expected = None if (cls, f.name) == (SampleConfig, "guidance") else f.default
            assert getattr(args, f.name) == expected, (cls.__name__, f.name)


def test_stored_config_with_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        config_from_dict(ModelConfig, {"base_channels": 8, "wings": 2})
    assert config_from_dict(ModelConfig, {"channel_mults": [1, 2]}).channel_mults == (1, 2)   # JSON lists


def test_presets_set_their_flags_and_explicit_flags_win():
    """--preset long is the previous default recipe (94k images); a flag given explicitly beats it."""
    args = train.parse_args(["--preset", "long"])
    assert (args.epochs, args.batch_size, args.lr, args.ema_decay, args.t_power) == (21, 64, 2e-3, 0.995, 1.0)
    assert args.base_channels == ModelConfig().base_channels          # the same model as the default
    assert train.parse_args(["--preset", "long", "--epochs", "3"]).epochs == 3
    assert {"epochs", "lr", "t_power"} <= train.parse_args(["--preset", "long"]).given
    assert args.sample_guidance == 1.5 and train.parse_args([]).sample_guidance == 2.0   # long: sampled at w 1.5
