"""Bit allocation as an integer linear program (pure Python + PuLP; never imports torch)."""
