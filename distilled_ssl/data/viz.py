"""Pictures: a grid of distilled images beside the real images they started from."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ..io import atomic_path


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    return make_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)


def pick_for_grid(labels: torch.Tensor | None, n: int, per_class: int = 8) -> torch.Tensor:
    """Up to ``per_class`` images of each class (or the first ``per_class * 10``) to show."""
    if labels is None:
        return torch.arange(min(n, per_class * 10))
    picked = [(labels == c).nonzero().squeeze(1)[:per_class] for c in labels.unique()]
    return torch.cat(picked)


def save_comparison(path: Path, initial: torch.Tensor, distilled: torch.Tensor, *,
                    nrow: int = 8, scale: int = 3) -> None:
    """PNG: initial images (left) and distilled images (right), [0, 1] pixels [n, C, H, W]."""
    left, right = _grid(initial, nrow), _grid(distilled, nrow)
    gap = torch.ones(left.shape[0], left.shape[1], 8)
    canvas = torch.cat([left, gap, right], dim=2)
    arr = (canvas.mul(255).round().byte().permute(1, 2, 0).numpy())
    img = Image.fromarray(arr if arr.shape[2] == 3 else arr[:, :, 0])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST).convert("RGB")
    header = Image.new("RGB", (img.width, 18), "white")
    draw = ImageDraw.Draw(header)
    draw.text((4, 3), "initial (real)", fill="black")
    draw.text((img.width // 2 + 8, 3), "distilled", fill="black")
    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(header, (0, 0))
    out.paste(img, (0, 18))
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")


_PALETTE = [(78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
            (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172)]


def save_bar_panels(path: Path, panels: list[tuple[str, list[tuple[str, float, float]]]], *,
                    bar_height: int = 16, label_width: int = 300, plot_width: int = 360) -> None:
    """PNG of horizontal bar charts, one panel per ``(title, [(label, mean, std), ...])``;
    whiskers show ± std. Bars are coloured by label, the same colour in every panel."""
    colours: dict[str, tuple[int, int, int]] = {}
    for _, bars in panels:
        for label, _, _ in bars:
            colours.setdefault(label, _PALETTE[len(colours) % len(_PALETTE)])
    heights = [28 + len(bars) * (bar_height + 4) + 22 for _, bars in panels]
    width = label_width + plot_width + 60
    img = Image.new("RGB", (width, max(1, sum(heights)) + 8), "white")
    draw = ImageDraw.Draw(img)
    y = 4
    for (title, bars), h in zip(panels, heights, strict=True):
        draw.text((8, y + 4), title, fill="black")
        lows = [m - s for _, m, s in bars] + [0.0]
        highs = [m + s for _, m, s in bars] + [0.0]
        lo, hi = min(lows), max(highs)
        span = (hi - lo) or 1.0
        lo, hi = lo - 0.05 * span * (lo < 0), hi + 0.05 * span

        def px(v: float, lo: float = lo, hi: float = hi) -> int:
            return label_width + int((v - lo) / (hi - lo) * plot_width)

        top = y + 24
        for i, (label, mean, std) in enumerate(bars):
            by = top + i * (bar_height + 4)
            draw.text((8, by + 2), label[:48], fill="black")
            x0, x1 = sorted((px(0.0), px(mean)))
            draw.rectangle([x0, by, max(x1, x0 + 1), by + bar_height], fill=colours[label])
            if std > 0:
                mid = by + bar_height // 2
                draw.line([px(mean - std), mid, px(mean + std), mid], fill="black", width=1)
                for v in (mean - std, mean + std):
                    draw.line([px(v), mid - 3, px(v), mid + 3], fill="black", width=1)
            draw.text((px(max(mean + std, mean)) + 4 if mean >= 0 else px(0.0) + 4, by + 2),
                      f"{mean:.3g}", fill="black")
        axis_y = top + len(bars) * (bar_height + 4)
        draw.line([px(lo), axis_y, px(hi), axis_y], fill="grey")
        draw.line([px(0.0), top - 2, px(0.0), axis_y], fill="grey")
        draw.text((px(lo), axis_y + 3), f"{lo:.3g}", fill="grey")
        draw.text((px(hi) - 30, axis_y + 3), f"{hi:.3g}", fill="grey")
        y += h
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_line_panels(path: Path, panels: list[tuple[str, list[tuple[float, float]]]], *,
                     marker: float | None = None, width: int = 560, height: int = 150) -> None:
    """PNG of line plots stacked on one x axis, one panel per ``(title, [(x, y), ...])``;
    ``marker`` draws a dashed vertical line at that x in every panel."""
    xs = [x for _, pts in panels for x, _ in pts] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    x_span = (x_hi - x_lo) or 1.0
    left, right, pad = 64, 16, 24
    img = Image.new("RGB", (width, len(panels) * (height + pad) + 24), "white")
    draw = ImageDraw.Draw(img)

    def px(x: float) -> int:
        return left + int((x - x_lo) / x_span * (width - left - right))

    for i, (title, pts) in enumerate(panels):
        top = 8 + i * (height + pad)
        draw.text((left, top), title, fill="black")
        y0, y1 = top + 16, top + height
        ys = [y for _, y in pts if y == y and abs(y) != float("inf")] or [0.0, 1.0]
        lo, hi = min(ys), max(ys)
        span = (hi - lo) or 1.0
        lo, hi = lo - 0.05 * span, hi + 0.05 * span

        def py(y: float, lo: float = lo, hi: float = hi, y0: int = y0, y1: int = y1) -> int:
            return y1 - int((min(max(y, lo), hi) - lo) / (hi - lo) * (y1 - y0))

        draw.rectangle([left, y0, width - right, y1], outline="grey")
        draw.text((4, y0 - 2), f"{hi:.3g}", fill="grey")
        draw.text((4, y1 - 10), f"{lo:.3g}", fill="grey")
        if marker is not None:
            for yy in range(y0, y1, 6):
                draw.line([px(marker), yy, px(marker), min(yy + 3, y1)], fill="grey")
        colour = _PALETTE[i % len(_PALETTE)]
        line = [(px(x), py(y)) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        if len(pts) <= 60:
            for x, y in line:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    bottom = len(panels) * (height + pad)
    draw.text((left, bottom), f"{x_lo:.0f}", fill="grey")
    draw.text((width - right - 40, bottom), f"{x_hi:.0f}", fill="grey")
    draw.text((width // 2 - 20, bottom), "iteration", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
