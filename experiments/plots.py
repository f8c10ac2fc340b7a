"""Line plots of the experiments' rows, written as PNG (matplotlib, Agg: no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows: list[dict], label_of, x_key: str, y_key: str) -> dict[str, list[tuple]]:
    """{label: [(x, y), ...] sorted by x} with one label per ``label_of(row)``."""
    lines: dict[str, list[tuple]] = {}
    for row in rows:
        lines.setdefault(label_of(row), []).append((row[x_key], row[y_key]))
    return {label: sorted(points) for label, points in lines.items()}


def line_plot(path: Path, lines: dict[str, list[tuple]], *, title: str, xlabel: str, ylabel: str,
              log_x: bool = True, log_y: bool = False,
              reference: tuple[float, str] | None = None) -> Path:
    """One line per label, markers at the measured points; ``reference``
    (value, label) is drawn as a dashed horizontal line (a ceiling)."""
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for label, points in lines.items():
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker="o", label=label)
    if reference is not None:
        axes.axhline(reference[0], linestyle="--", color="black", label=reference[1])
    if log_x:
        axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
