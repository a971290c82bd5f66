"""Exponential moving average of a model's weights and buffers, for evaluation and checkpoints."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """ema = d * ema + (1 - d) * weights, with d warming up as (1 + n) / (10 + n) towards `decay`.

    The warm-up keeps early averages from being dominated by the random initialization, so short runs benefit
    too. BatchNorm running statistics are averaged like weights; integer buffers are copied.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema, cur = self.module.state_dict(), net.state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema[k] for k in floats], [cur[k] for k in floats], 1.0 - d)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(cur[k])
