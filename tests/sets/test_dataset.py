"""DistilledDataset: torchvision behaviour, targets, transforms, fast path, loaders, exports, examples."""

from __future__ import annotations

import importlib.util
import inspect
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

from distilled_ssl.errors import ArtifactError, NotASetError, OutputExistsError
from distilled_ssl.io import load_tensors
from distilled_ssl.sets.dataset import DistilledDataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def ref(tiny_run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(tiny_run / "distilled.safetensors")[0]


def test_default_items_are_the_exact_pixels_and_target_reps(tiny_set: Path, ref: dict) -> None:
    ds = DistilledDataset(tiny_set)
    assert isinstance(ds, VisionDataset) and len(ds) == 12
    image, target = ds[3]
    # what the set was evaluated with: unnormalised, unclamped float pixels (some lie outside [0, 1])
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    assert torch.equal(image, ref["images"][3].float())
    assert torch.equal(target, ref["targets"][3])
    assert torch.equal(ds.target_reps, ref["targets"]) and ds.lr == pytest.approx(0.05)
    assert ds.metadata["kind"] == "distilled_set" and ds.card.startswith("---\n")
    text = repr(ds)
    for line in ("Number of datapoints: 12", "Learned lr: 0.05", "Target: representation (float32 [5])",
                 "Image format: float (exact pixels", "Images: 12 x [1, 8, 8]"):
        assert line in text, text
    assert 0 < ds.clipped_fraction < 1


def test_pil_items_are_clamped_8_bit(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set, image_format="pil")
    image, _ = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (8, 8)
    expected = ref["images"][3, 0].float().clamp(0, 1).mul(255).round().byte().numpy()
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert "% of pixels clipped" in repr(ds)


def test_torchvision_attributes(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set)
    assert ds.num_channels == 1 and ds.image_size == (8, 8) and ds.target_dim == 5
    assert torch.equal(ds.targets, ref["targets"])  # targets = what the items carry
    assert torch.equal(ds.labels, ref["labels"])
    assert ds.classes[:3] == ["T-shirt/top", "Trouser", "Pullover"]  # a Fashion-MNIST set
    assert ds.class_to_idx["Trouser"] == 1
    labelled = DistilledDataset(tiny_set, target_type="label")
    assert labelled.targets == ref["labels"].tolist() and "Target: label" in repr(labelled)
    normalised = ds.normalize(ds[4][0])
    torch.testing.assert_close(normalised, (ref["images"][4].float() - 0.5) / 0.25)
    tensor_ds = DistilledDataset(tiny_set, image_format="tensor")
    torch.testing.assert_close(tensor_ds[4][0], normalised)


@pytest.mark.parametrize(("target_type", "expected"), [("label", 1), ("index", 4), ("none", -1)])
def test_target_types(tiny_set: Path, target_type: str, expected: object) -> None:
    assert DistilledDataset(tiny_set, target_type=target_type)[4][1] == expected


def test_no_targets_collate_with_the_default_collate(tiny_set: Path) -> None:
    ds = DistilledDataset(tiny_set, target_type="none")
    images, targets = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 1, 8, 8) and targets.tolist() == [-1] * 4
    assert ds.targets == [-1] * 12


def test_items_are_copies(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set, target_transform=lambda t: t.mul_(0), transform=lambda x: x.mul_(0))
    image, target = ds[0]
    assert not target.any() and not image.any()
    assert torch.equal(ds.target_reps[0], ref["targets"][0]) and torch.equal(ds[1][0], ds[1][0])
    ds.transform = ds.target_transform = None
    assert torch.equal(ds[0][0], ref["images"][0].float()) and torch.equal(ds[0][1], ref["targets"][0])
    images, reps = ds.tensors()
    images.zero_()
    reps.zero_()
    assert torch.equal(ds.target_reps, ref["targets"])


def test_bad_arguments(tmp_path: Path) -> None:
    run = make_distilled_file(tmp_path / "unlabeled", labels=False)
    with pytest.raises(ValueError, match="no labels"):
        DistilledDataset.from_run(run, target_type="label")
    with pytest.raises(ValueError, match="target_type"):
        DistilledDataset.from_run(run, target_type="class")
    with pytest.raises(ValueError, match="image_format"):
        DistilledDataset.from_run(run, image_format="numpy")
    ds = DistilledDataset.from_run(run)
    assert ds.labels is None and ds.classes is None


def test_errors_point_the_right_way(tiny_run: Path, tiny_set: Path, tmp_path: Path) -> None:
    with pytest.raises(NotASetError, match=r"is a run directory.*from_run"):
        DistilledDataset.from_local(tiny_run)
    with pytest.raises(NotASetError, match=r"holds no distilled.safetensors"):
        DistilledDataset.from_run(tmp_path)
    for missing in (tmp_path / "nope", "./nope", "runs/a/b", str(tmp_path / "nope")):
        with pytest.raises(NotASetError, match="does not exist"):
            DistilledDataset.open(missing)


def test_from_run_honours_verify(tiny_run: Path) -> None:
    path = tiny_run / "distilled.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a flipped bit in the last target rep
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="is corrupt"):
        DistilledDataset.from_run(tiny_run)
    assert len(DistilledDataset.from_run(tiny_run, verify=False)) == 12
    assert "_set" not in inspect.signature(DistilledDataset).parameters


def test_rgb_sets_give_rgb_images(tmp_path: Path) -> None:
    run = make_distilled_file(tmp_path / "rgb", channels=3, size=6)
    image, _ = DistilledDataset.from_run(run, image_format="pil")[0]
    assert image.mode == "RGB" and image.size == (6, 6)
    assert DistilledDataset.from_run(run)[0][0].shape == (3, 6, 6)


def test_transform_attributes_like_torchvision(tiny_set: Path, ref: dict[str, torch.Tensor]) -> None:
    ds = DistilledDataset(tiny_set, image_format="pil", transform=transforms.ToTensor(),
                          target_transform=lambda t: t * 2)
    image, target = ds[0]
    assert image.shape == (1, 8, 8) and torch.equal(target, ref["targets"][0] * 2)
    ds.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    assert ds[0][0].mean() == pytest.approx(((image - 0.5) / 0.25).mean().item(), abs=1e-6)


def test_joint_transforms_set_later_are_honoured(tiny_set: Path) -> None:
    ds = DistilledDataset(tiny_set)
    ds.transforms = lambda image, target: (image.shape, "joint")
    assert ds[0] == ((1, 8, 8), "joint")


def test_torchvision_v2_pipelines_run_on_both_formats(tiny_set: Path, ref: dict) -> None:
    pipeline = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(6, antialias=True),
                           v2.ToDtype(torch.float32, scale=True)])
    for fmt in ("float", "pil"):
        ds = DistilledDataset(tiny_set, transforms=pipeline, image_format=fmt)
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
    ds = DistilledDataset(tiny_set, transform=DistilledDataset(tiny_set).normalize)
    single = [b for b in DataLoader(ds, batch_size=5)]
    multi = [b for b in DataLoader(ds, batch_size=5, num_workers=2)]
    assert len(multi) == 3
    for (x0, y0), (x1, y1) in zip(single, multi, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert multi[0][0].shape == (5, 1, 8, 8) and multi[0][1].shape == (5, 5)


def test_from_run_equals_from_local(tiny_run: Path, tiny_set: Path) -> None:
    a, b = DistilledDataset.from_run(tiny_run), DistilledDataset.from_local(tiny_set)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert torch.equal(a[7][0], b[7][0])
    assert "distilled_ssl:" in a.card


def test_export_image_folder_feeds_imagefolder(tiny_set: Path, tmp_path: Path, ref: dict) -> None:
    ds = DistilledDataset(tiny_set, image_format="pil")
    root = ds.export_image_folder(tmp_path / "folder")
    folder = ImageFolder(str(root))
    assert folder.classes == ["Pullover", "T-shirt_top", "Trouser"] and len(folder) == 12
    reps = np.load(root / "targets.npy", allow_pickle=False)
    meta = json.loads((root / "files.json").read_text())
    for row, (path, cls) in enumerate(folder.samples):
        i = int(Path(path).stem)
        assert meta["index"][row] == i and meta["labels"][row] == int(ref["labels"][i])
        assert folder.classes[cls] == _folder(ds.classes[int(ref["labels"][i])])
        np.testing.assert_array_equal(reps[row], ref["targets"][i].numpy())
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(ds[i][0]))
    assert folder[0][0].mode == "RGB"  # ImageFolder loads RGB, as the docstring says
    with pytest.raises(OutputExistsError, match="not empty"):
        ds.export_image_folder(root)
    (root / "stray.txt").write_text("old")
    ds.export_image_folder(root, overwrite=True)
    assert not (root / "stray.txt").exists() and len(ImageFolder(str(root))) == 12


def test_unnamed_labels_get_numbered_folders(tmp_path: Path) -> None:
    from distilled_ssl.io import save_tensors

    run = make_distilled_file(tmp_path / "run")
    tensors, meta = load_tensors(run / "distilled.safetensors")
    meta["source"]["name"] = "npz:/x.npz"
    save_tensors(run / "distilled.safetensors", tensors, {k: v for k, v in meta.items()
                                                          if k not in ("format_version", "tensor_sha256")})
    ds = DistilledDataset.from_run(run)
    assert ds.classes == ["0", "1", "2"] and torch.equal(ds.labels, tensors["labels"])
    root = ds.export_image_folder(tmp_path / "f")
    assert ImageFolder(str(root)).classes == ["class_000", "class_001", "class_002"]


def _folder(name: str) -> str:
    return name.replace("/", "_")


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


def test_example_lightly_barlow_twins(tiny_run: Path) -> None:
    pytest.importorskip("lightly")
    loss = _example("lightly_barlow_twins").main([str(tiny_run), "--epochs", "2", "--workers", "2",
                                                   "--batch-size", "6"])
    assert np.isfinite(loss)


def _torchvision_version(name: str) -> tuple[str, int]:
    """The example with every line after a ``# torchvision:`` comment replaced by that comment."""
    lines = (EXAMPLES / f"{name}.py").read_text().splitlines()
    out, swapped = [], 0
    for i, line in enumerate(lines):
        if i and lines[i - 1].lstrip().startswith("# torchvision: "):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + lines[i - 1].split("# torchvision: ", 1)[1])
            swapped += 1
        else:
            out.append(line)
    return "\n".join(out), swapped


def test_lightly_example_is_the_torchvision_script_but_the_dataset_line(
        tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightly")
    import torchvision

    code, swapped = _torchvision_version("lightly_barlow_twins")
    assert swapped == 2  # the dataset line and the normalisation
    assert "DistilledDataset.open" not in code.split("def main", 1)[1]
    seen = {}

    def fashion_mnist(root: str, download: bool = False, transform=None):  # offline stand-in, 28x28 L
        seen["root"] = root
        return torchvision.datasets.FakeData(size=12, image_size=(1, 28, 28), transform=transform)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fashion_mnist)
    ns: dict = {"__name__": "torchvision_version"}
    exec(compile(code, "lightly_barlow_twins_torchvision", "exec"), ns)
    assert np.isfinite(ns["main"]([str(tiny_run), "--epochs", "1", "--workers", "0", "--batch-size", "6"]))
    assert seen["root"] == "datasets/fashion-mnist"


def test_example_timm_kd(tiny_set: Path, tmp_path: Path) -> None:
    pytest.importorskip("timm")
    from safetensors.torch import load_file

    assert _torchvision_version("timm_kd")[1] == 2  # the dataset line and the normalisation
    loss = _example("timm_kd").main([str(tiny_set), "--epochs", "2", "--workers", "0",
                                     "--save", str(tmp_path / "enc.safetensors")])
    assert np.isfinite(loss)
    weights = load_file(str(tmp_path / "enc.safetensors"))
    assert weights["conv1.weight"].shape[1] == 1 and "fc.weight" not in weights


def test_lr_batch_size_comes_from_the_set(tiny_set: Path) -> None:
    assert DistilledDataset(tiny_set).lr_batch_size is None  # the fixture records no batch_syn


def test_example_export_image_folder(tiny_set: Path, tmp_path: Path) -> None:
    loss = _example("export_image_folder").main([str(tiny_set), str(tmp_path / "imgs")])
    assert np.isfinite(loss) and (tmp_path / "imgs" / "targets.npy").is_file()
