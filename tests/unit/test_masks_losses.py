import pytest
import torch
from PIL import Image

from trainer_core.data.masks import load_mask
from trainer_core.errors import KilnError
from trainer_core.maths.losses import elementwise, per_sample_loss


def test_alpha_and_folder_masks(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    m = load_mask("a.png", rgba, "alpha", None)
    assert m.getpixel((1, 1)) == 255 and m.getpixel((0, 0)) == 0
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (16, 16), (127, 0, 0)).save(tmp_path / "masks" / "a.png")  # R channel counts, other size
    m = load_mask(str(tmp_path / "a.jpg"), Image.new("RGB", (8, 8)), "folder", str(tmp_path / "masks"))
    assert m.size == (8, 8) and m.getpixel((3, 3)) == 127


def test_missing_masks_are_errors_unless_white_is_asked_for(tmp_path):
    with pytest.raises(KilnError, match="b.png.*same file name"):
        load_mask(str(tmp_path / "b.png"), Image.new("RGB", (4, 4)), "folder", str(tmp_path))
    # kohya converts an image without alpha to RGBA: fully opaque, the whole image trains (no error)
    for white in (False, True):
        assert load_mask("c.png", Image.new("RGB", (4, 4)), "alpha", None, white).getextrema() == (255, 255)


def test_alpha_mask_subsets_warn_once_about_images_without_alpha(tmp_path):
    from trainer_core.data.buckets import BucketConfig
    from trainer_core.data.dataset import build_dataset
    from trainer_core.data.toml_config import load_dataset_toml
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
    Image.new("RGBA", (8, 8)).save(folder / "c.png")
    (tmp_path / "d.toml").write_text(f'[[datasets]]\nresolution = 8\n[[datasets.subsets]]\nimage_dir = "{folder}"\n'
                                     f'alpha_mask = true\n', encoding="utf-8")
    subsets, buckets, batch = load_dataset_toml(str(tmp_path / "d.toml"))
    ds = build_dataset(subsets, buckets, batch)
    assert len(ds.report) == 1 and "2 of 3 images have no alpha channel (e.g. a.png)" in ds.report[0]
    assert "fully opaque" in ds.summary()
    plain = build_dataset([subsets[0].__class__(str(folder))], BucketConfig((8, 8), enable_bucket=False))
    assert plain.report == [] and len(plain.with_masks("alpha", None, False).report) == 1


def test_masked_region_gives_zero_gradient_and_grey_gives_half():
    target = torch.zeros(1, 4, 2, 2)
    mask = torch.tensor([[[[0.0, 1.0], [127 / 255, 1.0]]]])
    pred = torch.ones(1, 4, 2, 2, requires_grad=True)
    per_sample_loss(elementwise(pred, target), mask).sum().backward()
    g = pred.grad[0, 0]
    assert g[0, 0] == 0
    assert torch.isclose(g[1, 0] / g[0, 1], torch.tensor(127 / 255))


def test_normalize_by_area_makes_small_subjects_weigh_the_same():
    err = torch.ones(2, 4, 4, 4)
    small = torch.zeros(2, 1, 4, 4)
    small[0, :, 0, 0] = 1
    small[1] = 1
    plain = per_sample_loss(err, small)
    norm = per_sample_loss(err, small, normalize_by_area=True)
    assert plain[0] < plain[1] and torch.allclose(norm, torch.ones(2))


def test_latent_mask_area_average_and_dilation():
    from trainer_core.data.cache import latent_mask
    m = torch.zeros(1, 64, 64)
    m[:, 32:40, 32:40] = 1.0          # exactly one latent pixel at (4, 4)
    m[:, 0:4, 0:8] = 1.0              # half of latent pixel (0, 0)
    lm = latent_mask(m, (8, 8))
    assert lm[0, 4, 4] == 1 and lm[0, 0, 0] == 0.5 and lm.sum() == 1.5
    grown = latent_mask(m, (8, 8), dilation=1)
    assert (grown[0, 3:6, 3:6] == 1).all() and grown[0, 2, 2] == 0
