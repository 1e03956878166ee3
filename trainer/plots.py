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


def write_plots(run_dir: str | os.PathLike, history: Sequence[dict], best_epoch: int | None = None,
                title: str = "") -> tuple[Path, Path, Path]:
    """Draw accuracy.png, loss.png and retrieval.png from the per-epoch rows of summary.csv."""
    run_dir = Path(run_dir)
    epochs = [row["epoch"] for row in history]
    prefix = f"{title}: " if title else ""
    acc = run_dir / "accuracy.png"
    loss = run_dir / "loss.png"
    retrieval = run_dir / "retrieval.png"
    _plot(acc, epochs, {"train accuracy": [r["train_accuracy"] for r in history],
                        "validation accuracy": [r["val_accuracy"] for r in history]},
          "accuracy", f"{prefix}accuracy per epoch", best_epoch)
    _plot(loss, epochs, {"train loss": [r["train_loss"] for r in history],
                         "validation loss": [r["val_loss"] for r in history]},
          "loss", f"{prefix}training loss per epoch", best_epoch)
    # Rows written before the retrieval figures existed have none (NaN: a gap).
    _plot(retrieval, epochs, {f"validation {name}@10": [r.get(f"val_{name}@10", float("nan")) for r in history]
                              for name in ("map", "precision")},
          "retrieval", f"{prefix}validation retrieval per epoch (each image a query)", best_epoch)
    return acc, loss, retrieval
