"""python_models.data: digits split, MNIST IDX / .npz / image-folder loaders, text corpus and
tokenizers. Everything local (tmp_path), nothing downloaded."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from python_models import data as D


def test_digits_split_is_stratified_deterministic_and_scaled():
    a = D.load_images()
    b = D.load_images("digits")
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.n_classes == 10 and a.image_size == 8 and a.in_chans == 1
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0
    # stratified: every class has 35..37 of the 360 test images (1797 / 10 * 0.2 ~ 36)
    counts = a.class_counts("test")
    assert counts.min() >= 34 and counts.max() <= 38, counts
    other = D.load_images(seed=1)
    assert not torch.equal(a.y_train, other.y_train)  # the seed changes the split


def _write_idx(path, arr: np.ndarray, code: int, gz: bool) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(body)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_directory(tmp_path, gz):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (12, 4, 4), dtype=np.uint8)
    x_te = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    y_tr = np.array([0, 1, 2] * 4, dtype=np.uint8)
    y_te = np.array([2, 1, 0] * 2, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x_tr, 0x08, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", y_tr, 0x08, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", x_te, 0x08, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", y_te, 0x08, gz)
    d = D.load_images(str(tmp_path))
    assert d.x_train.shape == (12, 1, 4, 4) and d.x_test.shape == (6, 1, 4, 4)
    assert torch.allclose(d.x_train[:, 0], torch.from_numpy(x_tr).float() / 255)
    assert d.y_train.tolist() == y_tr.tolist() and d.y_test.tolist() == y_te.tolist()


def test_idx_errors(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="expected an IDX file"):
        D.read_idx(str(tmp_path / "train-images-idx3-ubyte"))
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="expected 10 data bytes"):
        D.read_idx(str(short))
    with pytest.raises(FileNotFoundError, match="missing"):
        D.load_images(str(tmp_path))


def test_npz_keras_layout_and_single_array_layout(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "k.npz"
    np.savez(
        p,
        x_train=rng.integers(0, 256, (10, 6, 6), dtype=np.uint8),
        y_train=np.arange(10) % 2,
        x_test=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8),
        y_test=np.array([0, 1, 0, 1]),
    )
    d = D.load_images(str(p))
    assert d.x_train.shape == (10, 1, 6, 6) and d.n_classes == 2
    # (N, H, W, C) float images with string labels, split here (stratified)
    q = tmp_path / "s.npz"
    x = rng.random((20, 4, 4, 3)).astype(np.float32) * 5.0
    np.savez(q, images=x, labels=np.array(["cat", "dog"] * 10))
    d = D.load_images(str(q), test_fraction=0.5)
    assert d.x_train.shape == (10, 3, 4, 4) and d.classes == ["cat", "dog"]
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    assert d.class_counts("train").tolist() == [5, 5]
    bad = tmp_path / "bad.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(ValueError, match="got keys"):
        D.load_images(str(bad))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    d = D.load_images(str(tmp_path), test_fraction=0.5)
    assert (
        d.classes == ["a", "b"]
        and d.x_train.shape == (4, 1, 8, 8)
        and d.x_test.shape == (4, 1, 8, 8)
    )
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(tmp_path / "a" / "odd.png")
    with pytest.raises(ValueError, match="odd.png"):
        D.load_images(str(tmp_path))


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'digits' or an existing path"):
        D.load_images(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"expected an \.npz file"):
        D.load_images(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_images(test_fraction=1.5)


def test_default_patch_size():
    assert [D.default_patch_size(s) for s in (8, 28, 32, 224, 7)] == [2, 4, 8, 32, 1]


def test_builtin_corpus_and_tokenizers(tmp_path):
    text, name = D.load_text()
    assert name == "pydoc_data.topics" and len(text) > 100_000
    byte = D.ByteTokenizer()
    s = "naïve café ✓"
    assert byte.decode(byte.encode(s)) == s and max(byte.encode(s)) < 256
    char = D.make_tokenizer("char", "hello world")
    assert char.vocab_size == len(set("hello world"))
    assert char.decode(char.encode("hold")) == "hold"
    with pytest.raises(ValueError, match="not in the tokenizer's alphabet"):
        char.encode("z")
    again = D.tokenizer_from_dict(char.to_dict())
    assert again.encode("world") == char.encode("world")
    with pytest.raises(ValueError, match="tokenizer"):
        D.make_tokenizer("bpe", "x")


def test_text_data_from_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 100)
    d = D.load_text_data(str(p), "char")
    assert d.tokenizer.vocab_size == 10
    assert len(d.train) == 900 and len(d.val) == 100
    assert d.tokenizer.decode(d.val[:10].tolist()) == "abcdefghij"
    with pytest.raises(FileNotFoundError, match="expected a text file"):
        D.load_text_data(str(tmp_path / "missing.txt"))
