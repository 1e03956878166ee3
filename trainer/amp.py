"""Mixed precision: which dtype to autocast to and whether to scale the loss.

`resolve_precision` is a pure function of the device type and whether the
device does bf16, so the choice CUDA makes is tested on any machine: bf16
where supported (no loss scaling needed), else fp16 with a GradScaler; off
(full fp32) on CPU. `Precision.autocast()` and `Precision.grad_scaler()` are
the only places the training loop touches torch.amp, and they work on CPU as
well (a `Precision("cpu", "fp16")` runs the CUDA code path in tests).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
    device_type: str  # "cuda" | "cpu" | ...
    mode: str  # "off" | "bf16" | "fp16"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.mode)

    @property
    def scales_loss(self) -> bool:
        return self.mode == "fp16"

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless the loss needs scaling (fp16)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scales_loss)


def resolve_precision(device_type: str, bf16_supported: bool) -> Precision:
    if device_type != "cuda":
        return Precision(device_type, "off")
    return Precision(device_type, "bf16" if bf16_supported else "fp16")


def precision_for(device: torch.device) -> Precision:
    return resolve_precision(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
