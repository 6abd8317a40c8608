"""(c) Feed a path-based codebase: export a distilled set as an ImageFolder and train from paths.

``export_image_folder`` writes ``OUT/<class>/<index>.png`` (one folder per class, named by the class
name when the source's names are known, or ``unlabeled``), ``OUT/targets.npy`` (target reps in
ImageFolder order) and ``OUT/files.json``; ``OUT`` must be new or empty. The same from the shell:
``distilled-ssl export RUN --out OUT --image-folder``. ImageFolder loads RGB: greyscale sets need
``Grayscale()``. Codebases such as solo-learn take ``--train_data_path OUT`` with
``data_format=image_folder``.

    python examples/export_image_folder.py fmnist-mkdt-2pct out/fmnist-images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from distilled_ssl import DistilledDataset, kd_loss


class WithTargetReps(Dataset):
    """An ImageFolder whose i-th item is paired with row i of the exported ``targets.npy``."""

    def __init__(self, root: Path, transform) -> None:
        self.folder = ImageFolder(str(root), transform=transform)
        self.target_reps = torch.from_numpy(np.load(root / "targets.npy", allow_pickle=False))
        files = json.loads((root / "files.json").read_text())["files"]
        found = [Path(p).relative_to(root).as_posix() for p, _ in self.folder.samples]
        if found != files:
            raise RuntimeError(f"{root}: ImageFolder order differs from files.json; re-export the set")

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        image, _ = self.folder[i]
        return image, self.target_reps[i]



def main(argv: list[str] | None = None) -> float:
    """Export, then one KD pass over the ImageFolder; returns the mean loss."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    ds = DistilledDataset.open(args.source)
    root = ds.export_image_folder(args.out)
    grey = ds.images.shape[1] == 1
    tf = transforms.Compose([*([transforms.Grayscale()] if grey else []),  # ImageFolder loads RGB
                             transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    data = WithTargetReps(root, tf)
    print(f"exported {len(data)} images to {root} ({len(data.folder.classes)} folders)")
    c, dim = ds.images.shape[1], ds.targets.shape[1]
    model = torch.nn.Sequential(torch.nn.Conv2d(c, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, dim))
    opt = torch.optim.SGD(model.parameters(), lr=ds.lr, momentum=0.9)
    total, n = 0.0, 0
    for images, target_reps in DataLoader(data, batch_size=args.batch_size, shuffle=True):
        loss = kd_loss(model(images), target_reps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total, n = total + loss.item(), n + 1
    print(f"one epoch from image paths: kd loss {total / n:.4f}")
    return total / n


if __name__ == "__main__":
    main()
