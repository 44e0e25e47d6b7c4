"""Teach the pretrained model a new handwriting style with LoRA: `python lora_finetune.py`.

Load the EMA weights written by `python train.py`, replace layers by LoraLayers (lora.py), freeze
everything else and train only A and B -- with train.py's own loop -- on styled digits the base
model never saw (bold or italic versions of the training split, or your own folder of digits).
Writes the adapter (safetensors), a loss curve, base-vs-LoRA samples, a strength sweep and what
LoRA learned per layer.

Which layers, and how, is each style's recipe (config.STYLE_RECIPES; a flag given wins). Italic
and your own digits start from the article's form: W_q, W_k, W_v of the cross-attention
(nn.Linear, `--targets qkv`) at rank 4. Bold must also keep a stroke's rim as sharp as real bold
digits', which the 3x3 convolutions draw at low noise: every layer at rank 8 (`--targets all`),
trained on uniform timesteps. Italic is a shear that lives in the convolutions too: the best
italic run measured is BEST_ITALIC (docs/lora.md). `--full` fine-tunes every weight: the baseline.
"""
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line
import os
import shlex
import sys
import time
from dataclasses import asdict

import torch

import lora
import visualize
from diffusion import Diffusion
from evaluate import style_evaluation
from harness.adapters import save_adapter
from harness.cli import run_cli
from harness.files import load_model, save_checkpoint
from harness.run import after_fit, flag, loop_state_dict
from harness.scripts import open_finetune
from sample import model_sampling
from train import fit, new_loop_state

# The italic run that moved the slant furthest in our measurements (docs/lora.md).
BEST_ITALIC = "python lora_finetune.py --style italic --targets all --r 8 --alpha 8 --lr 4e-3 --steps 1680"


def main(argv=None):
    """Set up (harness), load the base, add LoRA, train A and B only, save the adapter, report."""
    s = open_finetune(argv)       # flags -> configs; run folder checked and locked
    with s.run:                   # one writer in the run folder until the run ends, however it ends
        model, diff_cfg, base_ckpt = load_model(s.args.checkpoint, s.device)    # the base's EMA weights
        s.prepare_data(base_ckpt)                     # its training digits, styled, on the device
        lcfg, tcfg = s.lcfg, s.tcfg
        if lcfg.full:                                 # the baseline: every weight trains
            for p in model.parameters():
                p.requires_grad_(True)
        else:                                         # W frozen; y = W x + (alpha / r) B A x
            lora.inject_lora(model, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.lora_dropout, lcfg.rslora)
            lora.mark_only_lora_trainable(model)
            lora.set_fused(model, lcfg.fused)
        model.to(memory_format=s.memory_format).train()
        params = [p for p in model.parameters() if p.requires_grad]      # A and B (--full: all)
        diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(s.device)
        groups = params if lcfg.full else lora.param_groups(model, tcfg.lr, lcfg.lr_ratio_b)
        state = new_loop_state(model, groups, tcfg, len(s.x))
        trained = (lambda m: m.state_dict()) if lcfg.full else lora.lora_state_dict
        s.begin(model, state, params, trained)        # --resume: checked against this base, then loaded

        def save(state):          # only the trained tensors: a LoRA checkpoint is a few KiB
            save_checkpoint(s.ckpt_path, {"model": trained(model), "ema": trained(state["ema"].module),
                                          "config": s.config, "base_fingerprint": s.fingerprint,
                                          "data_fingerprint": s.data_fingerprint, "figures": s.args.figures,
                                          **loop_state_dict(state)})

        kind = "full" if lcfg.full else "lora"
        s.run.start_fresh()       # --overwrite: the earlier run's files go only now, everything loaded
        t0 = time.perf_counter()
        outcome = fit(model, diffusion, (s.x, s.y), tcfg, state, save, s.dist, params, desc=kind)
        seconds = time.perf_counter() - t0
        code = after_fit(outcome, state, s.dist, model, tcfg.out, f"{kind} fine-tuning loss", s.resume_hint,
                         s.args.figures)
        if code is not None:      # another rank, or Ctrl-C (the checkpoint is saved)
            return code
        tuned = state["ema"].module.eval()
        if lcfg.full:                                 # a checkpoint sample.py reads like train.py's
            out_file = s.save_full_model(tuned, base_ckpt, state["step"])
        else:                                         # the adapter: only A and B, and what fits them
            out_file = os.path.join(tcfg.out, "adapter.safetensors")
            save_adapter(out_file, tuned, lcfg.targets, lcfg.r, lcfg.alpha, lcfg.rslora, base_ckpt["config"]["model"],
                         s.fingerprint, style=lcfg.style)
            s.export_peft(tuned)                      # with --export-peft: <out>/peft for Hugging Face peft
        summary = s.start_summary(out_file, state["step"], seconds)          # printed, and kept for summary.json
        summary.update(report(s, tuned, diffusion))
        s.write_summary(summary)
    return 0


def best_italic_command(checkpoint, out):
    """BEST_ITALIC on this base, into a folder that does not exist yet: it runs as printed."""
    stem = out.rstrip("/") + "-all-r8"
    new = next(name for name in (stem, *(f"{stem}-{i}" for i in range(1, 10 ** 6))) if not os.path.lexists(name))
    return shlex.join([*shlex.split(BEST_ITALIC), *flag("--checkpoint", os.path.abspath(checkpoint)), *flag("--out", new)])


def report(s, tuned, diffusion):
    """Figures (with --figures) and the style evaluation (--eval-n) of the tuned model against
    the base. -> what goes into summary.json besides sizes and speed."""
    lcfg, tcfg, extra = s.lcfg, s.tcfg, {}
    if not lcfg.full:
        extra["update"] = lora.update_stats(tuned)     # per layer: |dW| / |W| and dW's singular values
    base_model = load_model(s.args.checkpoint, s.device)[0]
    if s.args.figures:
        visualize.finetune_figures(base_model, tuned, diffusion, tcfg.out, lcfg)
    if tcfg.eval_n:
        scfg = model_sampling(diffusion.cfg)                          # the base's own sampling
        extra["sampling"] = asdict(scfg)
        extra["evaluation"] = style_evaluation(base_model, tuned, diffusion, s.base_data, lcfg.style,
                                               tcfg.data_dir, tcfg.eval_n, scfg, folder=lcfg.style_dir or None)
        slant = extra["evaluation"]["shift"]["slant"]
        adapts_convs = any(isinstance(layer.base, torch.nn.Conv2d) for layer in lora.lora_layers(tuned))
        if lcfg.style == "italic" and not lcfg.full and slant < 0.8 and not adapts_convs:
            command = best_italic_command(s.args.checkpoint, tcfg.out)
            print(f"slant shift {100 * slant:.0f}% < 80%: a slant is a geometric change that lives in the "
                  f"convolutions, not in attention; try `{command}` (measured: 88% on the default base)")
    return extra


if __name__ == "__main__":
    sys.exit(run_cli(main))
