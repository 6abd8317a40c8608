"""Loading speed of DistilledDataset vs torchvision's FashionMNIST (samples/s), same machine, same run.

    python benchmarks/dataset_loading.py [--set RUN_OR_SET_DIR] [--workers 0 2]

Without --set a synthetic 1,200-image Fashion-MNIST-shaped set (1x28x28, 128-d targets) is written
to a temp dir. FashionMNIST is read from torchvision's ``--fmnist-root`` or Debian's
dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist), first 1,200 images.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import FashionMNIST

from distilled_ssl.io import save_tensors
from distilled_ssl.sets.artifact import is_set_dir, write_set
from distilled_ssl.sets.dataset import DistilledDataset

K = 1200
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def synthetic_run(root: Path, k: int = K) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"images": torch.rand(k, 1, 28, 28, generator=g).half(),
               "targets": torch.randn(k, 128, generator=g), "lr": torch.tensor(0.1),
               "source_index": torch.arange(k), "labels": torch.arange(k) % 10}
    meta = {"kind": "distilled_set", "method": "mkdt", "fingerprint": "benchmark", "library_version": "bench",
            "iterations": 0, "num_images": k, "image_shape": [1, 28, 28], "target_dim": 128,
            "image_encoding": "float16", "normalization": {"mean": [0.286], "std": [0.353]},
            "source": {"name": "fashion-mnist"}}
    save_tensors(root / "distilled.safetensors", tensors, meta)
    return root


def fmnist_root(given: Path | None, scratch: Path) -> Path | None:
    if given is not None:
        return given
    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        return None
    raw = scratch / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(DEBIAN_FMNIST / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return scratch


def rate(dataset, workers: int, batch_size: int = 256, epochs: int = 3) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch (worker start-up)
        pass
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _targets in loader:
            n += len(images)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", type=Path, help="Run directory or set folder (default: synthetic, 1,200).")
    ap.add_argument("--fmnist-root", type=Path, help="torchvision FashionMNIST root.")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        source = args.set or synthetic_run(scratch / "run")
        set_dir = source if is_set_dir(source) else write_set(source, scratch / "set")
        t0 = time.perf_counter()
        ds = DistilledDataset.from_local(set_dir)
        cold = time.perf_counter() - t0
        n = len(ds)
        ds.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
        fast = DistilledDataset.from_local(set_dir, image_format="tensor", verify=False)
        rows = []
        for w in args.workers:
            rows.append((f"DistilledDataset, PIL + ToTensor + Normalize ({n})", w, rate(ds, w)))
            rows.append((f"DistilledDataset, tensor fast path ({n})", w, rate(fast, w)))
        root = fmnist_root(args.fmnist_root, scratch / "fmnist")
        if root is not None:
            tv = FashionMNIST(str(root), train=True, download=False, transform=transforms.Compose(
                [transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))]))
            for w in args.workers:
                rows.append((f"torchvision FashionMNIST, PIL + ToTensor + Normalize ({n} of 60,000)", w,
                             rate(Subset(tv, range(n)), w)))
        print(f"cold DistilledDataset.from_local ({n} images, sha256 checks on): {cold * 1000:.0f} ms\n")
        print(f"| {'dataset':<70} | workers | samples/s |")
        print(f"|{'-' * 72}|---------|-----------|")
        for name, w, r in rows:
            print(f"| {name:<70} | {w:>7} | {r:>9,.0f} |")


if __name__ == "__main__":
    main()
