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


def test_augmentation_keys_are_read_per_subset(tmp_path):
    # flip_aug is built; random_crop / color_aug are read so that Cache Latents can refuse them by subset
    subsets, _, _ = load_dataset_toml(write(tmp_path, '[general]\nflip_aug = true\n[[datasets]]\n'
                                                      '[[datasets.subsets]]\nimage_dir = "a"\n'
                                                      '[[datasets.subsets]]\nimage_dir = "b"\nflip_aug = false\n'
                                                      'random_crop = true\ncolor_aug = true\n'))
    a, b = subsets
    assert (a.flip_aug, a.random_crop, a.color_aug) == (True, False, False)
    assert (b.flip_aug, b.random_crop, b.color_aug) == (False, True, True)


def test_bad_toml_and_empty_config(tmp_path):
    with pytest.raises(KilnError, match="not valid TOML"):
        load_dataset_toml(write(tmp_path, "[[datasets]\n"))
    with pytest.raises(KilnError, match="no \\[\\[datasets\\]\\]"):
        load_dataset_toml(write(tmp_path, "[general]\nbatch_size = 2\n"))


def test_caption_augmentation_keys_follow_kohya_precedence(tmp_path):
    path = write(tmp_path, """
[general]
shuffle_caption = true
caption_tag_dropout_rate = 0.1
keep_tokens_separator = "|||"

[[datasets]]
caption_prefix = "sks,"
caption_dropout_rate = 0.05

  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 1
  caption_dropout_every_n_epochs = 3

  [[datasets.subsets]]
  image_dir = "b"
  shuffle_caption = false
  caption_suffix = "photo"
  secondary_separator = ";;;"
""")
    a, b = (s.captions for s in load_dataset_toml(path)[0])
    assert (a.shuffle_caption, a.keep_tokens, a.keep_tokens_separator, a.caption_prefix, a.caption_dropout_rate,
            a.caption_dropout_every_n_epochs, a.caption_tag_dropout_rate) == (True, 1, "|||", "sks,", 0.05, 3, 0.1)
    assert (b.shuffle_caption, b.keep_tokens, b.caption_prefix, b.caption_suffix, b.secondary_separator,
            b.caption_separator) == (False, 0, "sks,", "photo", ";;;", ",")


def test_caption_values_out_of_range_name_key_and_line(tmp_path):
    with pytest.raises(KilnError, match=r"'caption_dropout_rate' in .*line 4.* between 0 and 1, got 1.5"):
        load_dataset_toml(write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_dropout_rate = 1.5\n'))
    with pytest.raises(KilnError, match=r"'keep_tokens' .*at least 0, got -1"):
        load_dataset_toml(write(tmp_path, '[general]\nkeep_tokens = -1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'))
    with pytest.raises(KilnError, match=r"'caption_separator' .*must not be empty"):
        load_dataset_toml(write(tmp_path, '[general]\ncaption_separator = ""\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'))


def test_each_datasets_block_keeps_its_own_resolution_and_buckets(tmp_path):
    path = write(tmp_path, """
[general]
enable_bucket = true
batch_size = 2

[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "small"

[[datasets]]
resolution = [1024, 768]
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "large"
  [[datasets.subsets]]
  image_dir = "large_reg"
  is_reg = true
""")
    subsets, first, batch = load_dataset_toml(path)
    assert [s.block for s in subsets] == [0, 1, 1] and batch == 2
    assert subsets[0].buckets == first and first.resolution == (512, 512) and first.bucket_reso_steps == 64
    assert subsets[1].buckets == subsets[2].buckets
    assert subsets[1].buckets.resolution == (1024, 768) and subsets[1].buckets.bucket_reso_steps == 32
    assert subsets[1].buckets.enable_bucket


def test_each_block_keeps_its_own_batch_size(tmp_path):
    path = write(tmp_path, '[general]\nbatch_size = 3\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "a"\n'
                           '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "b"\n')
    subsets, _, batch_size = load_dataset_toml(path)
    assert [s.batch_size for s in subsets] == [2, 3] and [s.block for s in subsets] == [0, 1] and batch_size == 2



def test_validation_split_is_a_datasets_key_that_ascends_from_general(tmp_path):
    path = write(tmp_path, """
[general]
validation_split = 0.25

[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"

[[datasets]]
validation_split = 1.0
validation_seed = 7
  [[datasets.subsets]]
  image_dir = "b"
""")
    a, b = load_dataset_toml(path)[0]
    assert (a.validation_split, a.validation_seed, b.validation_split, b.validation_seed) == (0.25, None, 1.0, 7)
    with pytest.raises(KilnError, match=r"'validation_split' in .*line 4.*\[\[datasets\]\] key in kohya.*move it up"):
        load_dataset_toml(write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nvalidation_split = 0.1\n'))
    with pytest.raises(KilnError, match=r"'validation_split' .*between 0 and 1, got 1.5"):
        load_dataset_toml(write(tmp_path, '[general]\nvalidation_split = 1.5\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'))
