"""Early stopping (and best-epoch tracking) on one validation figure,
compared with the best epoch so far.

`mode` "min" for a loss, "max" for a score such as mAP@10. An epoch counts
as an improvement only when it beats the best value so far by more than
`min_delta`; `patience` epochs in a row without one stop the run.
(Comparing with the previous epoch instead would let a slow drift the wrong
way, interrupted by small recoveries, train forever.) The state is a plain
dict, saved in `last.pt` for --resume.
"""

from __future__ import annotations

import math


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "min"):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.best_value = math.inf if mode == "min" else -math.inf
        self.best_epoch = 0  # 1-based; 0 = none yet
        self.bad_epochs = 0

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def step(self, epoch: int, value: float) -> bool:
        """Record `epoch`'s figure; True when it is the new best."""
        if self._better(value):
            self.best_value = value
            self.best_epoch = epoch
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        # patience and min_delta come from the command line: --resume may change them.
        self.best_value = float(state["best_value"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
