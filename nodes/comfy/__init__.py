"""The only code that touches ComfyUI internals, split by concern (docs/architecture.md, "Layout"):

  compat.py    differences between the ComfyUI versions Kiln runs on (0.3.75 … 0.33); nothing else asks
  tensors.py   inference tensors made trainable-through without copies; cheap weight fingerprints
  model.py     MODEL: families, sampling schedule, training sessions (dynamic VRAM included), LoRA back in
  text.py      CLIP: conditioning for training batches and previews, text-encoder sessions
  vae.py       VAE: encoding for the latent cache, fp32 encodes, identity
  preview.py   sample images during training
  progress.py  progress bar, preview images, Cancel and live events

Everything else in Kiln sees plain torch modules and callables.
"""
