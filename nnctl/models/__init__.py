"""Model families. Each is built by Hydra from `model/<name>.yaml`; in_shape and num_classes come from the data."""
from __future__ import annotations

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
