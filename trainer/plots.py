"""accuracy.png and loss.png (train vs validation per epoch) and retrieval.png
(validation mAP@10 and P@10 per epoch), drawn with matplotlib Agg."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from imagesearch.files import atomic_write  # noqa: E402


def _plot(path: Path, epochs, series: dict, ylabel: str, title: str, best_epoch: int | None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        for label, values in series.items():
            ax.plot(epochs, values, marker="o", label=label)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


# (file, y axis, title, {legend: summary.csv column}) of each plot.
PLOTS = (
    ("accuracy.png", "accuracy", "accuracy per epoch",
     {"train accuracy": "train_accuracy", "validation accuracy": "val_accuracy"}),
    ("loss.png", "loss", "training loss per epoch", {"train loss": "train_loss", "validation loss": "val_loss"}),
    ("retrieval.png", "retrieval", "validation retrieval per epoch (each image a query)",
     {"validation map@10": "val_map@10", "validation precision@10": "val_precision@10"}),
)


def write_plots(run_dir: str | os.PathLike, history: Sequence[dict], best_epoch: int | None = None,
                title: str = "") -> tuple[Path, ...]:
    """Draw accuracy.png, loss.png and retrieval.png from the per-epoch rows of summary.csv."""
    epochs = [row["epoch"] for row in history]
    prefix = f"{title}: " if title else ""
    paths = []
    for name, ylabel, what, columns in PLOTS:
        paths.append(Path(run_dir) / name)
        series = {label: [row[column] for row in history] for label, column in columns.items()}
        _plot(paths[-1], epochs, series, ylabel, prefix + what, best_epoch)
    return tuple(paths)
