"""Images as files a person looks at: tensors to PIL, and labelled grids (`recap sample`'s
grid.png, `recap evaluate`'s examples.png)."""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

_LABEL_CHARS = 28  # characters per label line under a grid cell of 128 px (scaled with width)
_LABEL_LINES = 4


def to_pil(image: torch.Tensor) -> Image.Image:
    """float (3, H, W) in [0, 1] -> an 8-bit RGB image."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 4) -> Image.Image:
    """Images (N, 3, H, W) in [0, 1] in a grid, each with its label wrapped underneath."""
    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    font = ImageFont.load_default()
    line_h = 12
    chars = max(12, _LABEL_CHARS * w // 128)
    cell_h = h + line_h * _LABEL_LINES + 6
    grid = Image.new("RGB", (columns * (w + 4) + 4, rows * cell_h + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = 4 + (i % columns) * (w + 4), 4 + (i // columns) * cell_h
        grid.paste(to_pil(image), (x, y))
        lines = textwrap.wrap(label, chars)[:_LABEL_LINES]
        for j, line in enumerate(lines):
            draw.text((x, y + h + 3 + j * line_h), line, fill="black", font=font)
    return grid
