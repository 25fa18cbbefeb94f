"""SDXL's size/crop micro-conditioning from the bucketing geometry (kohya's original_size, crop_top_left,
target_size), including the mirrored crop of a flipped sample."""
from trainer_core.data.transforms import plan_geometry
from trainer_core.families import sdxl


def test_size_condition_from_bucketing():
    g = plan_geometry((1200, 800), (512, 256))  # cover-resize to 512x341, crop 42 px off the top, centred
    c = sdxl.size_condition(g)
    assert (c.original_width, c.original_height) == (1200, 800)
    assert (c.target_width, c.target_height) == (512, 256)
    assert c.crop_left == g.crop_left == 0 and c.crop_top == g.crop_top > 0


def test_flipped_sample_reports_the_mirrored_crop():
    g = plan_geometry((900, 300), (256, 128), crop_offset=(0.25, 0.5))  # window left of centre: 384x128 -> crop 32
    assert g.resized == (384, 128) and g.crop_left == 32
    f = plan_geometry((900, 300), (256, 128), flip=True, crop_offset=(0.25, 0.5))
    assert sdxl.size_condition(f).crop_left == 384 - 256 - 32


def test_names_are_sgm_paths():
    name = sdxl.unet_namer()("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    assert name == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
