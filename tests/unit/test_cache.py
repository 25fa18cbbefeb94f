"""The latent cache (trainer_core/data/cache.py + latent_store.py): reuse from memory and disk, what
invalidates an entry, damaged files, flip_aug's mirrored latents, and the refusal of random_crop."""
import logging
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fixtures.datasets import make_dataset
from trainer_core.data.cache import encode_dataset, eta_text, load_pixels
from trainer_core.data.buckets import BucketConfig
from trainer_core.data.dataset import build_dataset, subsets_from_folder
from trainer_core.errors import KilnError
from trainer_core.data.latent_store import DiskStore, Entry, MemoryStore

BUCKETS = BucketConfig((64, 64), True, 32, 128, 32)


class CountingVAE:
    """Stands in for a VAE: 8x down-sampling that is NOT mirror-symmetric (a cumulative sum along the
    width first), so a flipped latent can only come from flipped pixels. Counts calls and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, px: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += px.shape[0]
        z = F.avg_pool2d(px.cumsum(-1) / px.shape[-1], 8)
        return torch.cat([z, z[:, :1] * 0.5], dim=1)  # 4 channels like SD


def dataset(root, mode="none", mask_dir=None, flip_aug=False):
    ds = build_dataset(subsets_from_folder(str(root / "train"), flip_aug=flip_aug), BUCKETS)
    return ds.with_masks(mode, mask_dir, missing_is_white=False) if mode != "none" else ds


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", count=6)


def run(ds, vae, memory=None, disk=None, **kw):
    return encode_dataset(ds, vae, "vae-a", batch_size=4, memory=memory, disk=disk, **kw)


def test_second_run_encodes_nothing_from_disk_or_memory(data, tmp_path):
    ds = dataset(data["root"])
    disk = DiskStore(str(tmp_path / "cache"))
    first_vae, second_vae = CountingVAE(), CountingVAE()
    first = run(ds, first_vae, MemoryStore(), disk)
    assert first_vae.images == 6 and first.stats.encoded == 6
    # a new process: empty memory, same disk folder
    second = run(ds, second_vae, MemoryStore(), DiskStore(str(tmp_path / "cache")))
    assert second_vae.calls == 0 and second.stats.from_disk == 6
    for a, b in zip(first.samples, second.samples):
        assert torch.equal(a.latent, b.latent) and a.path == b.path and a.geometry == b.geometry
    # in-memory reuse: no disk at all
    memory, third_vae = MemoryStore(), CountingVAE()
    run(ds, CountingVAE(), memory)
    again = run(ds, third_vae, memory)
    assert third_vae.calls == 0 and again.stats.from_memory == 6
    assert not [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".safetensors")]  # no temp files left


def test_a_different_vae_never_reuses_entries(data, tmp_path):
    ds = dataset(data["root"])
    disk = DiskStore(str(tmp_path / "cache"))
    run(ds, CountingVAE(), MemoryStore(), disk)
    vae = CountingVAE()
    encode_dataset(ds, vae, "vae-b", memory=MemoryStore(), disk=disk)
    assert vae.images == 6


def test_changing_one_image_reencodes_only_that_item(data, tmp_path):
    ds = dataset(data["root"])
    disk = DiskStore(str(tmp_path / "cache"))
    before = run(ds, CountingVAE(), MemoryStore(), disk)
    changed = data["images"][2]
    im = Image.open(changed)
    im.load()
    ImageDraw.Draw(im).rectangle((0, 0, 20, 20), fill=(0, 0, 255) if im.mode == "RGB" else (0, 0, 255, 255))
    im.save(changed, quality=95) if changed.suffix == ".jpg" else im.save(changed)
    vae = CountingVAE()
    after = run(dataset(data["root"]), vae, MemoryStore(), disk)
    assert vae.images == 1 and after.stats.from_disk == 5
    for a, b in zip(before.samples, after.samples):
        assert torch.equal(a.latent, b.latent) == (a.path != str(changed)), a.path


def test_changing_one_mask_reencodes_only_that_item(data, tmp_path):
    ds = dataset(data["root"], "folder", str(data["mask_dir"]))
    disk = DiskStore(str(tmp_path / "cache"))
    memory = MemoryStore()
    before = run(ds, CountingVAE(), memory, disk)
    assert before.has_masks
    Image.new("L", Image.open(data["masks"][3]).size, 255).save(data["masks"][3])  # now all white
    vae = CountingVAE()
    after = run(dataset(data["root"], "folder", str(data["mask_dir"])), vae, memory, disk)
    assert vae.images == 1 and after.stats.from_memory == 5
    changed = [k for k, (a, b) in enumerate(zip(before.samples, after.samples)) if not torch.equal(a.mask, b.mask)]
    assert changed == [3] and bool((after.samples[3].mask == 1).all())


def test_switching_masks_on_and_off_never_reuses_a_stale_entry(data, tmp_path):
    disk = DiskStore(str(tmp_path / "cache"))
    plain = run(dataset(data["root"]), CountingVAE(), MemoryStore(), disk)
    assert not plain.has_masks
    vae = CountingVAE()
    masked = run(dataset(data["root"], "folder", str(data["mask_dir"])), vae, MemoryStore(), disk)
    assert vae.images == 6 and all(s.mask is not None for s in masked.samples)
    vae = CountingVAE()
    off = run(dataset(data["root"]), vae, MemoryStore(), disk)  # both kinds are on disk now: nothing to encode
    assert vae.calls == 0 and all(s.mask is None for s in off.samples)
    # another mask folder (same file names, other content) is another mask: new entries
    other = tmp_path / "other_masks"
    other.mkdir()
    for m in data["masks"]:
        Image.new("L", Image.open(m).size, 64).save(other / m.name)
    vae = CountingVAE()
    grey = run(dataset(data["root"], "folder", str(other)), vae, MemoryStore(), disk)
    assert vae.images == 6 and all(torch.allclose(s.mask, torch.full_like(s.mask, 64 / 255)) for s in grey.samples)
    # alpha mode keys differently from "none" although the alpha lives in the image's own bytes
    alpha = replace(dataset(data["root"]), subsets=[replace(s, mask_mode="alpha", missing_mask_is_white=True)
                                                      for s in dataset(data["root"]).subsets])
    vae = CountingVAE()
    assert run(alpha, vae, MemoryStore(), disk).has_masks and vae.images == 6


def test_a_corrupt_cache_file_is_reencoded_with_a_warning_naming_it(data, tmp_path, caplog):
    ds = dataset(data["root"])
    folder = tmp_path / "cache"
    first = run(ds, CountingVAE(), MemoryStore(), DiskStore(str(folder)))
    files = sorted(folder.iterdir())
    truncated, garbage = files[0], files[1]
    truncated.write_bytes(truncated.read_bytes()[:-7])
    garbage.write_bytes(b"not a safetensors file at all")
    vae = CountingVAE()
    with caplog.at_level(logging.WARNING, logger="kiln"):
        second = run(ds, vae, MemoryStore(), DiskStore(str(folder)))
    assert vae.images == 2 and second.stats.from_disk == 4
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert str(truncated) in warned and str(garbage) in warned and "encoding its image again" in warned
    for a, b in zip(first.samples, second.samples):
        assert torch.equal(a.latent, b.latent)
    vae = CountingVAE()
    run(ds, vae, MemoryStore(), DiskStore(str(folder)))  # the rewritten files are good again
    assert vae.calls == 0


def test_a_cache_file_under_the_wrong_name_is_not_trusted(data, tmp_path, caplog):
    ds = dataset(data["root"])
    folder = tmp_path / "cache"
    run(ds, CountingVAE(), MemoryStore(), DiskStore(str(folder)))
    a, b = sorted(folder.iterdir())[:2]
    os.replace(a, b)  # b's name now holds a's latent
    vae = CountingVAE()
    with caplog.at_level(logging.WARNING, logger="kiln"):
        run(ds, vae, MemoryStore(), DiskStore(str(folder)))
    assert vae.images == 2  # a is gone, b is refused
    assert str(b) in caplog.text and "does not match" in caplog.text


def test_flip_aug_caches_the_latent_of_the_flipped_pixels_and_its_flipped_mask(tmp_path):
    folder = tmp_path / "train" / "1_thing"
    masks = tmp_path / "masks"
    folder.mkdir(parents=True)
    masks.mkdir()
    img, mask = Image.new("RGB", (96, 64), (0, 0, 0)), Image.new("L", (96, 64), 0)
    ImageDraw.Draw(img).rectangle((60, 8, 90, 30), fill=(255, 255, 255))  # off-centre: asymmetric
    ImageDraw.Draw(mask).rectangle((60, 8, 90, 30), fill=255)
    img.save(folder / "a.png")
    mask.save(masks / "a.png")
    ds = build_dataset(subsets_from_folder(str(tmp_path / "train"), flip_aug=True), BUCKETS)
    ds = ds.with_masks("folder", str(masks), False)
    vae = CountingVAE()
    cache = run(ds, vae, MemoryStore())
    assert vae.images == 2 and cache.stats.encoded == 2
    (s,) = cache.samples
    px, m, g = load_pixels(s.path, ds.items[0].bucket, ds.subsets[0], flip=True)
    assert g.flip and not s.geometry.flip
    assert torch.equal(s.flipped_latent, vae(px[None])[0].float())
    assert not torch.allclose(s.flipped_latent, s.latent.flip(-1))  # not merely the mirrored latent
    assert torch.equal(s.flipped_mask, s.mask.flip(-1))
    assert s.mask[0, 1:3, 6:8].min() > 0.5 and s.mask[0, :, :4].max() == 0  # the marker sits on the right
    assert torch.equal(s.view(True)[0], s.flipped_latent) and torch.equal(s.view(False)[0], s.latent)
    plain = run(build_dataset(subsets_from_folder(str(tmp_path / "train")), BUCKETS), CountingVAE(), MemoryStore())
    assert plain.samples[0].flipped_latent is None and torch.equal(plain.samples[0].view(True)[0], plain.samples[0].latent)


def test_random_crop_and_color_aug_are_refused_naming_the_subset(data):
    ds = dataset(data["root"])
    for key in ("random_crop", "color_aug"):
        bad = replace(ds, subsets=[replace(ds.subsets[0], **{key: True})])
        vae = CountingVAE()
        with pytest.raises(KilnError, match=rf"subset 1 \(.*5_kiln toy\) has {key} = true.*cached latents.*"
                                             rf"Set {key} = false"):
            run(bad, vae)
        assert vae.calls == 0


def test_progress_counts_what_is_encoded_with_an_eta(data):
    seen = []
    run(dataset(data["root"]), CountingVAE(), MemoryStore(), progress=lambda d, t, text: seen.append((d, t, text)))
    assert [(d, t) for d, t, _ in seen] == [(4, 6), (6, 6)]  # one 64x64 bucket: VAE batches of 4 and 2
    assert seen[0][2].startswith("4/6 images, ETA ")
    assert eta_text(0, 40, 0.0) == "0/40 images"
    assert eta_text(10, 40, 5.0) == "10/40 images, ETA 15 s"
    assert eta_text(1, 400, 2.0) == "1/400 images, ETA 13 min 18 s"


def test_memory_store_drops_least_recently_used_beyond_its_budget():
    e = Entry(torch.zeros(4, 8, 8), None)  # 1 KiB
    mem = MemoryStore(max_bytes=3 * e.nbytes)
    for k in "abc":
        mem.put(k, e)
    mem.get("a")
    mem.put("d", e)
    assert set(mem.entries) == {"a", "c", "d"} and mem.bytes == 3 * e.nbytes
