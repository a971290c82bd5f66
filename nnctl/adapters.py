"""Adapters decide which parameters train. Each is a callable model -> model built from `adapter/<name>.yaml`;
parameter-efficient adapters (LoRA and friends) plug in the same way."""
from __future__ import annotations

import torch.nn as nn


def full(model: nn.Module) -> nn.Module:
    """Train every parameter of the model as built."""
    return model
