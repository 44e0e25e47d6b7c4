"""The measuring instruments: Frechet distance, the classifier, style measures."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import torch
from conftest import TINY_FLAGS, run_cli

import evaluate
from dataset import apply_style, load_dataset


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    assert abs(evaluate.frechet_distance(a, a)) < 1e-6
    d1, d2 = evaluate.frechet_distance(a, a + 0.5), evaluate.frechet_distance(a, a + 1.0)
    assert abs(d1 - 8 * 0.25) < 1e-6 and abs(d2 - 8 * 1.0) < 1e-6     # |mu shift|^2
    assert evaluate.frechet_distance(a, 2 * a) > 1.0                   # covariance change counts too


def test_classifier_beats_chance_after_a_few_steps():
    x, y, _ = load_dataset("mnist-5k", split="train")
    x, y = x[:640], y[:640]
    clf = evaluate.train_classifier(x, y, epochs=2, batch_size=64, progress=False)
    acc = (evaluate.classify(clf, x)[0].argmax(1) == y).float().mean().item()
    assert acc > 0.5, acc


def test_npz_of_real_test_digits_scores_high(tmp_path):
    """A quickly trained classifier, cached where evaluate.py looks, rates real test digits highly:
    evaluate.py's own 2,000 reference digits, as an npz."""
    x, y, _ = load_dataset("mnist-5k", split="train")
    torch.set_num_threads(2)                 # the one long training of the suite: both cores (reset after)
    clf = evaluate.train_classifier(x, y, epochs=2, progress=False)     # ~93% on the test split (seeded)
    xt, yt, _ = evaluate.reference_digits("mnist-5k", str(tmp_path))     # the real side evaluate.py uses
    acc = (evaluate.classify(clf, xt)[0].argmax(1) == yt).float().mean().item()
    path = tmp_path / f"classifier_mnist-5k_v{evaluate.CLASSIFIER_VERSION}.pt"
    torch.save({"model": clf.state_dict(), "test_accuracy": acc}, path)
    npz = tmp_path / "real.npz"
    np.savez(npz, images=((xt[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), labels=yt.numpy())
    r = run_cli("evaluate.py", "--npz", str(npz), "--dataset", "mnist-5k", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "real_eval.json") as f:
        res = json.load(f)
    assert res["accuracy"] > 0.9 and res["frechet"] < 5 * res["frechet_floor"] + 1
    assert abs(res["spread"] - 1) < 0.02          # the real digits are exactly as varied as themselves (uint8 aside)


def test_style_measures_see_bold_and_italic():
    x = load_dataset("mnist-5k", split="test")[0]
    base, bold, italic = (evaluate.style_measures(v) for v in (x, apply_style(x, "bold"), apply_style(x, "italic")))
    assert bold["ink"] > 1.5 * base["ink"] and abs(bold["slant"] - base["slant"]) < 0.05
    assert italic["slant"] > base["slant"] + 0.25 and abs(italic["ink"] - base["ink"]) < 0.02


def test_results_record_every_sampling_setting_also_for_a_sweep(tiny_ckpt, tmp_path, monkeypatch):
    """The JSON says how the samples were drawn (sampler, steps, eta, guidance interval,
    rescale, seed), for a plain evaluation and for a guidance sweep alike."""
    torch.manual_seed(0)
    monkeypatch.setattr(evaluate, "get_classifier", lambda *a, **k: (evaluate.Classifier().eval(), 0.5))
    flags = ("--checkpoint", tiny_ckpt, "--n", "2", "--steps", "2", "--guide-to", "0.5", "--guidance-rescale", "0.3",
             "--dataset", "mnist-5k")
    for extra, name in (((), "plain.json"), (("--sweep-guidance", "1,2"), "sweep.json")):
        r = run_cli("evaluate.py", *flags, *extra, "--json", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        with open(tmp_path / name) as f:
            res = json.load(f)
        s = res["sampling"]
        assert (s["sampler"], s["steps"], s["guide_from"], s["guide_to"], s["guidance_rescale"]) == ("ddim", 2, 0.0, 0.5, 0.3)
        rows = res.get("sweep", [res])
        assert all(isinstance(row["spread"], float) and row["spread"] >= 0 for row in rows)
        if name == "plain.json":                  # the reference: 2 training digits per label, scored alike
            ref = res["training_digits"]
            assert (ref["n"], ref["frechet_n"], res["frechet_n"]) == (20, 20, 20)
            assert "its training digits, scored the same way" in r.stdout and "(real test digits: 50.00%)" in r.stdout
    assert [row["guidance"] for row in res["sweep"]] == [1.0, 2.0]


def test_the_training_reference_draws_n_training_digits_per_label():
    x, y, _ = evaluate.load_dataset("mnist-5k", split="train")
    real_x, real_y, _ = evaluate.reference_digits("mnist-5k", "data")
    assert (len(real_x), real_y.bincount().tolist()) == (2000, [200] * 10)
    judge = evaluate.Classifier().eval()                 # untrained: only the counts are checked
    r = evaluate.training_reference("mnist-5k", "data", 3, judge, real_x, real_y)
    assert r["n"] == 30 and sorted(r["per_digit_accuracy"]) == list(range(10))


def test_a_run_stores_its_sample_guidance_and_every_sampler_starts_from_it(tmp_path, monkeypatch):
    """train.py --sample-guidance w goes into the checkpoint; sample.py and evaluate.py then
    sample at w unless --guidance says otherwise; an older checkpoint without the field samples at 2."""
    from harness.files import configs_from_checkpoint
    out = tmp_path / "run"
    assert run_cli("train.py", *TINY_FLAGS, "--max-steps", "2", "--sample-guidance", "1.5", "--out", str(out),
                   "--no-figures").returncode == 0
    ckpt_path = str(out / "ckpt.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["config"]["diffusion"]["sample_guidance"] == 1.5

    def images(name, *flags):
        r = run_cli("sample.py", "--checkpoint", ckpt_path, "--label", "3", "--n", "2", "--steps", "3",
                    "--out", str(tmp_path / f"{name}.png"), "--npz", str(tmp_path / f"{name}.npz"), *flags)
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / f"{name}.npz")["images"]
    default, at_15, at_2 = images("d"), images("a", "--guidance", "1.5"), images("b", "--guidance", "2")
    assert np.array_equal(default, at_15) and not np.array_equal(default, at_2)

    monkeypatch.setattr(evaluate, "get_classifier", lambda *a, **k: (evaluate.Classifier().eval(), 0.5))
    for flags, expected in (((), 1.5), (("--guidance", "3"), 3.0)):
        json_path = tmp_path / f"e{expected}.json"
        assert run_cli("evaluate.py", "--checkpoint", ckpt_path, "--n", "1", "--steps", "2", "--dataset", "mnist-5k",
                       "--json", str(json_path), *flags).returncode == 0
        assert json.load(open(json_path))["sampling"]["guidance"] == expected

    del ckpt["config"]["diffusion"]["sample_guidance"]                  # a checkpoint from before the field
    assert configs_from_checkpoint(ckpt)[1].sample_guidance == 2.0


def test_evaluate_lora_writes_its_results_next_to_the_adapter(tiny_ckpt, quick_judge, tmp_path):
    """evaluate.py --lora scores the adapter: its default JSON is <adapter>_eval.json, and the
    base model's own <ckpt>_eval.json (if any) is left alone (it used to be replaced)."""
    base = tmp_path / "base"
    shutil.copytree(os.path.dirname(tiny_ckpt), base)
    (base / "ckpt_eval.json").write_text('{"accuracy": 0.5}')
    lora_out = tmp_path / "lora"
    assert run_cli("lora_finetune.py", "--checkpoint", str(base / "ckpt.pt"), "--max-steps", "1", "--eval-n", "0",
                   "--no-figures", "--batch-size", "16", "--out", str(lora_out)).returncode == 0
    r = run_cli("evaluate.py", "--checkpoint", str(base / "ckpt.pt"), "--lora", str(lora_out / "adapter.safetensors"),
                "--n", "1", "--steps", "2", "--data-dir", quick_judge)
    assert r.returncode == 0, r.stderr
    assert json.loads((base / "ckpt_eval.json").read_text()) == {"accuracy": 0.5}
    assert "lora" in json.loads((lora_out / "adapter_eval.json").read_text())


def test_the_style_table_scores_samples_against_the_real_styled_digits(quick_judge, monkeypatch, capsys):
    """Frechet to the real bold digits, next to their own real-vs-real floor: real bold digits in
    place of the fine-tuned model's samples sit near that floor, plain ones (the base's) far off."""
    real_x, real_y, _ = evaluate.reference_digits("mnist-5k", quick_judge)
    pick = torch.randperm(len(real_x), generator=torch.Generator().manual_seed(1))    # MNIST's halves differ
    given = {"base": real_x[pick[:400]], "tuned": apply_style(real_x[pick[400:800]], "bold")}
    monkeypatch.setattr(evaluate, "evaluate_model", lambda model, *a, **k: (
        {"accuracy": 1.0, "frechet": 0.0}, given[model], real_y[:400]))
    models = [SimpleNamespace(eval=lambda name=name: name) for name in ("base", "tuned")]
    rows = evaluate.style_evaluation(*models, None, "mnist-5k", "bold", quick_judge, 40, None)["rows"]
    base, tuned = rows["base model"], rows["fine-tuned model"]
    assert tuned["frechet_styled_floor"] == base["frechet_styled_floor"] > 0
    near, floor = tuned["frechet_styled"], tuned["frechet_styled_floor"]
    assert near < 2 * floor and base["frechet_styled"] > 10 * near
    assert f"fine-tuned {near:.1f} ({near / floor:.2f}x their real-vs-real floor {floor:.1f})" in capsys.readouterr().out


def test_the_judge_is_trained_the_same_whatever_the_global_rng_did_before():
    """train_classifier(seed) fixes its weights' initialisation, shuffle and augmentation: two
    calls with other global RNG states in between give the same judge, another seed another one."""
    x, y, _ = load_dataset("mnist-5k", split="train")
    x, y = x[:96], y[:96]
    torch.manual_seed(123)
    a = evaluate.train_classifier(x, y, epochs=1, batch_size=32, progress=False)
    torch.manual_seed(456)
    torch.rand(10)
    b = evaluate.train_classifier(x, y, epochs=1, batch_size=32, progress=False)
    c = evaluate.train_classifier(x, y, epochs=1, batch_size=32, seed=1, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert not a.training


def test_augment_keeps_the_pixel_range_and_the_background():
    """Shifted, sheared, thicker or thinner strokes, but pixels stay in [-1, 1] and an empty
    (all -1) image stays empty: the shift pads with background, not grey."""
    x, _, _ = load_dataset("mnist-5k", split="test")
    x = x[:64]
    g = torch.Generator().manual_seed(0)
    out = evaluate.augment(x, g)
    assert out.shape == x.shape and out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0, "every image is changed"
    blank = evaluate.augment(-torch.ones(8, 1, 28, 28), g)
    assert torch.allclose(blank, -torch.ones_like(blank), atol=1e-6)
    ink = ((out + 1) / 2).sum(dim=(1, 2, 3)) / ((x + 1) / 2).sum(dim=(1, 2, 3))
    assert 0.3 < ink.median() < 2.5, "strokes change width, digits do not vanish or fill up"


def test_the_report_prints_the_spread_only_when_there_is_one(capsys):
    r = {"per_digit_accuracy": {d: 1.0 for d in range(10)}, "frechet": 2.0, "frechet_floor": 1.0, "accuracy": 0.975,
         "confidence": 0.9, "n": 40, "frechet_n": 40}
    evaluate.print_report(r, 0.984, "mnist")
    out = capsys.readouterr().out
    assert "accuracy 97.50% (real test digits: 98.40%)" in out
    assert "Frechet 2.00 vs real-vs-real floor 1.00 at n=40 (2.00x)" in out and "spread" not in out
    assert "sampling" not in out
    evaluate.print_report({**r, "spread": 0.65, "sampling_seconds": 3.0}, 0.984, "mnist")
    out = capsys.readouterr().out
    assert "spread within a digit: 0.65 (1 = real digits' variance)" in out and "sampling 3.0s" in out
    evaluate.print_report({**r, "spread": None, "frechet": None}, 0.984, "mnist")
    out = capsys.readouterr().out
    assert "spread within a digit: n/a" in out and "Frechet n/a" in out
