import pytest

from trainer_core.data.toml_config import load_dataset_toml
from trainer_core.errors import KilnError


def write(tmp_path, text):
    p = tmp_path / "dataset.toml"
    p.write_text(text)
    return str(p)


def test_precedence_subset_over_dataset_over_general(tmp_path):
    path = write(tmp_path, """
[general]
caption_extension = ".txt"
enable_bucket = true
num_repeats = 2

[[datasets]]
resolution = [768, 512]
batch_size = 4
class_tokens = "shs dog"

  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "/abs/reg"
  is_reg = true
  class_tokens = "dog"
  conditioning_data_dir = "masks"
""")
    subsets, buckets, batch = load_dataset_toml(path)
    a, b = subsets
    assert (a.image_dir, a.num_repeats, a.class_tokens, a.caption_extension, a.is_reg, a.mask_mode) == \
        (str(tmp_path / "img"), 10, "shs dog", ".txt", False, "none")
    assert (b.image_dir, b.num_repeats, b.class_tokens, b.is_reg, b.mask_mode, b.mask_dir) == \
        ("/abs/reg", 2, "dog", True, "folder", str(tmp_path / "masks"))
    assert buckets.resolution == (768, 512) and buckets.enable_bucket and batch == 4


def test_kohya_defaults_and_alpha_mask(tmp_path):
    subsets, buckets, batch = load_dataset_toml(write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nalpha_mask = true\n'))
    assert subsets[0].caption_extension == ".caption" and subsets[0].mask_mode == "alpha"
    assert buckets.resolution == (512, 512) and not buckets.enable_bucket and batch == 1


def test_unknown_key_names_key_and_line(tmp_path):
    with pytest.raises(KilnError, match=r"unknown key 'num_repeat' in .*dataset.toml, line 4"):
        load_dataset_toml(write(tmp_path, '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "x"\n  num_repeat = 3\n'))


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(KilnError, match=r"'num_repeats' in .*line 3.* must be an integer, got '3'"):
        load_dataset_toml(write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nnum_repeats = "3"\nimage_dir = "x"\n'))
    with pytest.raises(KilnError, match=r"'is_reg' .* must be true or false"):
        load_dataset_toml(write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nis_reg = 1\n'))


def test_unbuilt_features_are_refused_not_ignored(tmp_path):
    with pytest.raises(KilnError, match="'flip_aug' .* not supported by Kiln yet"):
        load_dataset_toml(write(tmp_path, '[general]\nflip_aug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'))
    load_dataset_toml(write(tmp_path, '[general]\nflip_aug = false\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'))


def test_bad_toml_and_empty_config(tmp_path):
    with pytest.raises(KilnError, match="not valid TOML"):
        load_dataset_toml(write(tmp_path, "[[datasets]\n"))
    with pytest.raises(KilnError, match="no \\[\\[datasets\\]\\]"):
        load_dataset_toml(write(tmp_path, "[general]\nbatch_size = 2\n"))
