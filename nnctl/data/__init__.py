"""Datasets and the batch pipeline."""
