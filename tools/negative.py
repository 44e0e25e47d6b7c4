"""What does a negative label do? `python tools/negative.py --n 200` draws n samples of each label
of --pairs (label:away), guided as usual (away from "no label") and then away from the paired
digit, from the same noise, and prints how evaluate.py's judge reads them: the label, the paired
digit, and all ten counts. The numbers of docs/sampling.md's "Negative label" section.
"""
import os  # isort:skip
import sys  # isort:skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's modules
sys.path.insert(0, ROOT)
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line

import torch

import evaluate
from config import DEFAULT_STEPS, MAX_IMAGES, SAMPLERS, SampleConfig
from diffusion import Diffusion
from harness.cli import Parser, run_cli
from harness.dist import pick_device
from harness.files import DEFAULT_CHECKPOINT, dataset_of, load_model, shipped_unless_trained
from harness.scripts import SampleError
from sample import generate


def parse_pairs(text, num_classes):
    """'7:1,9:4' -> [(7, 1), (9, 4)]: a label and the digit its guidance steers away from."""
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or not all(0 <= v < num_classes for v in p) or p[0] == p[1] for p in pairs):
        raise SampleError(f"--pairs {text!r}: expected label:away pairs of two different digits 0..{num_classes - 1}, "
                          "such as 7:1,9:4")
    if len(set(pairs)) != len(pairs):
        raise SampleError(f"--pairs {text!r}: a pair listed twice (each is n samples more)")
    return pairs


def main(argv=None):
    """The flags, the model and the judge; then, per pair and scale, the two readings."""
    p = Parser(prog="tools/negative.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"(default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--pairs", default="7:1,9:4,4:9", help="label:away pairs (default: 7:1,9:4,4:9)")
    p.add_argument("--guidance", default="1.5,2", help="comma-separated guidance scales w > 1 (default: 1.5,2)")
    p.add_argument("--n", type=int, default=200, help="samples per label and setting (default: 200)")
    p.add_argument("--sampler", default="ddim", help="as sample.py's; with its default steps (default: ddim)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--data-dir", default="data", help="MNIST root and classifier cache (default: data)")
    args = p.parse_args(argv)
    if args.sampler not in SAMPLERS:
        raise SampleError(f"--sampler {args.sampler!r}: choose from {', '.join(SAMPLERS)}")
    if not 1 <= args.n <= MAX_IMAGES:
        raise SampleError(f"--n {args.n}: must be between 1 and {MAX_IMAGES:,}")
    try:
        scales = [float(w) for w in args.guidance.split(",")]
    except ValueError:
        scales = []
    if len(set(scales)) != len(scales):
        raise SampleError(f"--guidance {args.guidance!r}: a scale listed twice (each is n samples more)")
    if not scales or not all(1 < w <= 100 for w in scales):
        raise SampleError(f"--guidance {args.guidance!r}: expected scales in (1, 100], such as 1.5,2 "
                          "(at w = 1 nothing is guided, so a negative label changes nothing)")
    model, diff_cfg, ckpt = load_model(shipped_unless_trained(args.checkpoint), pick_device(args.device))
    pairs = parse_pairs(args.pairs, model.cfg.num_classes)
    diffusion = Diffusion(diff_cfg, model.cfg.num_classes)
    _, _, dataset = evaluate.reference_digits(dataset_of(ckpt), args.data_dir)
    clf, _ = evaluate.get_classifier(dataset, args.data_dir)
    for label, away in pairs:
        for w in scales:
            for negative in (-1, away):
                scfg = SampleConfig(sampler=args.sampler, steps=min(DEFAULT_STEPS.get(args.sampler, 50), diffusion.T),
                                    guidance=w, negative=negative)
                x, _, _ = generate(model, diffusion, [label], args.n, scfg, progress=True)
                counts = torch.bincount(evaluate.classify(clf, x)[0].argmax(1).cpu(), minlength=10).tolist()
                print(f"label {label} w {w:g} away from {'no label' if negative < 0 else negative:>8}: read as "
                      f"{label} {counts[label]}/{args.n}, as {away} {counts[away]}/{args.n}, all {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
