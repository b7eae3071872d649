"""Offline data for pretraining and few-shot evaluation: images and text, nothing downloaded.

Images (``load_images``), float32 (N, C, H, W) in [0, 1] with integer labels and a fixed
train/test split:

* ``None`` or ``"digits"``: ``sklearn.datasets.load_digits`` (1x8x8, 10 classes, bundled
  with scikit-learn), stratified 80/20 split.
* a directory of MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte``,
  ``t10k-...``; Fashion-MNIST and KMNIST use the same names), the official split.
* an ``.npz`` with ``x_train, y_train, x_test, y_test`` (the Keras layout), or ``x``/``images``
  and ``y``/``labels`` (split here). Images (N, H, W), (N, H, W, C) or (N, C, H, W).
* an image folder ``root/<class>/*.png|jpg|...`` (ImageNet layout), or ``root/train/<class>``
  and ``root/test/<class>`` for a given split. Every image must have the same square size.

Text (``load_text``): any local UTF-8 file, or a built-in corpus that every Python has: the
help topics of ``pydoc_data.topics`` (~0.5 MB of English prose and code). Tokenizers are
byte-level (256 ids, lossless) or char-level (the corpus's characters).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


# --------------------------------------------------------------------------- images


@dataclass
class ImageData:
    """A labelled image data set with a train/test split. Images (N, C, H, W) float32 in
    [0, 1]; labels (N,) int64 in [0, n_classes)."""

    name: str
    x_train: torch.Tensor  # (N_train, C, H, W) float32
    y_train: torch.Tensor  # (N_train,) int64
    x_test: torch.Tensor  # (N_test, C, H, W) float32
    y_test: torch.Tensor  # (N_test,) int64
    classes: list[str] = field(default_factory=list)  # class names, index = label

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dim() != 4 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: expected {split} images (N, C, H, W) and N labels, "
                    f"got {tuple(x.shape)} and {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"{self.name}: expected a non-empty {split} split, got 0 images")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test images differ in shape: "
                f"{tuple(self.x_train.shape[1:])} vs {tuple(self.x_test.shape[1:])}"
            )
        if self.image_size != self.x_train.shape[3]:
            raise ValueError(
                f"{self.name}: expected square images, got {self.x_train.shape[2]}x{self.x_train.shape[3]}"
            )
        if not self.classes:
            n = int(max(self.y_train.max(), self.y_test.max())) + 1
            self.classes = [str(i) for i in range(n)]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """(n_classes,) number of examples of each class in a split."""
        y = self.y_train if split == "train" else self.y_test
        return torch.bincount(y, minlength=self.n_classes)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.in_chans}x{self.image_size}x{self.image_size}, "
            f"{self.n_classes} classes, {len(self.y_train)} train / {len(self.y_test)} test"
        )


def default_patch_size(image_size: int) -> int:
    """The smallest patch that divides ``image_size`` into a grid of at most 7x7 (8 -> 2,
    28 -> 4, 32 -> 8, 224 -> 32): few tokens, so small encoders train fast."""
    for p in range(1, image_size + 1):
        if image_size % p == 0 and image_size // p <= 7:
            return p
    return image_size


def _split_images(name, x: np.ndarray, y: np.ndarray, classes, test_fraction: float, seed: int):
    """ImageData from all images and labels, split train/test stratified by class."""
    tr, te = _stratified_split(y, test_fraction, seed)
    return ImageData(
        name,
        torch.from_numpy(x[tr]),
        torch.from_numpy(y[tr]),
        torch.from_numpy(x[te]),
        torch.from_numpy(y[te]),
        classes,
    )


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(te)


def _to_float_images(x: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W) | (N, H, W, C) | (N, C, H, W) of any numeric dtype -> (N, C, H, W) float32 in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] == x.shape[2] and x.shape[3] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # square channels-last -> first
        elif not (x.shape[2] == x.shape[3] and x.shape[1] in (1, 3, 4)):
            raise ValueError(
                f"{where}: expected square images (N, H, H, C) or (N, C, H, H) with C in "
                f"1, 3, 4, got shape {x.shape}"
            )
    else:
        raise ValueError(f"{where}: expected images (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / 255.0).copy()
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        x = (x - lo) / max(hi - lo, 1e-12)
    return x.copy()


def _labels(y: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Any label array -> (int64 ids 0..n-1, class names)."""
    y = np.asarray(y).reshape(-1)
    classes, ids = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{where}: expected at least 2 classes, got {len(classes)}")
    return ids.astype(np.int64), [str(c) for c in classes]


def _digits(test_fraction: float, seed: int) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8), pixels 0..16
    y = d.target.astype(np.int64)
    return _split_images("digits", x, y, [str(i) for i in range(10)], test_fraction, seed)


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: expected an IDX file (magic 0x0000TTNN), got another format")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dt = np.dtype(dtypes[code])
    n = int(np.prod(dims)) if dims else 0
    body = data[4 + 4 * ndim :]
    if len(body) != n * dt.itemsize:
        raise ValueError(
            f"{path}: expected {n * dt.itemsize} data bytes for shape {dims}, got {len(body)}"
        )
    return np.frombuffer(body, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def _find_idx(root: str, split: str, kind: str) -> str | None:
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    for name in sorted(os.listdir(root)):
        low = name.lower()
        if any(low.startswith(p) for p in prefixes) and f"{kind}-idx" in low:
            return os.path.join(root, name)
    return None


def _idx_dir(root: str) -> ImageData:
    files = {(s, k): _find_idx(root, s, k) for s in ("train", "test") for k in ("images", "labels")}
    missing = [f"{s}-{k}" for (s, k), f in files.items() if f is None]
    if missing:
        raise FileNotFoundError(
            f"data: expected MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) in {root}, missing {missing}"
        )
    xs = {s: _to_float_images(read_idx(files[(s, "images")]), root) for s in ("train", "test")}
    y_all, classes = _labels(
        np.concatenate([read_idx(files[("train", "labels")]), read_idx(files[("test", "labels")])]),
        root,
    )
    n_tr = len(xs["train"])
    return ImageData(
        os.path.basename(os.path.normpath(root)),
        torch.from_numpy(xs["train"]),
        torch.from_numpy(y_all[:n_tr]),
        torch.from_numpy(xs["test"]),
        torch.from_numpy(y_all[n_tr:]),
        classes,
    )


def _npz(path: str, test_fraction: float, seed: int) -> ImageData:
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        name = os.path.splitext(os.path.basename(path))[0]
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            x_tr = _to_float_images(z["x_train"], path)
            x_te = _to_float_images(z["x_test"], path)
            y, classes = _labels(np.concatenate([z["y_train"], z["y_test"]]), path)
            n = len(x_tr)
            return ImageData(
                name,
                torch.from_numpy(x_tr),
                torch.from_numpy(y[:n]),
                torch.from_numpy(x_te),
                torch.from_numpy(y[n:]),
                classes,
            )
        xk = next((k for k in ("x", "images", "X") if k in keys), None)
        yk = next((k for k in ("y", "labels", "targets") if k in keys), None)
        if xk is None or yk is None:
            raise ValueError(
                f"data: expected an .npz with x_train/y_train/x_test/y_test or x/y "
                f"(images/labels), got keys {sorted(keys)} in {path}"
            )
        x = _to_float_images(z[xk], path)
        y, classes = _labels(z[yk], path)
    if len(x) != len(y):
        raise ValueError(f"data: {len(x)} images but {len(y)} labels in {path}")
    return _split_images(name, x, y, classes, test_fraction, seed)


def _read_folder(root: str) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Images of root/<class>/* as arrays (H, W) or (H, W, 3), their class names, the files."""
    from PIL import Image

    arrays, labels, files = [], [], []
    for cls in sorted(os.listdir(root)):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):
            continue
        for fn in sorted(os.listdir(d)):
            if not fn.lower().endswith(IMAGE_EXTS):
                continue
            path = os.path.join(d, fn)
            with Image.open(path) as im:
                gray = im.mode in ("L", "1", "I;16", "I", "F", "LA")
                arrays.append(np.asarray(im.convert("L" if gray else "RGB")))
            labels.append(cls)
            files.append(path)
    return arrays, labels, files


def _stack(arrays: list[np.ndarray], files: list[str]) -> np.ndarray:
    rgb = any(a.ndim == 3 for a in arrays)
    if rgb:  # mixed folders: grey images become 3 equal channels
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
    shape = arrays[0].shape
    for a, f in zip(arrays, files):
        if a.shape != shape:
            raise ValueError(
                f"data: expected every image to be {shape[1]}x{shape[0]} like {files[0]}, "
                f"got {a.shape[1]}x{a.shape[0]} for {f}"
            )
    return np.stack(arrays)


def _image_folder(root: str, test_fraction: float, seed: int) -> ImageData:
    name = os.path.basename(os.path.normpath(root))
    tr_dir, te_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(tr_dir) and os.path.isdir(te_dir):
        a_tr, l_tr, f_tr = _read_folder(tr_dir)
        a_te, l_te, f_te = _read_folder(te_dir)
        if not a_tr or not a_te:
            raise ValueError(f"data: expected images in {tr_dir}/<class>/ and {te_dir}/<class>/")
        x = _to_float_images(_stack(a_tr + a_te, f_tr + f_te), root)
        y, classes = _labels(np.array(l_tr + l_te), root)
        n = len(a_tr)
        return ImageData(
            name,
            torch.from_numpy(x[:n]),
            torch.from_numpy(y[:n]),
            torch.from_numpy(x[n:]),
            torch.from_numpy(y[n:]),
            classes,
        )
    arrays, labels, files = _read_folder(root)
    if not arrays:
        raise ValueError(
            f"data: expected MNIST IDX files, class folders of images ({', '.join(IMAGE_EXTS[:4])}...) "
            f"or train/ and test/ folders in {root}, found none"
        )
    x = _to_float_images(_stack(arrays, files), root)
    y, classes = _labels(np.array(labels), root)
    return _split_images(name, x, y, classes, test_fraction, seed)


def load_images(path: str | None = None, *, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Load an image data set (see the module docstring for the accepted forms).
    ``test_fraction`` and ``seed`` set the split of data sets that come without one."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    if path is None or path == "digits":
        data = _digits(test_fraction, seed)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"data: expected 'digits' or an existing path, got {path}")
    elif os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(
                f"data: expected an .npz file, a directory of MNIST IDX files or an image "
                f"folder, got {path}"
            )
        data = _npz(path, test_fraction, seed)
    elif any("-idx" in n for n in os.listdir(path)):
        data = _idx_dir(path)
    else:
        data = _image_folder(path, test_fraction, seed)
    logger.info("images: %s", data.describe())
    return data


# --------------------------------------------------------------------------- text


def builtin_corpus() -> str:
    """Python's own help topics (pydoc_data.topics): prose and code, present in every
    CPython install, so text pretraining needs no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def load_text(path: str | None = None) -> tuple[str, str]:
    """(text, source name): a local UTF-8 file (undecodable bytes replaced), or the built-in
    corpus when ``path`` is None or ``"builtin"``."""
    if path is None or path == "builtin":
        return builtin_corpus(), "pydoc_data.topics"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: expected a text file or 'builtin', got {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if len(text) < 2:
        raise ValueError(f"data: expected a text file with at least 2 characters, got {path}")
    return text, os.path.basename(path)


class Tokenizer:
    """Base of the byte/char tokenizers: ``encode(str) -> list[int]``, ``decode(ids) -> str``,
    ``vocab_size``, JSON round trip (``to_dict`` / ``tokenizer_from_dict``)."""

    kind = ""
    vocab_size = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, ids 0..255 (lossless for any text)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text (sorted by code point)."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise ValueError("chars: expected a non-empty alphabet, got ''")
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"text: character {e.args[0]!r} is not in the tokenizer's alphabet"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def make_tokenizer(kind: str, text: str) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(text)
    raise ValueError(f"tokenizer: expected 'byte' or 'char', got {kind!r}")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    if d.get("kind") == "byte":
        return ByteTokenizer()
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    raise ValueError(f"tokenizer: expected kind 'byte' or 'char', got {d.get('kind')!r}")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    with open(path, "w") as f:
        json.dump(tok.to_dict(), f)


def load_tokenizer(path: str) -> Tokenizer:
    with open(path) as f:
        return tokenizer_from_dict(json.load(f))


@dataclass
class TextData:
    """A token stream split into train (first 90%) and validation (last 10%)."""

    name: str
    tokenizer: Tokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    def describe(self) -> str:
        return (
            f"{self.name}: {self.tokenizer.kind} tokenizer, vocab {self.tokenizer.vocab_size}, "
            f"{len(self.train)} train / {len(self.val)} val tokens"
        )


def load_text_data(
    path: str | None = None, tokenizer: str = "byte", val_fraction: float = 0.1
) -> TextData:
    """Tokenize a local file (or the built-in corpus) and split it, the tail for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    text, name = load_text(path)
    tok = make_tokenizer(tokenizer, text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    n_val = max(1, int(len(ids) * val_fraction))
    data = TextData(name, tok, ids[:-n_val], ids[-n_val:])
    logger.info("text: %s", data.describe())
    return data
