"""DistilledDataset: torchvision behaviour, targets, transforms, fast path, loaders, exports, examples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hub_fixtures import make_distilled_file
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder, VisionDataset
from torchvision.transforms import v2

from distilled_ssl.io import load_tensors
from distilled_ssl.sets.dataset import DistilledDataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def ref(tiny_run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(tiny_run / "distilled.safetensors")[0]


def test_items_are_pil_and_target_reps(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set)
    assert isinstance(ds, VisionDataset) and len(ds) == 12
    image, target = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (8, 8)
    expected = ref["images"][3, 0].float().clamp(0, 1).mul(255).round().byte().numpy()
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert torch.equal(target, ref["targets"][3])
    assert torch.equal(ds.targets, ref["targets"]) and ds.lr == pytest.approx(0.05)
    assert ds.metadata["kind"] == "distilled_set" and ds.card.startswith("---\n")
    text = repr(ds)
    assert "Number of datapoints: 12" in text and "Learned lr: 0.05" in text


@pytest.mark.parametrize(("target_type", "expected"), [("label", 1), ("index", 4), ("none", None)])
def test_target_types(tiny_set: Path, target_type: str, expected: object) -> None:
    assert DistilledDataset(tiny_set, target_type=target_type)[4][1] == expected


def test_bad_arguments(tmp_path: Path) -> None:
    run = make_distilled_file(tmp_path / "unlabeled", labels=False)
    with pytest.raises(ValueError, match="no labels"):
        DistilledDataset.from_run(run, target_type="label")
    with pytest.raises(ValueError, match="target_type"):
        DistilledDataset.from_run(run, target_type="class")
    with pytest.raises(ValueError, match="image_format"):
        DistilledDataset.from_run(run, image_format="numpy")


def test_rgb_sets_give_rgb_images(tmp_path: Path) -> None:
    run = make_distilled_file(tmp_path / "rgb", channels=3, size=6)
    image, _ = DistilledDataset.from_run(run)[0]
    assert image.mode == "RGB" and image.size == (6, 6)


def test_transform_attributes_like_torchvision(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set, transform=transforms.ToTensor(), target_transform=lambda t: t * 2)
    image, target = ds[0]
    assert image.shape == (1, 8, 8) and torch.equal(target, ref["targets"][0] * 2)
    ds.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    assert ds[0][0].mean() == pytest.approx(((image - 0.5) / 0.25).mean().item(), abs=1e-6)


def test_torchvision_v2_joint_transforms_leave_targets_alone(tiny_set: Path, ref: dict) -> None:
    pipeline = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(6, antialias=True),
                           v2.ToDtype(torch.float32, scale=True)])
    ds = DistilledDataset(tiny_set, transforms=pipeline)
    image, target = ds[5]
    assert image.shape == (1, 6, 6) and image.dtype == torch.float32
    assert torch.equal(target, ref["targets"][5])


def test_tensor_fast_path_is_exact_and_normalised(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set, image_format="tensor")
    image, _ = ds[2]
    torch.testing.assert_close(image * 0.25 + 0.5, ref["images"][2].float())
    assert image.max() > (1 - 0.5) / 0.25  # unclamped: pixels above 1.0 survive
    images, targets = DistilledDataset(tiny_set).tensors()
    torch.testing.assert_close(images[2], image)
    assert images.shape == (12, 1, 8, 8) and torch.equal(targets, ref["targets"])


def test_dataloader_with_workers_matches_single_process(tiny_set: Path) -> None:
    ds = DistilledDataset(tiny_set, transform=transforms.ToTensor())
    single = [b for b in DataLoader(ds, batch_size=5)]
    multi = [b for b in DataLoader(ds, batch_size=5, num_workers=2)]
    assert len(multi) == 3
    for (x0, y0), (x1, y1) in zip(single, multi, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert multi[0][0].shape == (5, 1, 8, 8) and multi[0][1].shape == (5, 5)


def test_from_run_equals_from_local(tiny_run: Path, tiny_set: Path) -> None:
    a, b = DistilledDataset.from_run(tiny_run), DistilledDataset.from_local(tiny_set)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0]))
    assert "distilled_ssl:" in a.card


def test_export_image_folder_feeds_imagefolder(tiny_set: Path, tmp_path: Path, ref: dict) -> None:
    ds = DistilledDataset(tiny_set)
    root = ds.export_image_folder(tmp_path / "folder")
    folder = ImageFolder(str(root))
    assert folder.classes == ["class_000", "class_001", "class_002"] and len(folder) == 12
    reps = np.load(root / "targets.npy", allow_pickle=False)
    index = json.loads((root / "files.json").read_text())["index"]
    for row, (path, cls) in enumerate(folder.samples):
        i = int(Path(path).stem)
        assert index[row] == i and cls == int(ref["labels"][i])
        np.testing.assert_array_equal(reps[row], ref["targets"][i].numpy())
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(ds[i][0]))


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_pretrain_kd_resnet18(tiny_set: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    loss = _example("pretrain_kd").main([str(tiny_set), "--epochs", "1", "--workers", "0",
                                          "--save", str(tmp_path / "enc.safetensors")])
    assert np.isfinite(loss)
    assert "layer4.1.conv2.weight" in load_file(str(tmp_path / "enc.safetensors"))


def test_example_lightly_two_view(tiny_run: Path) -> None:
    loss = _example("lightly_two_view").main([str(tiny_run), "--epochs", "2", "--workers", "2",
                                               "--batch-size", "6"])
    assert np.isfinite(loss)


def test_example_export_image_folder(tiny_set: Path, tmp_path: Path) -> None:
    loss = _example("export_image_folder").main([str(tiny_set), str(tmp_path / "imgs")])
    assert np.isfinite(loss) and (tmp_path / "imgs" / "targets.npy").is_file()
