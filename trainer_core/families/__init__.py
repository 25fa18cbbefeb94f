"""Per-family training facts: objective, timestep sampling, conditioning keys, LoRA targets, names."""
