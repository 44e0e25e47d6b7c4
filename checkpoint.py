"""Checkpoints you can trust: state dicts + config, atomic writes, safe loads, clear errors.

A checkpoint is a dict {"model", "ema", "optimizer", "scheduler", "step", "config", "rng", ...}
of tensors and plain Python values, so `torch.load(weights_only=True)` can read it and no
pickled code ever runs.
"""
import json
import os

import torch

from config import DiffusionConfig, ModelConfig, config_from_dict
from unet import UNet

DEFAULT_CHECKPOINT = os.path.join("runs", "mnist", "ckpt.pt")   # where `python train.py` writes


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit; the message names the file."""


def atomic_write(path, write_fn, suffix=""):
    """Call write_fn(tmp_path), then rename over `path`: readers see the old file or the new one,
    never half of one (os.replace is atomic on POSIX and Windows). The temp name is fixed
    (`<path>.tmp<suffix>`), so one left by a killed process is simply overwritten next time."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.abspath(path) + ".tmp" + suffix
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write, suffix=".json")


def save_checkpoint(path, ckpt):
    """torch.save a dict of state dicts atomically."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True; every failure becomes one CheckpointError line."""
    if not os.path.isfile(path):
        hint = " (run `python train.py` first)" if path == DEFAULT_CHECKPOINT else ""
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, forbidden pickle globals, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from e
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model/config)")
    return ckpt


def configs_from_checkpoint(ckpt, path="checkpoint"):
    """The ModelConfig and DiffusionConfig a checkpoint was trained with."""
    try:
        return (config_from_dict(ModelConfig, ckpt["config"]["model"]),
                config_from_dict(DiffusionConfig, ckpt["config"]["diffusion"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config does not fit this code ({e})") from e


def load_state(module, state, path="checkpoint", what="model"):
    """load_state_dict(strict=True), with a mismatch reported in one line that names the keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [k for k in module.state_dict() if k not in state]
        unexpected = [k for k in state if k not in module.state_dict()]
        detail = (f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected
                  else str(e).strip().splitlines()[-1].strip()[:200])
        raise CheckpointError(f"{path}: {what} weights do not fit the model ({detail})") from e


def load_model(path, device="cpu", ema=True):
    """Rebuild the UNet from a checkpoint's config and load its (EMA) weights, in eval mode.

    Returns (model, diffusion_config, checkpoint).
    """
    ckpt = load_checkpoint(path)
    model_cfg, diff_cfg = configs_from_checkpoint(ckpt, path)
    model = UNet(model_cfg)
    key = "ema" if ema and "ema" in ckpt else "model"
    load_state(model, ckpt[key], path, key)
    return model.to(device).eval(), diff_cfg, ckpt
