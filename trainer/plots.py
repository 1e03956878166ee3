"""accuracy.png and loss.png: train vs validation per epoch (matplotlib Agg)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from imagesearch.files import atomic_write  # noqa: E402


def _plot(path: Path, epochs, train, val, ylabel: str, title: str, best_epoch: int | None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        ax.plot(epochs, train, marker="o", label=f"train {ylabel}")
        ax.plot(epochs, val, marker="o", label=f"validation {ylabel}")
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


def write_plots(run_dir: str | os.PathLike, history: Sequence[dict], best_epoch: int | None = None,
                title: str = "") -> tuple[Path, Path]:
    """Draw accuracy.png and loss.png from the per-epoch rows of summary.csv."""
    run_dir = Path(run_dir)
    epochs = [row["epoch"] for row in history]
    prefix = f"{title}: " if title else ""
    acc = run_dir / "accuracy.png"
    loss = run_dir / "loss.png"
    _plot(acc, epochs, [r["train_accuracy"] for r in history], [r["val_accuracy"] for r in history],
          "accuracy", f"{prefix}accuracy per epoch", best_epoch)
    _plot(loss, epochs, [r["train_loss"] for r in history], [r["val_loss"] for r in history],
          "loss", f"{prefix}cross-entropy loss per epoch", best_epoch)
    return acc, loss
