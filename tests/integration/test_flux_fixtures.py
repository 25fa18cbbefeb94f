"""The tiny FLUX.1 dev/schnell and Chroma models (tests/fixtures/tiny_models.py, FLUX_VARIANTS) are what the Flux
tests assume: ComfyUI's Load Diffusion Model detects each as its variant, a stock CLIPTextEncode of a CLIP-L (the SD1
fixture's) conditions it, and ComfyUI's own KSampler samples it with the SD3 fixture's 16-channel VAE."""
import logging

import pytest
import torch

CLASSES = {"flux-dev": "Flux", "flux-schnell": "FluxSchnell", "chroma": "Chroma"}
VARIANTS = [pytest.param("flux-dev"), pytest.param("flux-schnell", marks=pytest.mark.slow),
            pytest.param("chroma", marks=pytest.mark.slow)]  # Chroma: 3072 wide in every ComfyUI (~1.2 GB)


def load_flux(comfy, name):
    return comfy.run_node("UNETLoader", unet_name=name, weight_dtype="default")[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux_fixture_is_detected_conditioned_by_clip_l_and_samples(comfy, flux_model_name, sd1_checkpoint,
                                                                    variant, caplog):
    with caplog.at_level(logging.WARNING):
        model = load_flux(comfy, flux_model_name(variant))
    assert not [r.getMessage() for r in caplog.records if "missing" in r.getMessage().lower()]
    assert type(model.model.model_config).__name__ == CLASSES[variant]
    net = model.model.diffusion_model
    assert (len(net.double_blocks), len(net.single_blocks), net.txt_in.in_features) == (1, 1, 768)
    _, clip, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    pos = comfy.run_node("CLIPTextEncode", clip=clip, text="a kiln toy")[0]
    assert pos[0][0].shape == (1, 77, 768) and pos[0][1]["pooled_output"].shape == (1, 768)
    latent = comfy.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)[0]
    out = comfy.run_node("KSampler", model=model, seed=3, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                         positive=pos, negative=pos, latent_image=latent, denoise=1.0)[0]["samples"]
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all() and out.std() > 0
