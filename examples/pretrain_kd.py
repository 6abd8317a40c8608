"""(a) Pre-train a ResNet-18 on a distilled set with a plain PyTorch loop: KD loss + the learned lr.

    python examples/pretrain_kd.py fmnist-mkdt-2pct          # a Hub set (short name or org/name)
    python examples/pretrain_kd.py runs/demo --epochs 20     # or a run directory / set folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.models import resnet18
from torchvision.transforms import v2

from distilled_ssl import DistilledDataset, kd_loss, reestimate_bn_stats


def main(argv: list[str] | None = None) -> float:
    """Train; returns the last epoch's mean KD loss."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", type=Path, help="Write the encoder's state dict (safetensors) here.")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    ds = DistilledDataset.open(args.source)
    ds.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(ds.mean, ds.std)])
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    channels, dim = ds.images.shape[1], ds.targets.shape[1]
    model = resnet18(num_classes=dim)  # the fc layer maps features to the target reps
    model.conv1 = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False)  # small images: CIFAR-style stem
    model.maxpool = torch.nn.Identity()
    model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=ds.lr, momentum=0.9, weight_decay=1e-4)
    epoch_loss = float("nan")
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        for images, target_reps in loader:
            loss = kd_loss(model(images.to(args.device)), target_reps.to(args.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(images), n + len(images)
        epoch_loss = total / n
        print(f"epoch {epoch + 1}/{args.epochs}  kd loss {epoch_loss:.4f}")
    # batch-norm running statistics, re-estimated with the final weights (a short large-lr run leaves
    # the running averages behind the weights: the library's evaluation does the same)
    reestimate_bn_stats(model, (images.to(args.device) for images, _ in loader))
    if args.save:
        from safetensors.torch import save_file

        model.fc = torch.nn.Identity()  # keep the encoder; add your own head for the downstream task
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save))
    return epoch_loss


if __name__ == "__main__":
    main()
