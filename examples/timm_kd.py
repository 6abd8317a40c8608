"""Knowledge-distillation pre-training of a timm model on a distilled set (its own loop).

A distilled set is images + one target representation each + a learned learning rate: regress the
targets with MSE, **without augmentation** (the targets are the teacher's representations of these
exact pixels), at the set's learned ``lr`` and the batch size it was learned at
(``ds.lr_batch_size``). The lines that differ from the same loop on a torchvision dataset follow a
``# torchvision:`` comment: the dataset line and the normalisation (the default ``image_format``
gives the exact, unnormalised float pixels the set was evaluated with). On a torchvision dataset the
targets would come from your teacher; here they come with the set (``num_classes=ds.target_dim``,
``in_chans=ds.num_channels``).

    pip install "distilled-ssl[examples]"
    python examples/timm_kd.py fmnist-mkdt-2pct --epochs 20 --save encoder.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from distilled_ssl import DistilledDataset, kd_loss


def main(argv: list[str] | None = None) -> float:
    """Train; returns the last epoch's mean KD loss."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a Hub set name, a set folder or a run directory")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", type=Path, help="Write the encoder's state dict (safetensors) here.")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    # torchvision: dataset = torchvision.datasets.FashionMNIST("datasets/fashion-mnist", download=True)
    dataset = DistilledDataset.open(args.source)
    # torchvision: mean, std = (0.2860,), (0.3530,)
    mean, std = dataset.mean, dataset.std
    dataset.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                    v2.Normalize(mean, std)])  # no augmentation for KD
    loader = DataLoader(dataset, batch_size=dataset.lr_batch_size or 256, shuffle=True,
                        num_workers=args.workers)
    model = timm.create_model(args.model, pretrained=False, in_chans=dataset.num_channels,
                              num_classes=dataset.target_dim).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=dataset.lr, momentum=0.9, weight_decay=1e-4)
    epoch_loss = float("nan")
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        model.train()
        for images, target_reps in loader:
            loss = kd_loss(model(images.to(args.device)), target_reps.to(args.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(images), n + len(images)
        epoch_loss = total / n
        print(f"epoch {epoch + 1}/{args.epochs}  kd loss {epoch_loss:.4f}")
    if args.save:
        from safetensors.torch import save_file

        model.reset_classifier(0)  # keep the encoder; add your own head for the downstream task
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save))
    return epoch_loss


if __name__ == "__main__":
    main()
