import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distilled_ssl.data.sources import channel_stats, load_source, read_idx
from distilled_ssl.errors import DataNotFoundError


def test_npz_source_shapes_labels_and_shared_normalisation(synthetic_npz: Path) -> None:
    train = load_source(f"npz:{synthetic_npz}")
    test = load_source(f"npz:{synthetic_npz}", train=False)
    assert train.images.shape == (240, 1, 16, 16) and train.images.dtype == torch.uint8
    assert test.images.shape == (80, 1, 16, 16)
    assert train.labels is not None and train.labels.dtype == torch.int64
    assert test.mean == train.mean and test.std == train.std  # the training split's statistics
    x = train.images.double() / 255
    assert train.mean[0] == pytest.approx(float(x.mean()), abs=1e-5)
    assert train.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-4)


def test_channel_stats_per_channel() -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 1] = 255
    mean, std = channel_stats(images)
    assert mean == (0.0, 1.0, 0.0)
    assert std[1] == pytest.approx(0.0, abs=1e-5)


def test_idx_files_are_read_and_truncation_is_caught(tmp_path: Path) -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") * 2
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(header + pixels.tobytes()))
    assert (read_idx(good) == pixels.reshape(2, 3, 3)).all()
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(header + pixels.tobytes()[:-4]))
    with pytest.raises(RuntimeError, match="corrupt"):
        read_idx(bad)


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"source.download=true"):
        load_source("cifar10")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_source(f"npz:{tmp_path / 'nothing.npz'}")
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", root=tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        load_source("imagenet-22k")


def test_npz_with_wrong_dtype_or_shape_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    np.savez(path, x_train=np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_source(f"npz:{path}")
    np.savez(path, x_train=np.zeros((3,), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_source(f"npz:{path}")


def test_image_folder_with_classes(tmp_path: Path) -> None:
    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value + i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_source(f"imagefolder:{tmp_path}")
    assert data.images.shape == (6, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(data.images[4, 0, 0, 0]) == 201
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(ValueError, match="share one size"):
        load_source(f"imagefolder:{tmp_path}")
