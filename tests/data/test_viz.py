"""Pictures: the results bar panels."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from distilled_ssl.data.viz import save_bar_panels


def test_bar_panels_png(tmp_path: Path) -> None:
    save_bar_panels(tmp_path / "p.png", [("fidelity", [("a", -0.5, 0.1), ("b", 0.7, 0.0)]),
                                         ("probe", [("a", 71.0, 2.0)])])
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "RGB" and img.size[0] > 500
        assert len(img.getcolors(1 << 16) or []) > 3  # bars in colour, not a blank canvas
