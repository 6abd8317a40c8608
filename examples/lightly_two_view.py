"""(b) A lightly-style two-view SSL loop on a distilled set (``target_type="none"``).

The distilled images are used as plain unlabeled images: two augmented views per image, a backbone
and a projection head, and the Barlow Twins loss. Swap in lightly's heads/losses if you use lightly.

    python examples/lightly_two_view.py fmnist-mkdt-2pct --epochs 10
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from distilled_ssl import DistilledDataset, barlow_twins_loss


class TwoViews:
    """Apply the same random augmentation pipeline twice (as lightly's MultiViewTransform)."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def collate_views(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``((view1, view2), None)`` items into two view tensors (targets are None)."""
    views = [views for views, _ in batch]
    return torch.stack([a for a, _ in views]), torch.stack([b for _, b in views])



def main(argv: list[str] | None = None) -> float:
    """Train; returns the last epoch's mean loss."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    ds = DistilledDataset.open(args.source, target_type="none")
    size = ds.images.shape[-1]
    augment = v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(ds.mean, ds.std),
    ])
    ds.transform = TwoViews(augment)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(ds) > args.batch_size, collate_fn=collate_views)
    c = ds.images.shape[1]
    backbone = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128))
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    epoch_loss = float("nan")
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        for x1, x2 in loader:
            loss = barlow_twins_loss(head(backbone(x1)), head(backbone(x2)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        epoch_loss = total / n
        print(f"epoch {epoch + 1}/{args.epochs}  barlow twins loss {epoch_loss:.3f}")
    return epoch_loss


if __name__ == "__main__":
    main()
