"""Quantizers, integer checkpoints, fake-quant / DRQ / integer-only runtimes and evaluation."""
