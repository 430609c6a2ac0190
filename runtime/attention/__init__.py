"""Attention over the paged KV cache: one interface (interface.py), several backends, and the
choice among them (selection.py)."""
