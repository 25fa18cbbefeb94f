"""Files that must never be half-written: atomic writes, full checkpoints, resumable state."""
