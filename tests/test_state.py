"""State that must survive: LoRA merge/unmerge round trips, and files that are either the
old version or the new one, never half of one.

- merge at one scale, change the scale, unmerge: the original weights (to float32 rounding);
  merged == unmerged == the readable form base(x) + s * scaling * B(A(x)) at several scales,
  for nn.Linear and nn.Conv2d (stride and padding included).
- Each writer (checkpoint, JSON, LoRA adapter, PNG figures) with its serializer made to write
  half a file and then fail like a full disk: one CheckpointError ("could not write ..."), the
  previous file still loads with its old values, and nothing but the expected files is left in
  the folder.
"""
import io
import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_close
from torch import nn

import lora
from harness import adapters, files, run
from unet import UNet

EPS32 = torch.finfo(torch.float32).eps


# ----- LoRA -----

def make_layer(kind, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = lora.LoraLayer(base, r=2, alpha=6.0)          # scaling = 3
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.5)
    return layer


def layer_input(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 12, generator=g) if kind == "linear" else torch.randn(2, 4, 9, 9, generator=g)


def reference(layer, x, scale):
    """base(x) + scale * scaling * B(A(x)) with dW = B A in W's shape, in float64."""
    c = layer.base
    dw = (layer.lora_B.double() @ layer.lora_A.double()).view(c.weight.shape) * (scale * layer.scaling)
    w, b = c.weight.double() + dw, c.bias.double()
    if isinstance(c, nn.Linear):
        return F.linear(x.double(), w, b)
    return F.conv2d(x.double(), w, b, c.stride, c.padding, c.dilation)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_scaling_is_alpha_over_r(kind):
    layer = make_layer(kind)
    assert layer.scaling == 3.0
    assert layer.lora_A.shape[0] == 2 and layer.lora_B.shape[1] == 2


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_merged_equals_unmerged_equals_the_formula(kind, scale):
    layer = make_layer(kind).eval()
    x = layer_input(kind)
    layer.scale = scale
    expected = reference(layer, x, scale)
    with torch.no_grad():
        assert_close(layer(x).double(), expected, atol=1e-5, msg="unmerged vs base(x) + s B(A(x))")
        if hasattr(lora, "set_fused"):                       # the optimised form, if there is one
            lora.set_fused(layer, True)
            assert_close(layer(x).double(), expected, atol=1e-5, msg="fused vs the formula")
            lora.set_fused(layer, False)
        layer.train()                                        # no dropout: training gives the same numbers
        assert_close(layer(x).double(), expected, atol=1e-5, msg="train mode")
        layer.eval()
        layer.merge()
        assert_close(layer(x).double(), expected, atol=1e-5, msg="merged vs the formula")
        assert_close(layer.base(x).double(), expected, atol=1e-5, msg="the merged base layer alone")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("s_merge,s_after", [(0.7, 2.0), (1.0, 0.0), (2.5, 0.3)])
def test_unmerge_after_the_scale_changed_restores_the_weights(kind, s_merge, s_after):
    """unmerge() takes out what merge() put in, whatever .scale says by then."""
    layer = make_layer(kind)
    w0, b0 = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    layer.scale = s_merge
    layer.merge()
    dw = layer.base.weight.detach() - w0
    assert dw.abs().max() > 1e-2, "merge must change W"
    layer.scale = s_after
    layer.unmerge()
    err = (layer.base.weight.detach() - w0).abs().max()
    assert torch.equal(layer.base.weight, w0), f"unmerge left W off by {err:.3g}: not bit-exact"
    assert torch.equal(layer.base.bias, b0)
    # and now the layer runs at the new scale, unmerged
    x = layer_input(kind)
    with torch.no_grad():
        assert_close(layer(x).double(), reference(layer, x, s_after), atol=1e-5)


def test_set_scale_reaches_every_layer_and_merge_round_trips_a_model():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 40]), torch.tensor([3, 10])
    with torch.no_grad():
        base_out = model(x, t, y)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = lora.inject_lora(model, [r".*"], r=2, alpha=2.0)       # every nn.Linear and nn.Conv2d
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    lora.set_scale(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), base_out), "scale 0 is exactly the base model"
        lora.set_scale(model, 1.5)
        assert all(layer.scale == 1.5 for layer in lora.lora_layers(model)) and len(names) == len(lora.lora_layers(model))
        unmerged = model(x, t, y)
        assert (unmerged - base_out).abs().max() > 1e-3
        for layer in lora.lora_layers(model):
            layer.merge()
        assert_close(model(x, t, y), unmerged, atol=1e-4, msg="merged model vs unmerged")
        lora.set_scale(model, 0.4)
        for layer in lora.lora_layers(model):
            layer.unmerge()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base.", ".")
            assert_close(p, w0[key], atol=1e-6, msg=n)


def test_load_state_refuses_missing_and_unexpected_keys():
    torch.manual_seed(0)
    state = UNet(TINY).state_dict()
    model = UNet(TINY)
    files.load_state(model, state)                               # the full state loads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    with pytest.raises(files.CheckpointError, match="conv_out.bias"):
        files.load_state(UNet(TINY), missing)
    with pytest.raises(files.CheckpointError, match="extra.weight"):
        files.load_state(UNet(TINY), {**state, "extra.weight": torch.zeros(1)})


# ----- files: old or new, never half -----

def half_then_fail(data, target):
    """Write the first half of `data` where the serializer was told to, then fail like a full disk."""
    if hasattr(target, "write"):
        target.write(data[: len(data) // 2])
    else:
        with open(target, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device (injected)")


def assert_only(folder, names):
    left = sorted(os.listdir(folder))
    assert left == sorted(names), f"files left in the folder: {left}, expected {sorted(names)}"


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "data.bin"
    files.atomic_write(str(path), lambda tmp: open(tmp, "wb").write(b"old contents"))

    def failing(tmp):
        half_then_fail(b"new contents that never finish", tmp)
    with pytest.raises(files.CheckpointError, match="could not write .*injected"):
        files.atomic_write(str(path), failing)
    assert path.read_bytes() == b"old contents"
    assert_only(tmp_path, ["data.bin"])
    files.atomic_write(str(path), lambda tmp: open(tmp, "wb").write(b"new"))
    assert path.read_bytes() == b"new"
    assert_only(tmp_path, ["data.bin"])


def test_save_checkpoint_survives_a_failing_torch_save(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    old = {"model": {"w": torch.arange(6.0)}, "config": {"step": 1}, "step": 1}
    files.save_checkpoint(path, old)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        half_then_fail(buffer.getvalue(), f)
    monkeypatch.setattr(torch, "save", broken_save)
    new = {"model": {"w": torch.full((6,), 7.0)}, "config": {"step": 2}, "step": 2}
    with pytest.raises(files.CheckpointError, match="could not write .*injected"):
        files.save_checkpoint(path, new)
    monkeypatch.undo()
    loaded = files.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], old["model"]["w"]) and loaded["step"] == 1
    assert_only(tmp_path, ["ckpt.pt"])
    files.save_checkpoint(path, new)                           # and a write that works replaces it
    assert files.load_checkpoint(path)["step"] == 2
    assert_only(tmp_path, ["ckpt.pt"])


def test_write_json_survives_a_failing_json_dump(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    files.write_json(path, {"accuracy": 0.5, "n": 10})

    def broken_dump(obj, fp, *args, **kwargs):
        half_then_fail(json.dumps(obj, indent=1), fp)
    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(files.CheckpointError, match="could not write .*injected"):
        files.write_json(path, {"accuracy": 0.9, "n": 20})
    monkeypatch.undo()
    assert json.load(open(path)) == {"accuracy": 0.5, "n": 10}
    assert_only(tmp_path, ["results.json"])


def adapter_model(seed):
    torch.manual_seed(0)
    model = UNet(TINY)
    lora.inject_lora(model, "attn", r=2, alpha=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def test_save_adapter_survives_a_failing_save_file(tmp_path, monkeypatch):
    path = str(tmp_path / "adapter.safetensors")
    save = lambda model: adapters.save_adapter(path, model, "attn", 2, 2.0, False, asdict(TINY),
                                           adapters.base_fingerprint(model))
    old_model = adapter_model(seed=1)
    save(old_model)
    old = lora.lora_state_dict(old_model)

    class HalfThenFail:                         # what adapters.write_safetensors opens its temp file as
        def __init__(self, filename, mode):
            self.filename = filename

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            half_then_fail(bytes(data), self.filename)
    monkeypatch.setattr(adapters, "open", HalfThenFail, raising=False)    # found before the builtin
    new_model = adapter_model(seed=2)
    with pytest.raises(files.CheckpointError, match="could not write .*injected"):
        save(new_model)
    monkeypatch.undo()
    tensors, _ = adapters.read_adapter(path)
    assert set(tensors) == set(old)
    for k, v in old.items():
        assert torch.equal(tensors[k], v), k
    assert_only(tmp_path, ["adapter.safetensors"])


def figure_writers():
    """The PNG writers that go through matplotlib's savefig: (name, call(path))."""
    writers = []
    import train
    if hasattr(train, "save_loss_curve"):
        writers.append(("run.save_loss_curve", lambda p: run.save_loss_curve([(1, 1.0), (2, 0.5), (3, 0.4)], p)))
    import evaluate
    if hasattr(evaluate, "save_sweep_figure"):
        sweep = [{"guidance": w, "accuracy": 0.8, "frechet": 3.0, "frechet_floor": 1.0} for w in (1.0, 2.0)]
        writers.append(("evaluate.save_sweep_figure", lambda p: evaluate.save_sweep_figure(sweep, p)))
    try:
        import visualize
    except ImportError:
        visualize = None
    if hasattr(visualize, "save_figure"):
        def plot(p):
            from matplotlib import pyplot as plt
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [1, 0])
            visualize.save_figure(fig, p)
        writers.append(("visualize.save_figure", plot))
    return writers


def test_figure_writers_survive_a_failing_savefig(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    writers = figure_writers()
    assert writers, "no figure writer found to test"
    real_savefig = Figure.savefig

    def broken_savefig(self, fname, *args, **kwargs):
        buffer = io.BytesIO()
        real_savefig(self, buffer, *args, **kwargs)
        half_then_fail(buffer.getvalue(), fname)
    for name, write in writers:
        folder = tmp_path / name
        folder.mkdir()
        path = str(folder / "figure.png")
        write(path)
        old = open(path, "rb").read()
        assert old.startswith(b"\x89PNG"), name
        monkeypatch.setattr(Figure, "savefig", broken_savefig)
        with pytest.raises(files.CheckpointError, match="could not write .*injected"):
            write(path)
        monkeypatch.undo()
        assert open(path, "rb").read() == old, f"{name}: the previous figure was damaged"
        assert_only(folder, ["figure.png"])
