"""What every figure of the reports shares: a matplotlib figure saved as PNG or SVG bytes, or written
into an output folder, and closed."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt


def figure_bytes(figure, extension: str = "png", dpi: int | None = None) -> bytes:
    """A figure saved as `extension` (png, svg), as bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=extension, dpi=dpi or "figure")
    return buffer.getvalue()


def figure_png(figure, dpi: int | None = None) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    data = figure_bytes(figure, "png", dpi)
    plt.close(figure)
    return data


def save_figure(figure, folder, name: str, formats: list[str]) -> list[Path]:
    """Write the figure into an output folder (output_guard.OutputFolder) as `name` + each format's suffix;
    close it."""
    written = [folder.write_bytes(f"{name}.{extension}", figure_bytes(figure, extension)) for extension in formats]
    plt.close(figure)
    return written
