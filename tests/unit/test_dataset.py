import logging

import pytest
from PIL import Image

from trainer_core.data.buckets import BucketConfig
from trainer_core.data.dataset import build_dataset, subsets_from_folder
from trainer_core.data.images import open_image
from trainer_core.errors import KilnError

CFG = BucketConfig((128, 128), True, 64, 256, 32)


def _img(path, size=(64, 64), mode="RGB"):
    Image.new(mode, size, (200, 10, 10) if mode == "RGB" else None).save(path)


def test_repeat_folders_captions_and_class_token_fallback(tmp_path, caplog):
    d = tmp_path / "5_red box"
    d.mkdir()
    _img(d / "a.png")
    (d / "a.txt").write_text("a red box, studio\nsecond line ignored")
    _img(d / "b.png", (96, 64))
    (d / "notes.md").write_text("not an image")
    _img(tmp_path / "loose.png")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        ds = build_dataset(subsets_from_folder(str(tmp_path), ".txt", 2), CFG, 1)
    subs = {s.image_dir.rsplit("/", 1)[-1]: s for s in ds.subsets}
    assert subs["5_red box"].num_repeats == 5 and subs["5_red box"].class_tokens == "red box"
    assert subs[tmp_path.name].num_repeats == 2
    caps = {i.path.rsplit("/", 1)[-1]: i.caption for i in ds.items}
    assert caps["a.png"] == "a red box, studio" and caps["b.png"] == "red box"
    assert "b.png" in caplog.text
    assert ds.skipped_files == 1
    buckets = {i.path.rsplit("/", 1)[-1]: i.bucket for i in ds.items}
    assert buckets["b.png"][0] > buckets["b.png"][1] and buckets["a.png"] == (128, 128)
    assert "5_red box — 2 images × 5 repeats" in ds.summary()


def test_empty_missing_and_corrupt_inputs_name_the_problem(tmp_path):
    with pytest.raises(KilnError, match="not found"):
        subsets_from_folder(str(tmp_path / "nope"))
    assert subsets_from_folder(str(tmp_path)) == []
    with pytest.raises(KilnError, match="no images"):
        build_dataset([], CFG)
    d = tmp_path / "1_x"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(KilnError, match="broken.png"):
        build_dataset(subsets_from_folder(str(tmp_path)), CFG)


def test_exif_orientation_and_odd_modes(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "r.jpg", exif=exif)
    d = build_dataset(subsets_from_folder(str(tmp_path)), CFG)
    assert d.items[0].size == (20, 40)
    assert open_image(str(tmp_path / "r.jpg")).size == (20, 40)
    Image.new("I;16", (8, 8), 60000).save(tmp_path / "g16.png")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("P", (8, 8)).save(tmp_path / "p.png", transparency=0)
    assert open_image(str(tmp_path / "g16.png")).mode == "RGB"
    assert open_image(str(tmp_path / "g16.png")).getpixel((0, 0))[0] == 233  # 60000 / 257, the format's range
    assert open_image(str(tmp_path / "c.jpg")).mode == "RGB"
    assert open_image(str(tmp_path / "p.png")).mode == "RGBA"


def test_regularization_images_are_balanced_like_kohya(tmp_path):
    train, reg = tmp_path / "train" / "3_sks dog", tmp_path / "reg" / "1_dog"
    train.mkdir(parents=True)
    reg.mkdir(parents=True)
    for i in range(4):
        _img(train / f"t{i}.png")
    for i in range(5):
        _img(reg / f"r{i}.png")
    subsets = subsets_from_folder(str(tmp_path / "train")) + subsets_from_folder(str(tmp_path / "reg"), is_reg=True)
    ds = build_dataset(subsets, CFG)
    reps = ds.sample_repeats()
    is_reg = [ds.subsets[i.subset].is_reg for i in ds.items]
    train_n = sum(r for r, g in zip(reps, is_reg) if not g)
    reg_reps = [r for r, g in zip(reps, is_reg) if g]
    assert train_n == 12 and sum(reg_reps) == 12
    assert reg_reps == [3, 3, 2, 2, 2]  # 5 once, then one more each round-robin until 12
    # fewer training samples than reg images: kohya registers reg images until the count is reached
    small = build_dataset(subsets_from_folder(str(tmp_path / "reg"), is_reg=True)
                          + [subsets[0].__class__(str(train), 1, "sks dog")], CFG)
    assert sum(r for r, i in zip(small.sample_repeats(), small.items) if small.subsets[i.subset].is_reg) == 4


def test_each_subset_is_bucketed_by_its_own_blocks_settings_and_the_summary_says_so(tmp_path):
    from dataclasses import replace

    from trainer_core.data.captions import CaptionOptions
    for name in ("small", "large"):
        (tmp_path / name).mkdir()
        _img(tmp_path / name / "wide.png", (200, 100))
        _img(tmp_path / name / "square.png", (100, 100))
    small = BucketConfig((64, 64), True, 32, 128, 32)
    large = BucketConfig((128, 128), False)
    subsets = [s for name in ("small", "large") for s in subsets_from_folder(str(tmp_path / name))]
    subsets = [replace(subsets[0], buckets=small, block=0),
               replace(subsets[1], buckets=large, block=1, captions=CaptionOptions(shuffle_caption=True, keep_tokens=1))]
    ds = build_dataset(subsets, small, 2)
    got = {(i.subset, i.path.rsplit("/", 1)[-1]): i.bucket for i in ds.items}
    assert got[(0, "square.png")] == (64, 64) and got[(0, "wide.png")][0] > got[(0, "wide.png")][1]
    assert got[(0, "wide.png")][0] * got[(0, "wide.png")][1] <= 64 * 64
    assert got[(1, "square.png")] == got[(1, "wide.png")] == (128, 128)  # no buckets in block 2: one fixed size
    summary = ds.summary()
    assert "dataset #1: 64x64, buckets 32-128 step 32" in summary and "dataset #2: 128x128, no buckets" in summary
    assert "captions: shuffle, keep first 1" in summary
