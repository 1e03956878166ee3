"""Mixed precision: which dtype to autocast to and whether to scale the loss.

`resolve_precision` is a pure function of the request, the device type and
whether the device does bf16, so the choice CUDA makes is tested on any
machine; `Precision.autocast()` and `Precision.grad_scaler()` are the only
places the training loop touches torch.amp, and they work on CPU as well
(`--amp bf16` / `--amp fp16` with `--device cpu` run the same code path).

    auto  -> CUDA: bf16 where supported (no loss scaling needed), else fp16
             with a GradScaler; CPU: off (full fp32)
    off   -> fp32
    bf16  -> autocast to bfloat16, no scaler
    fp16  -> autocast to float16 + GradScaler
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from imagesearch import errors

CHOICES = ("auto", "off", "bf16", "fp16")
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


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> Precision:
    if requested not in CHOICES:
        raise errors.InvalidArgument(f"--amp {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == "auto":
        if device_type != "cuda":
            return Precision(device_type, "off")
        return Precision(device_type, "bf16" if bf16_supported else "fp16")
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise errors.FailedPrecondition(
            "--amp bf16: this GPU does not support bfloat16; use --amp fp16 or --amp auto")
    return Precision(device_type, requested)


def precision_for(device: torch.device, requested: str) -> Precision:
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_precision(requested, device.type, bf16)
