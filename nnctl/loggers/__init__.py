"""Experiment trackers behind one interface: see `base` (one module per tracker, each importing its library
lazily)."""
from nnctl.loggers.base import Logger, Loggers, RunInfo, build_loggers, flat_params

__all__ = ["Logger", "Loggers", "RunInfo", "build_loggers", "flat_params"]
