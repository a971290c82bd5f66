"""Optimizers that need a check or an import guard before torch/bitsandbytes builds them.

bitsandbytes' 8-bit optimizers keep their state in 8 bits. Which of them a bitsandbytes build has, and on which
devices its kernels run, varies by version and platform, so each is built here: a missing package, class or kernel
is one line naming `optimizer` instead of an import error or a failure at the first step.
"""
from __future__ import annotations

from typing import Any

from nnctl.errors import UserError


def adamw8bit(params: list[dict[str, Any]], **kwargs: Any) -> Any:
    """bitsandbytes' AdamW8bit: AdamW with both moments in 8 bits."""
    return _bnb("AdamW8bit", "adamw8bit", params, kwargs)


def lion8bit(params: list[dict[str, Any]], **kwargs: Any) -> Any:
    """bitsandbytes' Lion8bit: sign updates with one 8-bit momentum."""
    return _bnb("Lion8bit", "lion8bit", params, kwargs)


def paged_adamw8bit(params: list[dict[str, Any]], **kwargs: Any) -> Any:
    """bitsandbytes' PagedAdamW8bit: 8-bit AdamW whose state pages between GPU and host memory.

    Paging only exists on CUDA; bitsandbytes would silently fall back on other devices, hiding a config mistake.
    """
    devices = _devices(params)
    if devices != {"cuda"}:
        raise UserError(f"paged optimizers need a CUDA device (parameters are on {', '.join(sorted(devices))}); "
                        "use optimizer=adamw8bit, which runs on CPU, or trainer.device=cuda", key="optimizer")
    return _bnb("PagedAdamW8bit", "paged_adamw8bit", params, kwargs)


def _devices(params: list[dict[str, Any]]) -> set[str]:
    return {p.device.type for group in params for p in group["params"]}


def _bnb(name: str, option: str, params: list[dict[str, Any]], kwargs: dict[str, Any]) -> Any:
    """bitsandbytes.optim.<name>(params, **kwargs), after checking that this bitsandbytes has it and that one step
    of it runs on the parameters' device."""
    try:
        import bitsandbytes
        import bitsandbytes.optim as bnb_optim
    except ImportError as exc:
        raise UserError(f"optimizer={option} needs bitsandbytes ({exc}); pip install 'bitsandbytes>=0.50', or use "
                        "optimizer=adamw", key="optimizer") from None
    version = getattr(bitsandbytes, "__version__", "?")
    cls = getattr(bnb_optim, name, None)
    if cls is None:
        raise UserError(f"bitsandbytes {version} has no {name} (optimizer={option}); pip install -U "
                        "'bitsandbytes>=0.50', or use optimizer=adamw", key="optimizer")
    for device in sorted(_devices(params)):
        _probe(cls, device, option, version)
    # bitsandbytes keeps arguments as given in its param groups: plain values, or checkpoints holding the
    # optimizer state would need OmegaConf classes to load (torch.load weights_only refuses them)
    from omegaconf import OmegaConf

    return cls(params, **{k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()})


def _probe(cls: type, device: str, option: str, version: str) -> None:
    """One step on a throwaway parameter large enough for 8-bit state: a device without the kernel fails here,
    before training, rather than at the first step."""
    import torch

    p = torch.nn.Parameter(torch.zeros(4096, device=device))
    p.grad = torch.ones_like(p)
    try:
        cls([p], lr=1e-3).step()
    except (NotImplementedError, RuntimeError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:160]
        raise UserError(f"bitsandbytes {version} cannot run {cls.__name__} on {device} ({first}); use "
                        "optimizer=adamw, or another device (trainer.device)", key="optimizer") from None
