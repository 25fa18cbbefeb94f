"""LoRA adapters: the module, injection by target rules, kohya key names, save/load."""
