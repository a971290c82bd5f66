"""Model families. Each is built by Hydra from `model/<name>.yaml`; in_shape and num_classes come from the data."""
from __future__ import annotations

import torch
import torch.nn as nn

from nnctl.errors import UserError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name; unknown names list the valid ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise UserError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}",
                        key="model.activation") from None


def checkpoint_blocks(net: nn.Module) -> None:
    """Recompute each block's activations during backward instead of keeping them (trainer.grad_checkpointing).

    Works for every model that keeps its repeated layers in a `blocks` ModuleList/Sequential (somewhere in the
    module tree, e.g. inside an adapter wrapper): each block's forward is wrapped in torch.utils.checkpoint.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    holders = [m for m in net.modules() if isinstance(getattr(m, "blocks", None), (nn.ModuleList, nn.Sequential))]
    if not holders:
        raise UserError(f"{type(net).__name__} has no `blocks` to recompute; set trainer.grad_checkpointing=false",
                        key="trainer.grad_checkpointing")
    for block in (b for m in holders for b in m.blocks):
        forward = block.forward

        @functools.wraps(forward)
        def recomputed(*args: object, _forward=forward, _block=block, **kwargs: object) -> object:
            if not (_block.training and torch.is_grad_enabled()):
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed
