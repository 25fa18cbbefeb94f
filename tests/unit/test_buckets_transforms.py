from PIL import Image, ImageDraw

from trainer_core.data.buckets import BucketConfig, bucket_resolutions, choose_bucket
from trainer_core.data.transforms import apply_geometry, plan_geometry, to_tensor


def test_bucket_table_respects_steps_limits_and_area():
    cfg = BucketConfig((512, 512), True, 256, 1024, 64)
    table = bucket_resolutions(cfg)
    assert (512, 512) in table and (640, 384) in table and (384, 640) in table
    for w, h in table:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= w <= 1024 and 256 <= h <= 1024 and w * h <= 512 * 512


def test_choose_bucket_matches_aspect_ratio_and_no_upscale():
    cfg = BucketConfig((512, 512), True, 256, 1024, 64)
    w, h = choose_bucket((1536, 1024), cfg)
    assert w > h and abs(w / h - 1.5) < 0.25
    assert choose_bucket((1000, 1000), cfg) == (512, 512)
    small = BucketConfig((512, 512), True, 256, 1024, 64, bucket_no_upscale=True)
    assert choose_bucket((300, 200), small) == (256, 192)
    assert choose_bucket((700, 300), BucketConfig((512, 512), enable_bucket=False)) == (512, 512)


def test_mask_stays_pixel_aligned_with_its_image_through_resize_crop_and_flip():
    # an asymmetric marker drawn at the same place in image and mask
    img = Image.new("RGB", (300, 200), (0, 0, 0))
    mask = Image.new("L", (300, 200), 0)
    for d, fill in ((ImageDraw.Draw(img), (255, 255, 255)), (ImageDraw.Draw(mask), 255)):
        d.rectangle([200, 20, 260, 60], fill=fill)
    for flip in (False, True):
        g = plan_geometry(img.size, (128, 128), flip=flip, crop_offset=(0.8, 0.3))
        a = to_tensor(apply_geometry(img, g))[0] > 0.5
        b = to_tensor(apply_geometry(mask, g))[0] > 0.5
        assert a.sum() > 50
        assert (a == b).float().mean() > 0.995
