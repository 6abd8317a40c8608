"""Barlow Twins with lightly on a distilled set: lightly's own example, one dataset line changed.

The lines that differ from the same script on torchvision's Fashion-MNIST follow a ``# torchvision:``
comment giving their torchvision version: the dataset line and the normalisation (the set's mean
and std). lightly's transforms work on PIL images, so the set is opened with ``image_format="pil"``
(clamped to [0, 1], 8-bit; see the README). Fashion-MNIST and its distilled sets are greyscale: the
images stay one channel (mode L), so ``normalize`` has one mean and one std and the ResNet gets a
one-channel stem. (For an RGB backbone instead: ``T.Grayscale(3)`` before lightly's transform and
mean/std repeated three times.)

    pip install "distilled-ssl[examples]"
    python examples/lightly_barlow_twins.py fmnist-mkdt-2pct --epochs 10
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from torch import nn

from distilled_ssl import DistilledDataset


class BarlowTwins(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BarlowTwinsProjectionHead(512, 2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(x)


def main(argv: list[str] | None = None) -> float:
    """Train; returns the last epoch's mean loss."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a Hub set name, a set folder or a run directory")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)  # greyscale, small images
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    model = BarlowTwins(backbone)

    # torchvision: dataset = torchvision.datasets.FashionMNIST("datasets/fashion-mnist", download=True)
    dataset = DistilledDataset.open(args.source, image_format="pil")
    # torchvision: normalize = {"mean": [0.2860], "std": [0.3530]}
    normalize = {"mean": list(dataset.mean), "std": list(dataset.std)}
    size = 28
    dataset.transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0, normalize=normalize),
        view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0, normalize=normalize),
    )
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                             drop_last=len(dataset) > args.batch_size,
                                             num_workers=args.workers)
    criterion = BarlowTwinsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    epoch_loss = float("nan")
    for epoch in range(args.epochs):
        total_loss = 0.0
        for batch in dataloader:
            x0, x1 = batch[0]
            z0, z1 = model(x0), model(x1)
            loss = criterion(z0, z1)
            total_loss += loss.detach().item()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        epoch_loss = total_loss / len(dataloader)
        print(f"epoch: {epoch:>02}, loss: {epoch_loss:.5f}")
    return epoch_loss


if __name__ == "__main__":
    main()
