"""Dataset semantics (kohya-compatible): folders, repeats, captions, buckets, masks."""
