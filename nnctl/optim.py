"""Optimizers that need a check or an import guard before torch/bitsandbytes builds them."""
from __future__ import annotations

from typing import Any

from nnctl.errors import UserError


def paged_adamw8bit(params: list[dict[str, Any]], **kwargs: Any) -> Any:
    """bitsandbytes' PagedAdamW8bit: 8-bit AdamW whose state pages between GPU and host memory.

    Paging only exists on CUDA; bitsandbytes would silently fall back on other devices, hiding a config mistake.
    """
    devices = {p.device.type for group in params for p in group["params"]}
    if devices != {"cuda"}:
        raise UserError(f"paged optimizers need a CUDA device (parameters are on {', '.join(sorted(devices))}); "
                        "use optimizer=adamw8bit, which runs on CPU, or trainer.device=cuda", key="optimizer")
    from bitsandbytes.optim import PagedAdamW8bit

    return PagedAdamW8bit(params, **kwargs)
