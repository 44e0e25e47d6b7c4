"""Our LoRA against Hugging Face peft, the reference implementation: the same A and B give the
same UNet output, unmerged and merged, with alpha / r or rsLoRA's alpha / sqrt(r); and an adapter
written by adapters.export_peft loads into peft.PeftModel.from_pretrained as it is."""
import copy
import json
import os

import peft
import pytest
import torch
from conftest import TINY, assert_close
from safetensors import safe_open

import lora
from harness import adapters
from unet import UNet

INPUTS = (torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 30, 45]), torch.tensor([0, 3, 7, 10]))
TARGETS = ["qkv", "attn", "conv", "all"]       # Linear only, Linear only, Conv2d only, every kind at once


def base_unet():
    torch.manual_seed(0)
    return UNet(TINY).eval()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():                       # forward passes only: no graph to keep
        yield


def peft_wrapped(model):
    """Names of the layers a PeftModel put LoRA on."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def ours_and_peft(targets, r=4, alpha=8.0, use_rslora=False):
    """Identical UNets, one wrapped by inject_lora, one by peft, holding the same random A and B."""
    ours = base_unet()
    theirs = copy.deepcopy(ours)
    names = lora.inject_lora(ours, targets, r, alpha, use_rslora=use_rslora)
    g = torch.Generator().manual_seed(1)
    for layer in lora.lora_layers(ours):                           # trained-looking: B != 0
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    config = peft.LoraConfig(target_modules=names, r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora)
    theirs = peft.get_peft_model(theirs, config).eval()
    assert peft_wrapped(theirs) == set(names)                      # peft wraps exactly our layers
    for name in names:
        layer, ref = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        a, b = ref.lora_A["default"].weight, ref.lora_B["default"].weight   # conv: (r, in, k, k), (out, r, 1, 1)
        a.copy_(layer.lora_A.view(a.shape))
        b.copy_(layer.lora_B.view(b.shape))
    return ours, theirs, names


@pytest.mark.parametrize("targets", TARGETS)
def test_same_A_and_B_give_the_same_unet_as_peft_unmerged_and_merged(targets):
    ours, theirs, names = ours_and_peft(targets)
    base = base_unet()(*INPUTS)
    out = ours(*INPUTS)
    assert (out - base).abs().max() > 1e-3                         # the adapter does change the output
    assert_close(out, theirs(*INPUTS), atol=1e-5, msg=f"{targets}: ours vs peft, unmerged")
    lora.set_fused(ours, True)
    assert_close(ours(*INPUTS), theirs(*INPUTS), atol=1e-5, msg=f"{targets}: fused vs peft")
    for layer in lora.lora_layers(ours):
        layer.merge()
    theirs.merge_adapter()
    assert_close(ours(*INPUTS), theirs(*INPUTS), atol=1e-5, msg=f"{targets}: ours vs peft, merged")
    sd = theirs.base_model.model.state_dict()
    for name in names:                                             # the merged weights themselves
        assert_close(ours.get_submodule(name).base.weight, sd[f"{name}.base_layer.weight"], atol=1e-6, msg=name)


@pytest.mark.parametrize("targets", ["attn", "conv"])
def test_rslora_scaling_matches_peft_use_rslora(targets):
    ours, theirs, names = ours_and_peft(targets, r=4, alpha=8.0, use_rslora=True)
    assert ours.get_submodule(names[0]).scaling == 4.0            # alpha / sqrt(r), not alpha / r = 2
    assert theirs.base_model.model.get_submodule(names[0]).scaling["default"] == 4.0
    assert_close(ours(*INPUTS), theirs(*INPUTS), atol=1e-5, msg=f"{targets}: rsLoRA ours vs peft")


@pytest.mark.parametrize("targets", ["qkv", "conv", "all"])
def test_export_peft_loads_into_peft_and_matches_what_peft_writes(targets, tmp_path):
    ours, theirs, names = ours_and_peft(targets)
    out_dir = str(tmp_path / "peft")
    adapters.export_peft(ours, out_dir)
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    loaded = peft.PeftModel.from_pretrained(base_unet(), out_dir).eval()
    assert_close(loaded(*INPUTS), ours(*INPUTS), atol=1e-5, msg=f"{targets}: peft-loaded export vs ours")

    theirs.save_pretrained(str(tmp_path / "ref"))                  # what peft itself writes
    def read(folder):
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.load(open(os.path.join(folder, "adapter_config.json")))
    (mine, my_config), (ref, ref_config) = read(out_dir), read(str(tmp_path / "ref"))
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k].shape == ref[k].shape and torch.equal(mine[k], ref[k]), k
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "auto_mapping"):
        assert my_config[field] == ref_config[field], field
    assert peft_wrapped(loaded) == set(names)     # (peft's own file may list suffixes: it shortens long lists)


def test_export_peft_refuses_a_non_empty_folder_and_a_model_without_lora(tmp_path):
    ours, _, _ = ours_and_peft("qkv")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(lora.LoraError, match="holds other files \\(keep.txt\\)"):
        adapters.export_peft(ours, str(tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]
    with pytest.raises(lora.LoraError, match="no LoRA layers"):
        adapters.export_peft(UNet(TINY), str(tmp_path / "empty"))
    adapters.export_peft(ours, str(tmp_path / "empty"))                # an existing empty folder is fine


@pytest.mark.parametrize("targets, r, alpha, rslora, dropout", [
    ("qkv", 2, 8.0, False, 0.0), ("attn", 4, 3.0, True, 0.0), ("attn+ff", 3, 6.0, False, 0.1),
    ("conv", 2, 5.0, True, 0.2), ("all", 8, 16.0, False, 0.0)])
def test_every_lora_field_survives_adapter_file_peft_export_and_peft(targets, r, alpha, rslora, dropout, tmp_path):
    """Each LoRA setting makes the round trip: our layers -> adapter file -> a fresh model ->
    peft export -> PeftModel, which holds the same targets, r, alpha, rsLoRA, dropout and scaling
    and gives the same output; the export of the trained model itself carries the dropout."""
    ours, _, names = ours_and_peft(targets, r=r, alpha=alpha, use_rslora=rslora)
    for layer in lora.lora_layers(ours):
        layer.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
    cfg = {"model": "tiny"}
    path = str(tmp_path / "adapter.safetensors")
    adapters.save_adapter(path, ours, targets, r, alpha, rslora, cfg, adapters.base_fingerprint(ours))
    again = adapters.load_adapter(base_unet(), path, cfg)
    assert sorted(n for n, _ in lora.named_lora_layers(again)) == sorted(names)
    assert all((m.r, m.alpha, m.use_rslora, m.scaling) == (r, alpha, rslora, lora.lora_layers(ours)[0].scaling)
               for m in lora.lora_layers(again))
    assert_close(again(*INPUTS), ours.eval()(*INPUTS), atol=0, msg="adapter file round trip")

    for model, folder, expected_dropout in ((again, "from_file", 0.0), (ours, "trained", dropout)):
        out_dir = str(tmp_path / folder)
        adapters.export_peft(model, out_dir)
        config = json.load(open(os.path.join(out_dir, "adapter_config.json")))
        assert (sorted(config["target_modules"]), config["r"], config["lora_alpha"], config["use_rslora"],
                config["lora_dropout"]) == (sorted(names), r, alpha, rslora, expected_dropout)
        loaded = peft.PeftModel.from_pretrained(base_unet(), out_dir).eval()
        assert peft_wrapped(loaded) == set(names)
        layer = loaded.base_model.model.get_submodule(names[0])
        assert layer.scaling["default"] == pytest.approx(alpha / (r ** 0.5 if rslora else r))
        drop = layer.lora_dropout["default"]
        assert (drop.p if isinstance(drop, torch.nn.Dropout) else 0.0) == expected_dropout
        assert_close(loaded(*INPUTS), ours(*INPUTS), atol=1e-5, msg=f"{targets}: peft vs ours")
