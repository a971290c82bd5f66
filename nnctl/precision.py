"""Numeric precision: autocast dtype and loss scaling for one run."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, TypeVar

import torch

from nnctl.errors import UserError

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Precision:
    def __init__(self, dtype: str = "float32", grad_scaler: bool = False) -> None:
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}", key="precision.dtype")
        self.dtype, self.use_scaler = DTYPES[dtype], grad_scaler
        self.name = dtype

    def check(self, device: torch.device) -> None:
        """Reject precisions the device cannot autocast to, before any work starts."""
        if self.dtype is torch.float32:
            return
        if device.type == "cuda" and self.dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16 support; use precision=fp16 or precision=fp32",
                            key="precision")
        if not torch.amp.is_autocast_available(device.type):
            raise UserError(f"autocast is not available on {device.type}; use precision=fp32", key="precision")

    def autocast(self, device: torch.device) -> ContextManager:
        if self.dtype is torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        # Disabled unless fp16: then it would only pass calls through, and the step goes around it (Optimization).
        return torch.amp.GradScaler(device.type, enabled=self.use_scaler)


def each_under(context: ContextManager, steps: Iterator[T]) -> Iterator[T]:
    """The items of `steps`, each produced inside `context` (autocast around an objective's forward pass) and
    handed over outside it (the backward pass and the update run in the caller's precision)."""
    while True:
        with context:
            item = next(steps, None)
        if item is None:
            return
        yield item
