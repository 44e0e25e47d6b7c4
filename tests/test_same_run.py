"""Same run everywhere: the default run is a number of optimiser steps, so it is the same work on
the offline digits and on full MNIST; the real side of every evaluation is MNIST's official
10,000-digit test set, shipped in mnist-test/ and md5-checked."""
import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest
from conftest import TINY, TINY_T, model_flags, one_line_error, run_cli

import dataset
from dataset import DataError

FLAGS = [*model_flags(TINY), "--timesteps", str(TINY_T), "--max-steps", "1", "--eval-n", "0", "--no-figures"]


def write_idx(path, array, magic):
    """An uncompressed IDX file as torchvision's MNIST/raw holds it."""
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def idx_mnist(root, n_train=640, n_test=100):
    """A small, valid torchvision-format MNIST folder (random digits)."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), np.arange(n) % 10, 2049)
    return root


def plan_line(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("data: "))


def test_the_default_run_is_the_same_steps_on_a_torchvision_mnist_and_offline(tmp_path):
    """`--dataset auto` takes the torchvision folder when one is there, and plans the same 700
    steps of 32 as on the offline digits; the line says how many epochs that is on each."""
    data = idx_mnist(str(tmp_path / "data"))
    full = run_cli("train.py", *FLAGS, "--data-dir", data, "--out", str(tmp_path / "full"))
    offline = run_cli("train.py", *FLAGS, "--dataset", "mnist-5k", "--out", str(tmp_path / "offline"))
    assert full.returncode == 0 and offline.returncode == 0, full.stderr + offline.stderr
    assert plan_line(full.stdout) == "data: mnist, 640 training images | run: 700 steps of 32 = 22,400 images (35.00 epochs)"
    assert plan_line(offline.stdout) == ("data: mnist-5k, 4,500 training images | run: 700 steps of 32 = 22,400 images "
                                         "(4.98 epochs)")
    assert "could not be downloaded" not in full.stderr


def test_a_corrupt_torchvision_file_is_one_line_naming_it(tmp_path):
    data = idx_mnist(str(tmp_path / "data"))
    with open(os.path.join(data, "MNIST", "raw", "train-images-idx3-ubyte"), "r+b") as f:
        f.truncate(1000)
    one_line_error(run_cli("train.py", *FLAGS, "--data-dir", data, "--out", str(tmp_path / "run")),
                   "an MNIST file is broken", "--dataset mnist-5k")
    assert not (tmp_path / "run").exists()


def test_the_shipped_test_set_is_mnists_official_one():
    """10,000 digits, the published label counts, the md5s torchvision checks."""
    x, y, name = dataset.load_dataset("mnist-5k", split="test")
    assert (tuple(x.shape), name) == ((10_000, 1, 28, 28), "mnist-5k")
    assert y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    for file, md5 in dataset.TEST_FILES.items():
        with open(os.path.join(dataset.TEST_SET, file), "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5
    train_x = dataset.load_dataset("mnist-5k", split="train")[0]
    flat = {bytes(v) for v in ((train_x + 1) * 127.5).round().byte().view(len(train_x), -1).numpy()}
    assert not flat & {bytes(v) for v in ((x + 1) * 127.5).round().byte().view(len(x), -1).numpy()}, \
        "a training digit is among the test digits"


@pytest.mark.parametrize("damage", ["one byte", "missing"])
def test_a_damaged_test_set_is_refused_in_one_line(tmp_path, monkeypatch, damage):
    copy = tmp_path / "mnist-test"
    shutil.copytree(dataset.TEST_SET, copy)
    target = copy / "t10k-labels-idx1-ubyte.gz"
    if damage == "missing":
        target.unlink()
    else:
        labels = bytearray(gzip.decompress(target.read_bytes()))
        labels[100] = (labels[100] + 1) % 10                     # a valid file, one label changed
        target.write_bytes(gzip.compress(bytes(labels)))
    monkeypatch.setattr(dataset, "TEST_SET", str(copy))
    dataset.mnist_test_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: .*git checkout -- mnist-test"):
            dataset.load_dataset("mnist-5k", split="test")
    finally:
        dataset.mnist_test_arrays.cache_clear()


def test_a_tensor_from_the_test_set_can_be_changed_without_changing_the_next():
    x = dataset.load_dataset("mnist-5k", split="test")[0]
    x.zero_()
    assert float(dataset.load_dataset("mnist-5k", split="test")[0].abs().sum()) > 0


def test_labels_outside_0_to_9_are_one_line_before_any_run_file(tmp_path):
    data = idx_mnist(str(tmp_path / "data"))
    write_idx(os.path.join(data, "MNIST", "raw", "train-labels-idx1-ubyte"), np.full(640, 250), 2049)
    one_line_error(run_cli("train.py", *FLAGS, "--data-dir", data, "--out", str(tmp_path / "run")),
                   "labels outside 0..9 (250..250)", "--dataset mnist-5k")
    assert not (tmp_path / "run").exists()


def test_the_offline_fallback_measures_against_the_official_test_set(monkeypatch):
    """--dataset auto without MNIST falls back to the offline digits; its test split is still
    MNIST's official 10,000 (and a damaged copy is caught there too)."""
    def absent(root, split):
        raise dataset.MnistMissing("MNIST could not be downloaded")
    monkeypatch.setattr(dataset, "load_mnist", absent)
    x, y, name = dataset.load_dataset("auto", split="test", verbose=False)
    assert (name, len(x)) == ("mnist-5k", 10_000)
    assert len(dataset.load_dataset("auto", split="train", verbose=False)[0]) == 4_500
