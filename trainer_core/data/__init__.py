"""Dataset semantics (kohya-compatible): folders, repeats, captions, buckets, masks; the latent cache and its store; kohya's long-caption token windows."""
