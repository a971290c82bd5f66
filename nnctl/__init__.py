"""nnctl: config-driven deep-learning training."""
__version__ = "0.1.0"
