"""Feature extraction and a numerically robust linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import normalize
from ..errors import DivergenceError


@torch.no_grad()
def extract(fn: nn.Module | object, images: torch.Tensor, mean: tuple[float, ...],
            std: tuple[float, ...], *, batch_size: int = 512, device: str = "cpu",
            channels_last: bool = False) -> torch.Tensor:
    """Apply ``fn`` (a module in eval mode, or a callable) to uint8 images in batches → float32 CPU."""
    outs = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device, non_blocking=True), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs.append(fn(x).float().cpu())  # type: ignore[operator]
    return torch.cat(outs)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, weight_decay: float = 1e-4, max_iter: int = 300) -> float:
    """Multinomial logistic regression on standardised features (L-BFGS with a strong-Wolfe line
    search); returns test accuracy in [0, 1]. Raises when the optimiser diverges."""
    mu = train_x.mean(0, keepdim=True)
    sd = train_x.std(0, keepdim=True).clamp_min(1e-6)
    xtr = ((train_x - mu) / sd).double()
    xte = ((test_x - mu) / sd).double()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    if not torch.isfinite(torch.as_tensor(loss)):
        raise DivergenceError("linear probe diverged (non-finite loss)")
    with torch.no_grad():
        pred = (xte @ w + b).argmax(1)
    return float((pred == test_y).double().mean())
