"""LoRA adapter files: the project's safetensors format (written atomically, every field
checked on load, tied to the base weights it was trained on) and the export for Hugging Face
peft. The idea itself is in lora.py; this is how an adapter travels safely between runs.
"""
import hashlib
import json
import math
import os
import re

import torch

from config import LORA_MAX_ALPHA, LORA_MAX_R
from harness.files import atomic_write, not_a_regular_file, remove_stale_temps, shown, write_json
from lora import (LoraError, inject_lora, lora_layers, lora_state_dict, named_lora_layers, remove_lora,
                  resolve_targets, set_scale)


def base_fingerprint(model):
    """SHA-256 of the base weights (LoRA tensors left out, wrapper names undone): an adapter
    records the base it was trained on, and refuses any other."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.replace(".base.", ".").encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_safetensors(path, tensors, metadata):
    """`tensors` as a safetensors file, atomically. The bytes are made in memory and written into
    atomic_write's temp file: safetensors' save_file makes a temp file of its own (unlocked, unknown
    to remove_stale_temps) and renames it over ours."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, suffix=".safetensors")


def save_adapter(path, model, targets, r, alpha, use_rslora, model_config, fingerprint, style=""):
    """Write only the LoRA tensors as safetensors, with what load_adapter needs to check."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    layers = [n for n, _ in named_lora_layers(model)]
    meta = {"format": "sd-lora-mnist/1", "targets": json.dumps(resolve_targets(targets)), "r": str(r),
            "layers": json.dumps(layers),
            "alpha": str(alpha), "rslora": str(bool(use_rslora)), "model_config": json.dumps(model_config),
            "base_fingerprint": fingerprint, "style": style}
    write_safetensors(path, tensors, meta)


def read_adapter(path):
    """-> (tensors, metadata) of an adapter file, or a LoraError naming the file."""
    from safetensors import safe_open
    kind = not_a_regular_file(path)
    if kind:                                   # a FIFO would block the reader forever
        raise LoraError(f"{shown(path)}: is a {kind}, not an adapter file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise LoraError(f"{path}: adapter not found")
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise LoraError(f"{path}: not a readable safetensors adapter ({e})") from e
    if meta.get("format") != "sd-lora-mnist/1":
        raise LoraError(f"{path}: not a LoRA adapter of this project (no sd-lora-mnist metadata)")
    for k, t in tensors.items():       # a result that cannot be right is an error, not a black grid
        if not t.is_floating_point():
            raise LoraError(f"{path}: tensor {k} has dtype {t.dtype}; LoRA weights are floating point")
        if not torch.isfinite(t).all():
            raise LoraError(f"{path}: tensor {k} holds non-finite values (nan or inf)")
    return tensors, meta


def load_adapter(model, path, model_config, fingerprint=None):
    """Inject LoRA as the adapter file describes and load its tensors, checking everything:
    the base model config, the base weights' fingerprint, missing/unexpected keys, shapes."""
    tensors, meta = read_adapter(path)
    if "layers" not in meta:
        raise LoraError(f"{path}: adapter predates this format (no 'layers' metadata); retrain it")
    try:
        stored = json.loads(meta["model_config"])
        layers, r, alpha = json.loads(meta["layers"]), int(meta["r"]), float(meta["alpha"])
        expected_fingerprint, rslora = meta["base_fingerprint"], meta["rslora"]
    except (KeyError, ValueError) as e:
        raise LoraError(f"{path}: adapter metadata is incomplete or malformed ({e})") from e
    problems = [what for what, ok in (
        ("model_config must be a JSON object", isinstance(stored, dict)),
        ("layers must be a list of layer names", isinstance(layers, list) and all(isinstance(n, str) for n in layers)),
        (f"r {r} must be between 1 and {LORA_MAX_R}", 1 <= r <= LORA_MAX_R),
        (f"alpha {alpha} must be a finite number in (0, {LORA_MAX_ALPHA:g}]",
         math.isfinite(alpha) and 0 < alpha <= LORA_MAX_ALPHA),
        (f"rslora {rslora!r} must be True or False", rslora in ("True", "False"))) if not ok]
    if problems:
        raise LoraError(f"{path}: adapter metadata is malformed: {'; '.join(problems)}")
    rslora = rslora == "True"
    model_config = json.loads(json.dumps(model_config))      # tuples -> lists, as stored
    if stored != model_config:
        diff = sorted(k for k in set(stored) | set(model_config) if stored.get(k) != model_config.get(k))
        raise LoraError(f"{path}: adapter was trained on another model (config differs in {diff})")
    fingerprint = fingerprint or base_fingerprint(model)
    if expected_fingerprint != fingerprint:
        raise LoraError(f"{path}: adapter was trained on other base weights "
                        f"(fingerprint {expected_fingerprint} != this checkpoint's {fingerprint})")
    inject_lora(model, ["^" + re.escape(n) + "$" for n in layers], r, alpha, use_rslora=rslora)  # exactly those
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoraError(f"{path}: adapter keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise LoraError(f"{path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)  # strict=False is safe: keys checked just above
    return model


def apply_adapters(model, paths, scales, model_config, merge=False):
    """Load one or several adapters onto a base model, each at its own strength.

    One adapter stays unmerged unless merge=True. Several are composed by merging them
    one after the other: W + sum_i scale_i * scaling_i * B_i A_i.
    """
    fingerprint = base_fingerprint(model)
    for path, scale in zip(paths, scales):
        load_adapter(model, path, model_config, fingerprint)
        set_scale(model, scale)
        if merge or len(paths) > 1:
            for layer in lora_layers(model):
                layer.merge()
            if len(paths) > 1:
                remove_lora(model)
    return model


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")      # what export_peft writes, in this order


def check_peft_folder(out_dir, replace=False):
    """Refuse an out_dir that export_peft may not write into (see there); called before the work
    too, so a run that cannot export stops at once and not after its training."""
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise LoraError(f"{shown(out_dir)}: is a link or a file, not a folder of its own; refusing to write there")
    if replace:
        remove_stale_temps([os.path.join(out_dir, n) for n in PEFT_FILES])
    others = sorted(set(os.listdir(out_dir)) - set(PEFT_FILES if replace else ())) if os.path.isdir(out_dir) else []
    if others:
        raise LoraError(f"{shown(out_dir)}: holds other files ({shown(', '.join(others)[:80])}); "
                        "refusing to write an export beside them")


def export_peft(model, out_dir, replace=False):
    """Write the adapter as peft's save_pretrained does, for peft.PeftModel.from_pretrained(<the
    same base model>, out_dir): adapter_model.safetensors with keys
    base_model.model.<layer>.lora_A.weight / .lora_B.weight, and adapter_config.json. For a Conv2d
    peft keeps A as a k x k conv weight (r, in, k, k) and B as a 1 x 1 one (out, r, 1, 1).
    peft has no run-time strength: the adapter is written at scale 1.
    out_dir must be absent or empty; with replace=True (a run folder's own export, under its
    lock: --resume, --overwrite) it may also hold an earlier export's two files, which are
    replaced, and the temp files of a killed export, which are removed."""
    check_peft_folder(out_dir, replace)
    layers = named_lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers to export")
    first = layers[0][1]
    if any((m.r, m.alpha, m.use_rslora) != (first.r, first.alpha, first.use_rslora) for _, m in layers):
        raise LoraError("LoRA layers differ in r, alpha or rsLoRA; one peft config cannot describe them")
    tensors = {}
    for name, layer in layers:
        shape, key = layer.base.weight.shape, f"base_model.model.{name}"   # (out, in) or (out, in, k, k)
        if len(shape) == 4 and layer.base.dilation != (1, 1):
            raise LoraError(f"{name}: peft's LoRA convolution ignores dilation; cannot export it")
        ones = [1] * (len(shape) - 2)
        tensors[key + ".lora_A.weight"] = layer.lora_A.detach().reshape(layer.r, *shape[1:])    # (r, in[, k, k])
        tensors[key + ".lora_B.weight"] = layer.lora_B.detach().reshape(shape[0], layer.r, *ones)  # (out, r[, 1, 1])
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
              "target_modules": [n for n, _ in layers], "r": first.r, "lora_alpha": first.alpha,
              "use_rslora": first.use_rslora, "lora_dropout": getattr(first.dropout, "p", 0.0),
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}
    os.makedirs(out_dir, exist_ok=True)
    weights, config_file = (os.path.join(out_dir, n) for n in PEFT_FILES)
    write_safetensors(weights, tensors, {"format": "pt"})
    write_json(config_file, config)     # last: a folder with it is whole
