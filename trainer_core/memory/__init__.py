"""Fitting a run into memory: block swap, gradient checkpointing, out-of-memory messages, device storage lent back."""
