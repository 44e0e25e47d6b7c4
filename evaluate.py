"""Does `--label 7` really draw a 7? `python evaluate.py --checkpoint runs/mnist/ckpt.pt`.

A small CNN digit classifier, trained once on real training digits and cached, judges
generated samples: label accuracy (overall and per digit) next to its accuracy on MNIST's
official 10,000 test digits, mean confidence, and the Frechet distance between generated and
real test digits in the classifier's penultimate features (FID's idea with an MNIST-sized
network), next to the same distance between two halves of real test digits -- the floor that
finite samples allow -- and next to the model's own training digits scored the same way.

Read top to bottom: the classifier, the measures, sampling and scoring a model, the LoRA
style comparison, the reports, the command line.
"""
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line
import glob
import os
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import MAX_IMAGES, SampleConfig
from dataset import apply_style, load_dataset
from harness.adapters import read_adapter
from harness.cli import Parser, run_cli
from harness.dist import pick_device
from harness.files import (CheckpointError, check_folder_data_dir, check_outputs, dataset_of, file_digest,
                           first_line, load_model, not_a_regular_file, output_folder, pyplot, read_csv,
                           remove_stale_temps, save_checkpoint, save_figure, shipped, shown, write_csv, write_json)
from harness.scripts import (SampleError, add_model_flags, add_sampling_flags, check_guidance_applies,
                             data_fingerprint, load_model_for_sampling, sample_config)
from sample import generate, model_sampling

MAX_SWEEP = 12           # guidance values per --sweep-guidance: each is a full evaluation
FOLDER_JUDGES = "data"      # where judges of folder datasets are cached (beside MNIST's, in ./data)
REFERENCE_PER_DIGIT = 200   # real test digits per label on the real side: halves of 1,000 for the floor
CLASSIFIER_VERSION = 3    # bump when the classifier, its training or its test set changes: invalidates caches


# ----- the classifier -----

class Classifier(nn.Module):
    """Two conv blocks and an MLP head; `features` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten())                                  # (B, 64*7*7)
        self.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def features(self, x):
        """x (B, 1, 28, 28) in [-1, 1] -> (B, 128)."""
        return self.fc(self.conv(x))

    def forward(self, x):
        return self.head(self.features(x))


def augment(x, generator):
    """Random shifts (up to 2 px), slants (shear up to +-0.45) and stroke widths (3x3
    dilation or erosion): the classifier must read bold and italic digits as well as plain ones,
    since it also judges LoRA-styled samples."""
    B = x.shape[0]
    u = lambda: torch.rand(B, generator=generator)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 1] = (u() - 0.5) * 0.9 * (u() < 0.5)                           # shear
    theta[:, :, 2] = (torch.rand(B, 2, generator=generator) - 0.5) * (4 / 14)  # +-2 px of 28
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x + 1, grid, padding_mode="zeros", align_corners=False) - 1
    width = u().view(B, 1, 1, 1)
    dilated, eroded = F.max_pool2d(x, 3, 1, 1), -F.max_pool2d(-x, 3, 1, 1)
    return torch.where(width < 0.25, dilated, torch.where(width > 0.9, eroded, x))


def train_classifier(x, y, epochs=12, batch_size=128, seed=0, progress=True):
    """Adam on augmented real digits; returns the classifier in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    batch_size = min(batch_size, len(x))
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(1, steps))
    clf.train()
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(clf(augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


@torch.inference_mode()
def classify(clf, x, batch_size=1000):
    """-> (probabilities (N, 10), features (N, 128)) for images in [-1, 1]. Non-finite outputs
    (a broken classifier; the images are checked on the way in) are an error, not a score."""
    probs, feats = [], []
    for chunk in x.split(batch_size):
        f = clf.features(chunk)
        feats.append(f)
        probs.append(clf.head(f).softmax(dim=1))
    probs, feats = torch.cat(probs), torch.cat(feats)
    if not (torch.isfinite(probs).all() and torch.isfinite(feats).all()):
        raise CheckpointError("the classifier gives non-finite outputs: its cached weights are broken "
                              "(delete the classifier_*.pt cache in --data-dir to train it again)")
    return probs, feats


def classifier_path(dataset, data_dir):
    """Where the judge is cached: in data_dir for MNIST; for a folder of your digits, in data/ under
    a digest of what the folder holds -- never inside it, and a changed folder gets a new judge."""
    if dataset != "folder":
        return os.path.join(data_dir, f"classifier_{dataset}_v{CLASSIFIER_VERSION}.pt")
    x, y, _ = load_dataset("folder", data_dir, verbose=False)
    digest = data_fingerprint(x, y)[:12]                 # the fingerprint a run records of its digits
    return os.path.join(FOLDER_JUDGES, f"classifier_folder-{digest}_v{CLASSIFIER_VERSION}.pt")


def judged_on(dataset):
    """What the judge's own accuracy was measured on (a folder has no test split)."""
    return "the folder's own digits, which also trained the judge" if dataset == "folder" else "real test digits"


def real_side(dataset):
    """The name of an evaluation's real digits: the test digits, or a folder's own (it has no test split)."""
    return "the folder's digits" if dataset == "folder" else "real test digits"


def get_classifier(dataset, data_dir, progress=True):
    """The classifier for `dataset`, trained once and cached (classifier_path); reports its accuracy
    on the test digits."""
    path = classifier_path(dataset, data_dir)
    if os.path.lexists(path):
        return load_classifier(path)
    remove_stale_temps([path])                          # a killed earlier training's
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    x, y, _ = load_dataset(dataset, data_dir, "train", verbose=False)
    clf = train_classifier(x, y, progress=progress)
    xt, yt, _ = load_dataset(dataset, data_dir, "test", verbose=False)
    acc = (classify(clf, xt)[0].argmax(1) == yt).float().mean().item()
    save_checkpoint(path, {"model": clf.state_dict(), "test_accuracy": acc})
    return clf, acc


def load_classifier(path):
    """A cached classifier -> (classifier in eval mode, its test accuracy). A cache that is not what
    get_classifier writes (unreadable, a FIFO, other keys, NaN weights) is refused in one line that
    names it -- deleting it trains a new one; it is never overwritten behind the user's back."""
    def broken(problem):
        return CheckpointError(f"{shown(path)}: a broken classifier cache ({problem}); delete it to train it again")
    kind = not_a_regular_file(path)
    if kind or not os.path.exists(path):
        raise broken(f"a {kind}" if kind else "a dangling link")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes, truncated, forbidden pickle globals, ...
        raise broken(f"unreadable: {first_line(e, 120)}") from e
    acc = saved.get("test_accuracy") if isinstance(saved, dict) else None
    if not (isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0 <= acc <= 1):
        raise broken("no test accuracy in [0, 1]")
    weights, clf = saved.get("model"), Classifier()
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise broken("no dict of weights")
    if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
        raise broken("non-finite weights")
    try:
        clf.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise broken("weights of another network") from e
    return clf.eval(), float(acc)


# ----- the measures -----


def reference_digits(dataset, data_dir, verbose=False):
    """The real side of an evaluation: a fixed, stratified 2,000 of MNIST's 10,000 test digits
    (the Frechet floor compares two halves of 1,000; all 10,000 would cost the judge ~10 s per
    evaluation on a CPU), or the whole folder of a folder dataset. -> (x, y, resolved name)."""
    x, y, name = load_dataset(dataset, data_dir, "test", verbose=verbose)
    if name == "folder":
        return x, y, name
    g = torch.Generator().manual_seed(0)
    pick = torch.cat([idx[torch.randperm(len(idx), generator=g)[:REFERENCE_PER_DIGIT]]
                      for idx in (torch.nonzero(y == d).flatten() for d in range(10))])
    return x[pick], y[pick], name


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("frechet_distance: the features hold non-finite values")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def evaluate_images(clf, x, y, real_x, real_y=None):
    """Accuracy, per-digit accuracy, confidence and Frechet distance of images x with labels y.
    Given the real digits' labels real_y, also the spread within a digit, over the images the
    judge reads as their label on both sides: a wrong digit would count as variety."""
    probs, feats = classify(clf, x)
    real_probs, real_feats = classify(clf, real_x)
    pred = probs.argmax(1)
    per_digit = {d: (pred[y == d] == d).float().mean().item() for d in range(10) if (y == d).any()}
    frechet = floor = None                     # a covariance needs two samples: one image has no Frechet distance
    halves = real_halves(real_feats)
    if len(x) >= 2:
        frechet, floor = frechet_vs_real(feats.numpy(), *halves)
    r = {
        "accuracy": (pred == y).float().mean().item(),
        "per_digit_accuracy": per_digit,
        "confidence": probs.gather(1, y[:, None]).mean().item(),
        "frechet": frechet, "frechet_floor": floor,
        "frechet_n": min(len(x), len(halves[0])),     # the floor's sample size (k real vs half the real set)
        "n": len(x),
    }
    if real_y is not None:
        right, real_right = pred == y, real_probs.argmax(1) == real_y
        r["spread"] = within_digit_spread(feats[right], y[right], real_feats[real_right], real_y[real_right])
    return r


def real_halves(real_feats, seed=0):
    """The features (M, D) of the real test set -> two fixed random halves A, B (numpy)."""
    perm = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(seed)).numpy()
    feats = real_feats.numpy()[perm]
    return feats[: len(feats) // 2], feats[len(feats) // 2:]


def frechet_vs_real(gen_feats, half_a, half_b):
    """-> (generated vs real half B, real half A vs real half B), both at the same sample size
    k = min(|A|, |generated|): the Frechet distance of finite samples grows as they shrink, so
    only equal sizes compare. The generated side is averaged over chunks of k samples."""
    k = min(len(half_a), len(gen_feats))
    gen_feats = gen_feats[np.random.default_rng(0).permutation(len(gen_feats))]  # mix the labels
    chunks = [gen_feats[i:i + k] for i in range(0, len(gen_feats) - k + 1, k)]
    return (float(np.mean([frechet_distance(c, half_b) for c in chunks])),
            frechet_distance(half_a[:k], half_b))


def within_digit_spread(feats, y, real_feats, real_y):
    """How varied the images of each digit are, next to real digits, from the judge's features
    (N, D) and (M, D): the mean over digits of tr Cov(features of the images of d) /
    tr Cov(features of the real digits d), a ratio of variances. 1 = as varied as real digits;
    below 1 the images of a digit look more alike than real ones do (guidance does that);
    0 = one image copied. Unlike the Frechet distance its expected value does not depend on
    the sample size (tr Cov is unbiased); a small one is only noisier. Digits with fewer than
    two images on either side (or no real variance) are skipped; None if none is left."""
    feats, real_feats = feats.double(), real_feats.double()
    ratios = []
    for d in range(10):
        own, real = feats[y == d], real_feats[real_y == d]                  # (n_d, D), (m_d, D)
        if len(own) >= 2 and len(real) >= 2 and real.var(0).sum() > 0:
            ratios.append(own.var(0).sum() / real.var(0).sum())
    return torch.stack(ratios).mean().item() if ratios else None


def style_measures(x):
    """Two classical handwriting measures of images (N, 1, 28, 28) in [-1, 1], averaged:
    ink   -- fraction of pixels above mid-grey (stroke thickness);
    slant -- -mu11 / mu02 of the intensity's second moments, as in deskewing
             (x shift per row; > 0 leans right);
    and two of how clean the strokes are (see stroke_measures): spur, edge."""
    w = ((x[:, 0] + 1) / 2).double()                                   # (N, 28, 28) in [0, 1]
    rows = torch.arange(28, dtype=torch.float64).view(1, 28, 1)
    cols = torch.arange(28, dtype=torch.float64).view(1, 1, 28)
    mass = w.sum(dim=(1, 2)).clamp(min=1e-8)
    r_mean = (w * rows).sum(dim=(1, 2)) / mass
    c_mean = (w * cols).sum(dim=(1, 2)) / mass
    dr, dc = rows - r_mean.view(-1, 1, 1), cols - c_mean.view(-1, 1, 1)
    mu11 = (w * dr * dc).sum(dim=(1, 2)) / mass
    mu02 = (w * dr * dr).sum(dim=(1, 2)) / mass
    return {"ink": (x > 0).double().mean().item(), "slant": (-mu11 / mu02.clamp(min=1e-8)).mean().item(),
            **stroke_measures(x)}


def stroke_measures(x):
    """How clean the strokes of images (N, 1, 28, 28) in [-1, 1] are, over all their pixels:
    spur -- share of ink pixels (above mid-grey) with at most one ink neighbour of eight: specks
            and whiskers (real digits: ~0.2%; real bold digits: 0%);
    edge -- share of the drawn area (above 5% grey) that is grey, not ink: a ragged or blurred
            rim (real digits: 27%; real bold digits: 15%)."""
    ink, drawn = x[:, 0] > 0, x[:, 0] > -0.9                            # (N, 28, 28)
    ring = torch.ones(1, 1, 3, 3, dtype=torch.float32)
    ring[0, 0, 1, 1] = 0
    neighbours = torch.nn.functional.conv2d(ink[:, None].float(), ring, padding=1)[:, 0]
    spur = (ink & (neighbours <= 1)).sum() / ink.sum().clamp(min=1)
    edge = (drawn & ~ink).sum() / drawn.sum().clamp(min=1)
    return {"spur": spur.item(), "edge": edge.item()}


# ----- sampling and scoring a model -----


def evaluate_model(model, diffusion, clf, real_x, n, scfg, batch=200, real_y=None):
    """Sample n per digit from the model and score them (see evaluate_images); adds sampling time.
    Chunks of `batch` images, chunk i seeded with scfg.seed + i (fresh noise per chunk)."""
    labels = list(range(10))
    t0 = time.perf_counter()
    xs, ys = [], []
    per_chunk = max(1, batch // 10)
    starts = range(0, n, per_chunk)
    for i, start in enumerate(tqdm(starts, desc="sampling", unit="chunk", disable=None if len(starts) > 1 else True)):
        x, y, _ = generate(model, diffusion, labels, min(per_chunk, n - start), replace(scfg, seed=scfg.seed + i))
        xs.append(x.cpu())
        ys.append(y.cpu())
    seconds = time.perf_counter() - t0
    x, y = torch.cat(xs), torch.cat(ys)
    return {**evaluate_images(clf, x, y, real_x, real_y), "sampling_seconds": seconds}, x, y


def training_reference(dataset, data_dir, n, clf, real_x, real_y, finetuned=None):
    """The model's own training digits, n per digit, scored as if generated: what a model that drew
    its training data back exactly would score -- the best it can reach against the test digits
    (training and test digits differ a little, so this is not the floor). finetuned: a --full
    fine-tune's record {"style", "style_dir"}: its digits are the styled ones (or the user's)."""
    if finetuned and finetuned["style"] == "folder":
        if not os.path.isdir(finetuned["style_dir"]):
            return None                                    # the user's folder moved: no row, said in main
        x, y, _ = load_dataset("folder", finetuned["style_dir"])
    else:
        x, y, _ = load_dataset(dataset, data_dir, "train", verbose=False)
        x = apply_style(x, finetuned["style"]) if finetuned else x
    g = torch.Generator().manual_seed(0)
    pick = torch.cat([idx[torch.randperm(len(idx), generator=g)[:n]]
                      for idx in (torch.nonzero(y == d).flatten() for d in range(10))])
    return evaluate_images(clf, x[pick], y[pick], real_x, real_y)


def print_training_reference(ref, finetuned):
    """The training-digit row of the report, naming the digits a --full fine-tune was tuned on."""
    style = finetuned and finetuned["style"]
    tuned_on = (f" (the digits in {finetuned['style_dir']} it was fine-tuned on)" if style == "folder" else
                f" (the {style} digits it was fine-tuned on)" if style else "")
    if ref is None:
        print(f"its training digits{tuned_on}: not there any more, so no reference row")
        return
    print(f"its training digits{tuned_on}, scored the same way (the best a model can reach): accuracy "
          f"{100 * ref['accuracy']:.2f}% | Frechet {ref['frechet']:.2f} ({ref['frechet'] / ref['frechet_floor']:.2f}x "
          f"the floor at n={ref['frechet_n']:,}) | spread {spread_text(ref['spread'])}")


# ----- the LoRA style comparison -----


def styled_reference(style, dataset, data_dir, folder=None):
    """Real test digits in the adapter's style (or the user's folder): the style target."""
    if style == "folder":
        if folder is None:
            raise SampleError("this adapter was trained on a folder of digits: pass it as --style-dir")
        return load_dataset("folder", folder)[0]
    return apply_style(reference_digits(dataset, data_dir)[0], style)


def print_style_table(rows, style):
    """rows: name -> {"accuracy", "ink", "slant"}; the share of the way the tuned model moved."""
    print(f"{'':<22}{'accuracy':>9}{'ink':>8}{'slant':>8}{'spur %':>8}{'edge %':>8}")
    for name, r in rows.items():
        acc = f"{100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else "-"
        print(f"{name:<22}{acc:>9}{r['ink']:8.3f}{r['slant']:8.3f}{100 * r['spur']:8.2f}{100 * r['edge']:8.1f}")
    base, tuned, target = rows["base model"], rows["fine-tuned model"], rows[f"real {style} digits"]
    shift = {m: (tuned[m] - base[m]) / (target[m] - base[m]) if abs(target[m] - base[m]) > 1e-9 else float("nan")
             for m in ("ink", "slant")}
    print(f"style shift, base -> target: ink {100 * shift['ink']:.0f}%, slant {100 * shift['slant']:.0f}%")
    if "frechet_styled" in tuned:
        print(f"Frechet to the real {style} digits: base {base['frechet_styled']:.1f}, fine-tuned "
              f"{tuned['frechet_styled']:.1f} ({tuned['frechet_styled'] / tuned['frechet_styled_floor']:.2f}x their "
              f"real-vs-real floor {tuned['frechet_styled_floor']:.1f})")
    return shift


def style_evaluation(base_model, tuned, diffusion, dataset, style, data_dir, n, scfg, folder=None):
    """Accuracy and style measures of base and fine-tuned samples next to real (styled) digits.
    data_dir: the MNIST root and classifier cache; folder: the user's digits, for style "folder"."""
    clf, _ = get_classifier(dataset, data_dir)
    real_x, real_y, dataset = reference_digits(dataset, data_dir)
    styled = styled_reference(style, dataset, data_dir, folder)
    rows = {real_side(dataset): {**style_measures(real_x), "accuracy": evaluate_images(clf, real_x, real_y, real_x)["accuracy"]},
            f"real {style} digits": {**style_measures(styled), "accuracy": None}}
    if style != "folder":
        rows[f"real {style} digits"]["accuracy"] = evaluate_images(clf, styled, real_y, real_x)["accuracy"]
    styled_halves = real_halves(classify(clf, styled)[1]) if len(styled) >= 8 else None   # the style's floor
    for name, model in (("base model", base_model), ("fine-tuned model", tuned)):
        r, x, _ = evaluate_model(model.eval(), diffusion, clf, real_x, n, scfg)
        rows[name] = {**style_measures(x), "accuracy": r["accuracy"], "frechet": r["frechet"]}
        if styled_halves is not None and len(x) >= 2:          # how close to the real styled digits
            rows[name]["frechet_styled"], rows[name]["frechet_styled_floor"] = frechet_vs_real(
                classify(clf, x)[1].numpy(), *styled_halves)
    shift = print_style_table(rows, style)
    return {"rows": rows, "shift": shift}


def adapter_style(args):
    """The style the LoRA comparison targets: the first adapter's. --style-dir is read exactly when
    that adapter learned a folder of digits, and never by a --sweep-guidance (which replaces it)."""
    style = read_adapter(args.lora[0])[1].get("style") or "bold"
    if args.style_dir and args.sweep_guidance:
        raise SampleError("--style-dir is read by the LoRA style comparison, which --sweep-guidance replaces; drop one")
    if args.style_dir and style != "folder":
        raise SampleError(f"--style-dir: {args.lora[0]} learned the built-in {style} style, which is its target; "
                          "drop --style-dir")
    if style == "folder" and not args.style_dir and not args.sweep_guidance:
        raise SampleError("this adapter was trained on a folder of digits: pass it as --style-dir")
    return style


def lora_comparison(args, tuned, diffusion, dataset, scfg):
    """evaluate.py --lora: the adapted model against the base model and the styled real data
    (the style of the first adapter)."""
    style = adapter_style(args)
    if len(args.lora) > 1:                                # composed adapters: one target, said so
        print(f"{len(args.lora)} adapters, composed: their samples are compared with the first one's style, {style}")
    base_model = load_model(args.checkpoint, diffusion.betas.device)[0]
    return style_evaluation(base_model, tuned, diffusion, dataset, style, args.data_dir, args.n, scfg,
                            folder=args.style_dir)


# ----- reports -----


def print_report(r, clf_acc, dataset):
    """Generated accuracy next to the judge's on real test digits (as close as a model can get),
    per digit; Frechet next to its real-vs-real floor at the same sample size; the spread."""
    print(f"{'digit':>6} " + " ".join(f"{d:>5}" for d in range(10)))
    print(f"{'acc %':>6} " + " ".join(f"{100 * r['per_digit_accuracy'][d]:5.1f}"
                                     for d in range(10) if d in r['per_digit_accuracy']))
    frechet = ("Frechet n/a (needs >= 2 images)" if r["frechet"] is None else
               f"Frechet {r['frechet']:.2f} vs real-vs-real floor {r['frechet_floor']:.2f} at n={r['frechet_n']:,} "
               f"({r['frechet'] / r['frechet_floor']:.2f}x)")
    print(f"accuracy {100 * r['accuracy']:.2f}% ({judged_on(dataset)}: {100 * clf_acc:.2f}%) | "
          f"confidence {r['confidence']:.3f} | n={r['n']:,}"
          + (f" | sampling {r['sampling_seconds']:.1f}s" if "sampling_seconds" in r else ""))
    print(frechet)
    if "spread" in r:
        print(f"spread within a digit: {spread_text(r['spread'])}")


def spread_text(spread):
    """within_digit_spread's value as the reports print it."""
    return ("n/a (no digit with two images the judge reads right, on both sides)" if spread is None
            else f"{spread:.2f} (1 = real digits' variance)")


def save_sweep_figure(sweep, path):
    """Accuracy, spread within a digit and Frechet distance against the guidance scale: the
    quality/diversity trade-off."""
    plt = pyplot()
    w = [s["guidance"] for s in sweep]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(w, [s["accuracy"] for s in sweep], "o-", color="C0", label="label accuracy")
    spread = [(g, s["spread"]) for g, s in zip(w, sweep) if s.get("spread") is not None]
    if spread:
        ax1.plot(*zip(*spread), "^-", color="C2", label="spread within a digit (real = 1)")
        ax1.legend(loc="center right", bbox_to_anchor=(1.0, 0.72), fontsize=8)
    ax1.set(xlabel="guidance scale w", ylabel="accuracy (0-1), spread", ylim=(0, None))
    ax2 = ax1.twinx()
    ax2.plot(w, [s["frechet"] for s in sweep], "s--", color="C1")
    ax2.plot(w, [s["frechet_floor"] for s in sweep], ":", color="C1", lw=0.8)
    ax2.set_ylabel("Frechet distance (dotted: real floor)", color="C1")
    ax1.set_title("classifier-free guidance: accuracy vs. diversity")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)



def read_npz(path):
    """An npz of `images` and `labels`, as `sample.py --npz` saves them -> (images (N, 1, 28, 28)
    in [-1, 1], labels (N,) long). Pixels: uint8 0..255 (or another integer type in 0..255),
    or floats in [0, 1]; shape (N, 28, 28) or (N, 1, 28, 28); labels integers 0..9, one per
    image. Anything else is refused in one line that says what is wrong."""
    kind = not_a_regular_file(path)
    if kind:                                  # a FIFO would block np.load forever
        raise SampleError(f"{shown(path)}: is a {kind}, not an npz file")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # missing, empty, random bytes, pickled objects: np.load raises many types
        why = "pickled objects are never loaded" if "pickle" in str(e) else first_line(e)
        raise SampleError(f"{shown(path)}: not an npz of images and labels as `sample.py --npz` writes ({why})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise SampleError(f"{shown(path)}: a plain array, not an npz of images and labels "
                          "(np.savez(path, images=..., labels=...))")
    with f:
        if not {"images", "labels"} <= set(f.files):
            raise SampleError(f"{shown(path)}: needs arrays 'images' and 'labels', has {sorted(f.files)}")
        try:
            images, labels = f["images"], f["labels"]
        except Exception as e:  # object arrays (pickles), truncated members
            raise SampleError(f"{shown(path)}: unreadable arrays ({first_line(e)})") from e
    return npz_images(images, path), npz_labels(labels, len(images), path)


def npz_images(a, path):
    """Pixel array -> float (N, 1, 28, 28) in [-1, 1], or a SampleError saying which rule it breaks."""
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3 or a.shape[1:] != (28, 28) or not 1 <= len(a) <= MAX_IMAGES:
        raise SampleError(f"{shown(path)}: images of shape {a.shape}; expected (N, 28, 28) or (N, 1, 28, 28) "
                          f"with 1 <= N <= {MAX_IMAGES:,}")
    if a.dtype.kind in "iu":                          # uint8 as sample.py saves it, or wider integers
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise SampleError(f"{shown(path)}: {a.dtype} pixels in {lo}..{hi}; expected 0..255")
        return torch.from_numpy(a.astype(np.float32))[:, None] / 127.5 - 1
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise SampleError(f"{shown(path)}: images hold non-finite values (nan or inf)")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            hint = (" (images in [-1, 1]? save (x + 1) / 2)" if lo >= -1 and hi <= 1 else
                    " (pixels 0..255? save them as uint8)" if lo >= 0 and hi <= 255 else "")
            raise SampleError(f"{shown(path)}: {a.dtype} pixels in [{lo:.3g}, {hi:.3g}]; expected floats in [0, 1] "
                              f"or uint8 0..255{hint}")
        return torch.from_numpy(a.astype(np.float32))[:, None] * 2 - 1
    raise SampleError(f"{shown(path)}: images of dtype {a.dtype}; expected uint8 0..255 or floats in [0, 1]")


def npz_labels(a, n, path):
    """Label array -> long (n,) in 0..9, or a SampleError."""
    if a.shape != (n,):
        raise SampleError(f"{shown(path)}: labels of shape {a.shape}; expected ({n},), one per image")
    if a.dtype.kind not in "iu":
        raise SampleError(f"{shown(path)}: labels of dtype {a.dtype}; expected integers 0..9")
    if a.min() < 0 or a.max() > 9:
        raise SampleError(f"{shown(path)}: labels in {a.min()}..{a.max()}; expected digits 0..9")
    return torch.from_numpy(a.astype(np.int64))


# ----- the command line -----


class QualityCurve:
    """--eval-every N: every N steps a quick evaluation of the EMA weights, so that one run
    shows how quality grows with training. 10 samples per digit with DDIM 20 steps (100
    images, ~10 s on 2 CPU cores): accuracy to a few %, and the Frechet distance against the
    real-vs-real floor at the same n (100). Rows go to eval_curve.csv, the figure to
    eval_curve.png; a resumed run keeps the rows it had."""
    N_PER_DIGIT, STEPS = 10, 20
    FIELDS = ("step", "images", "train_minutes", "accuracy", "frechet", "floor", "frechet_ratio", "eval_seconds")

    def __init__(self, dataset, data_dir, out, images_per_step, resume_step=0):
        self.clf, _ = get_classifier(dataset, data_dir)
        real_x = reference_digits(dataset, data_dir)[0]
        self.halves = real_halves(classify(self.clf, real_x)[1])
        self.csv, self.png = os.path.join(out, "eval_curve.csv"), os.path.join(out, "eval_curve.png")
        self.images_per_step = images_per_step
        self.rows = [r for r in read_csv(self.csv) if int(r["step"]) <= resume_step] if resume_step else []
        self.minutes_before = float(self.rows[-1]["train_minutes"]) if self.rows else 0.0
        self.eval_seconds = 0.0                  # spent here: not training time

    def __call__(self, step, model, diffusion, seconds_since_start):
        t0 = time.perf_counter()
        x, y, _ = generate(model.eval(), diffusion, list(range(10)), self.N_PER_DIGIT,
                           model_sampling(diffusion.cfg, steps=self.STEPS))
        probs, feats = classify(self.clf, x.cpu())
        frechet, floor = frechet_vs_real(feats.numpy(), *self.halves)
        spent = time.perf_counter() - t0
        minutes = self.minutes_before + (seconds_since_start - self.eval_seconds) / 60
        self.eval_seconds += spent
        self.rows.append({"step": step, "images": step * self.images_per_step, "train_minutes": round(minutes, 3),
                          "accuracy": (probs.argmax(1) == y.cpu()).float().mean().item(), "frechet": frechet,
                          "floor": floor, "frechet_ratio": frechet / floor, "eval_seconds": round(spent, 2)})
        write_csv(self.csv, self.FIELDS, self.rows)
        save_curve_figure(self.rows, self.png)


def save_curve_figure(rows, path):
    """Accuracy and Frechet / floor against training images (top axis: training minutes)."""
    plt = pyplot()
    images = [int(r["images"]) / 1000 for r in rows]
    minutes = [float(r["train_minutes"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(images, [100 * float(r["accuracy"]) for r in rows], "o-")
    ax1.set(xlabel="training images (thousands)", ylabel="judge accuracy (%)", ylim=(0, 102))
    ax2.plot(images, [float(r["frechet_ratio"]) for r in rows], "s-", color="C1")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax2.set(xlabel="training images (thousands)", ylabel="Frechet / real-vs-real floor", yscale="log")
    if images[-1] > 0 and minutes[-1] > 0:          # training minutes as a top axis
        per = minutes[-1] / images[-1]
        for ax in (ax1, ax2):
            top = ax.secondary_xaxis("top", functions=(lambda k: k * per, lambda m: m / per))
            top.set_xlabel("training minutes", fontsize=8)
    fig.suptitle(f"quality while training (EMA weights, {QualityCurve.N_PER_DIGIT} per digit, "
                 f"DDIM {QualityCurve.STEPS})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def final_evaluation(model, diffusion, dataset, tcfg):
    """Score the EMA weights with this file's classifier, so every run says how good it is."""
    clf, clf_acc = get_classifier(dataset, tcfg.data_dir)
    real_x, real_y, _ = reference_digits(dataset, tcfg.data_dir)
    r, _, _ = evaluate_model(model.eval(), diffusion, clf, real_x, tcfg.eval_n, model_sampling(diffusion.cfg),
                             real_y=real_y)
    print(f"final evaluation ({tcfg.eval_n} samples per digit; `python evaluate.py` for the full one):")
    print_report(r, clf_acc, dataset)


def adapter_name(path):
    """An adapter as an output name shows it: its folder and file name (every run's adapter is
    called adapter.safetensors), e.g. runs/lora-italic/adapter.safetensors -> lora-italic-adapter."""
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}-{os.path.splitext(os.path.basename(path))[0]}"


def parse_args(argv=None):
    p = Parser(description="Measure how well generated digits match their labels and real data.")
    p.add_argument("--n", type=int, default=100,
                   help=f"samples per digit (default: 100; at most {MAX_IMAGES // 10:,})")
    p.add_argument("--npz", default=None, help="evaluate images/labels saved by `sample.py --npz` instead")
    p.add_argument("--dataset", default=None,
                   help="real data for the classifier and the floor (default: the checkpoint's)")
    p.add_argument("--data-dir", default="data", help="MNIST root and classifier cache (default: data)")
    p.add_argument("--sweep-guidance", default=None,
                   help="comma-separated guidance scales, e.g. 0,1,2,3,5: writes a trade-off figure")
    p.add_argument("--style-dir", default=None, help="with --lora of a folder-trained adapter: that folder")
    p.add_argument("--json", default=None, help="where to write the results (default: next to what is scored: "
                   "the npz, the --lora adapter (<A>+<B> for two), or the checkpoint, as <name>_eval.json)")
    add_model_flags(p)
    add_sampling_flags(p)
    args = p.parse_args(argv)
    if args.npz:                                  # saved images: nothing is sampled, no model is loaded
        unused = ["n", "sweep_guidance", "lora", "lora_scale", "merge", "style_dir", "checkpoint",
                  *(f.name for f in fields(SampleConfig) if hasattr(args, f.name))]
        given = [f"--{d.replace('_', '-')}" for d in unused if getattr(args, d) != p.get_default(d)]
        if given:
            raise SampleError(f"--npz scores images already drawn: {', '.join(given)} would change nothing "
                              "(drop them, or score a checkpoint without --npz)")
    return args


def check_flags(args):
    """The flags that need no model, checked before any work. -> the --sweep-guidance scales."""
    if not 1 <= args.n <= MAX_IMAGES // 10:
        raise SampleError(f"--n {args.n}: must be between 1 and {MAX_IMAGES // 10:,} per digit")
    try:
        scales = [float(s) for s in args.sweep_guidance.split(",")] if args.sweep_guidance is not None else []
    except ValueError:
        raise SampleError(f"--sweep-guidance {shown(args.sweep_guidance)}: expected numbers like 0,1,2,3,5") from None
    twice = sorted({w for w in scales if scales.count(w) > 1})
    if twice:
        raise SampleError(f"--sweep-guidance {args.sweep_guidance}: {', '.join(f'{w:g}' for w in twice)} listed twice "
                          "(each is a full evaluation)")
    if len(scales) > MAX_SWEEP:
        raise SampleError(f"--sweep-guidance: {len(scales)} values; at most {MAX_SWEEP} (each is a full evaluation)")
    if args.style_dir and not args.lora:
        raise SampleError("--style-dir names the folder a --lora adapter learned from: give --lora FILE (or drop it)")
    if scales and args.guidance is not None:
        raise SampleError(f"--guidance {args.guidance} with --sweep-guidance: the sweep sets the guidance; drop one")
    return scales


def check_sweep_guides(args, sweep_cfgs, diff_cfg):
    """A sweep's --negative, --guidance-rescale and guidance interval act at the scales that guide a
    step: refused when none of the swept scales does (e.g. --sweep-guidance 1)."""
    errors = []
    for cfg in sweep_cfgs:
        try:
            return check_guidance_applies(cfg, diff_cfg)
        except SampleError as e:
            errors.append(e)
    if errors:
        raise SampleError(f"--sweep-guidance {args.sweep_guidance}: {errors[0]}")


def sampling_record(scfg, diffusion, swept):
    """What ran, for the JSON: DDPM's steps are the model's T; a sweep has no single guidance; the
    --negative digit itself is drawn unguided (out(neg) + w (out(neg) - out(neg)) = out(neg))."""
    record = {**asdict(scfg), "steps": len(diffusion.timesteps(scfg))}
    if swept:
        del record["guidance"]
    if scfg.negative >= 0:
        record["unguided_digits"] = [scfg.negative]
        print(f"note: digit {scfg.negative} is the --negative label too, so its samples are drawn without "
              "guidance (its row is the plain conditional model)")
    return record


def output_paths(args, scales):
    """-> (the JSON, the sweep figure or None, whether their folder is runs/weights/ still to make):
    beside what is scored (the npz, the --lora adapter (<A>+<B> for two), or the checkpoint)."""
    scored = args.npz or (args.lora[0] if args.lora else args.checkpoint)
    base = os.path.join(output_folder(scored), os.path.splitext(os.path.basename(scored))[0])
    base += "".join("+" + adapter_name(a) for a in (args.lora or [])[1:])   # A+B
    out = args.json or base + "_eval.json"
    sweep_png = os.path.splitext(args.json or base)[0] + "_guidance_sweep.png" if scales and not args.npz else None
    return out, sweep_png, not args.json and shipped(scored)


def main(argv=None):
    args = parse_args(argv)
    scales = check_flags(args)
    device = pick_device(args.device)
    model = None
    if args.npz is None:
        model, diffusion, ckpt = load_model_for_sampling(args, device)
        scfg = sample_config(args, diffusion.cfg, model.cfg.num_classes)
        sweep_cfgs = [sample_config(args, diffusion.cfg, model.cfg.num_classes, guidance=w) for w in scales]
        check_sweep_guides(args, sweep_cfgs, diffusion.cfg)
        dataset = args.dataset or dataset_of(ckpt)
        if dataset == "folder":
            check_folder_data_dir(ckpt, args.data_dir)    # its digits: named, before any work
        if args.lora:
            adapter_style(args)                           # --style-dir read, or refused, before any work
    else:
        x, y = read_npz(args.npz)
        dataset = args.dataset or "auto"
    out, sweep_png, new_folder = output_paths(args, scales)
    check_outputs({"--json": out, "--sweep-guidance figure": sweep_png},         # before any work
                  {"--checkpoint": None if args.npz else args.checkpoint, "--lora adapter": args.lora,
                   "--npz": args.npz, "classifier": glob.glob(os.path.join(args.data_dir, "classifier_*.pt"))},
                  {"--style-dir": args.style_dir, "--data-dir": args.data_dir if dataset == "folder" else None},
                  create=new_folder)
    if not out.lower().endswith(".json"):               # e.g. a run's figure: not a report's name
        raise SampleError(f"--json {shown(out)}: evaluate.py writes JSON there; give a name ending in .json")
    if new_folder:
        os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_stale_temps([out, sweep_png])                 # a killed earlier run's, of these names only
    real_x, real_y, dataset = reference_digits(dataset, args.data_dir, verbose=True)
    clf, clf_acc = get_classifier(dataset, args.data_dir)
    results = {"dataset": dataset, "classifier_accuracy": clf_acc, "classifier_judged_on": judged_on(dataset)}
    if not args.npz:                                      # what was scored, so a result names its inputs
        results.update(checkpoint=os.path.abspath(args.checkpoint), checkpoint_sha256=file_digest(args.checkpoint),
                       adapters=[os.path.abspath(a) for a in args.lora],
                       lora_scale=args.lora_scale or [1.0] * len(args.lora))      # the scales applied
        results["sampling"] = sampling_record(scfg, diffusion, swept=bool(scales))

    if args.npz:
        results.update(evaluate_images(clf, x, y, real_x, real_y))
        print_report(results, clf_acc, dataset)
    elif scales:
        sweep = []
        for w, cfg in zip(scales, sweep_cfgs):
            r, _, _ = evaluate_model(model, diffusion, clf, real_x, args.n, cfg, real_y=real_y)
            print(f"guidance {w}: accuracy {100 * r['accuracy']:.2f}%, Frechet {r['frechet']:.2f}, "
                  f"spread {spread_text(r['spread'])}")
            sweep.append({"guidance": w, **r})
        results["sweep"] = sweep
    elif args.lora:
        results["lora"] = lora_comparison(args, model, diffusion, dataset, scfg)
    else:
        r, x, _ = evaluate_model(model, diffusion, clf, real_x, args.n, scfg, real_y=real_y)
        results.update(r, style=style_measures(x), real_style=style_measures(real_x))
        print_report(results, clf_acc, dataset)
        finetuned = results["finetuned"] = ckpt.get("finetuned")     # a --full fine-tune: the digits it was tuned on
        if dataset == "folder" and not finetuned:      # its training digits are the real side itself
            results["training_digits"] = None
            print("its training digits: the folder's digits, which are also the real side here (a folder has no "
                  "test split), so no reference row")
        else:
            ref = results["training_digits"] = training_reference(dataset, args.data_dir, args.n, clf, real_x,
                                                                  real_y, finetuned)
            print_training_reference(ref, finetuned)
        print(f"style: generated ink {results['style']['ink']:.3f} slant {results['style']['slant']:.3f} | "
              f"{real_side(dataset)}: ink {results['real_style']['ink']:.3f} slant {results['real_style']['slant']:.3f}")

    write_json(out, results)                             # the numbers first: a figure that fails costs none
    print(out)
    if sweep_png:
        save_sweep_figure(results["sweep"], sweep_png)
        print(sweep_png)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
