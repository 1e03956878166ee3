"""Early stopping on validation loss, compared with the best epoch so far.

An epoch counts as an improvement only when its loss beats the best loss
seen so far by more than `min_delta`; `patience` epochs in a row without
one stop the run. (Comparing with the previous epoch instead would let a
slow drift upwards, interrupted by small dips, train forever.)
The state is a plain dict, saved in `last.pt` for --resume.
"""

from __future__ import annotations

import math


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = 0  # 1-based; 0 = none yet
        self.bad_epochs = 0

    def step(self, epoch: int, loss: float) -> bool:
        """Record `epoch`'s validation loss; True when it is the new best."""
        if math.isfinite(loss) and loss < self.best_loss - self.min_delta:
            self.best_loss = loss
            self.best_epoch = epoch
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        # patience and min_delta come from the command line: --resume may change them.
        self.best_loss = float(state["best_loss"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
