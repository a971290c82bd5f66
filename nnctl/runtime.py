"""Device choice, seeding and determinism."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from nnctl.errors import UserError


def pick_device(name: str) -> torch.device:
    """'auto' prefers CUDA, then MPS, then CPU; an explicit device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
    if not available[device.type]():
        raise UserError(f"device {name!r} is not available on this machine; use trainer.device=auto or cpu",
                        key="trainer.device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{name} does not exist ({torch.cuda.device_count()} GPU(s))", key="trainer.device")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms for fixed input shapes
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
