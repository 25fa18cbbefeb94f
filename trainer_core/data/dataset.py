"""The dataset definition: subsets of images with repeats, captions, masks and bucket settings.

A folder is read the kohya way: every ``N_name`` sub-folder is a subset repeated N times whose class
token is ``name``; images directly in the folder form a subset of their own.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from ..errors import KilnError
from .buckets import BucketConfig, bucket_resolutions, choose_bucket
from .captions import CaptionOptions, read_caption
from .images import MemoryImage, check_dir, is_image_file

log = logging.getLogger("kiln")

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Subset:
    image_dir: str
    num_repeats: int = 1
    class_tokens: str = ""
    caption_extension: str = ".txt"
    is_reg: bool = False
    mask_mode: str = "none"          # none | alpha | folder | input (masks handed over with in-memory images)
    mask_dir: str | None = None
    missing_mask_is_white: bool = False
    mask_dilation: int = 0           # grow masks by this many latent pixels (keeps thin details in)
    captions: CaptionOptions = CaptionOptions()
    buckets: BucketConfig | None = None   # its [[datasets]] block's own settings; None: the Dataset's
    block: int = 0                   # which [[datasets]] block of a TOML it came from (0 for folders)
    batch_size: int = 0              # its block's batch size; 0: the Dataset's
    flip_aug: bool = False           # also train on the mirror image (cached as a second latent)
    random_crop: bool = False        # kohya key; needs fresh pixels, so Cache Latents refuses it
    color_aug: bool = False          # kohya key; likewise refused together with latent caching
    validation_split: float | None = None  # its [[datasets]] block's own split (kohya: it overrides the training's)
    validation_seed: int | None = None     # and the seed of that split
    in_memory: bool = False          # images handed over by the graph (Dataset from Images), not files


@dataclass(frozen=True)
class ImageItem:
    path: str
    caption: str
    size: tuple[int, int]            # (w, h) of the upright image
    bucket: tuple[int, int]
    subset: int
    source: MemoryImage | None = field(default=None, compare=False, repr=False)  # in-memory pixels; None: a file


@dataclass
class Dataset:
    subsets: list[Subset]
    items: list[ImageItem]
    buckets: BucketConfig
    batch_size: int = 1
    skipped_files: int = 0
    report: list[str] = field(default_factory=list)

    def sample_repeats(self, held_out: frozenset[int] = frozenset()) -> list[int]:
        """Repeats per item for one epoch, with regularization images balanced the way kohya does:
        reg images are repeated (round-robin, one extra repeat at a time after their own repeats) until
        an epoch holds as many reg samples as training samples. Items in ``held_out`` (validation) get 0."""
        repeats = [0 if k in held_out else self.subsets[i.subset].num_repeats for k, i in enumerate(self.items)]
        reg = [k for k, i in enumerate(self.items) if self.subsets[i.subset].is_reg]
        if not reg:
            return repeats
        reg_set = set(reg)
        n_train = sum(r for k, r in enumerate(repeats) if k not in reg_set)
        out = [0 if k in reg_set else r for k, r in enumerate(repeats)]
        n, first = 0, True
        while n < n_train:
            for k in reg:
                if first:
                    out[k] = repeats[k]
                    n += repeats[k]
                else:
                    out[k] += 1
                    n += 1
                if n >= n_train:
                    break
            first = False
        return out

    def buckets_of(self, subset: Subset) -> BucketConfig:
        """The bucket settings a subset's images were placed with (its own block's, else the dataset's)."""
        return subset.buckets or self.buckets

    def check_mask_source(self, mode: str) -> None:
        """Alpha/Mask Source may not replace masks that came with in-memory images, nor look masks up by file
        name for images that have none: both refused by name."""
        from .masks import INPUT_MASKS
        for s in self.subsets:
            if s.mask_mode == INPUT_MASKS:
                raise KilnError("Alpha/Mask Source: this dataset already has masks from the masks input of Dataset "
                                "from Images; use one of the two: remove Alpha/Mask Source, or disconnect the masks "
                                "input of Dataset from Images.")
            if s.in_memory and mode == "folder":
                raise KilnError("Alpha/Mask Source: images from Dataset from Images have no file names to find masks "
                                "by in a mask folder; connect their masks to the masks input of Dataset from Images "
                                "instead (e.g. from Load Image's MASK or a mask node).")

    def with_masks(self, mode: str, mask_dir: str | None, missing_is_white: bool, dilation: int = 0) -> "Dataset":
        """The same images with masks from ``mode`` (Alpha/Mask Source)."""
        from .masks import opaque_alpha_notes
        self.check_mask_source(mode)
        subsets = [replace(s, mask_mode=mode, mask_dir=mask_dir or s.mask_dir, missing_mask_is_white=missing_is_white,
                           mask_dilation=dilation) for s in self.subsets]
        return replace(self, subsets=subsets, report=list(self.report) + opaque_alpha_notes(subsets, self.items))

    def summary(self) -> str:
        lines = list(self.report)
        per_subset = Counter(i.subset for i in self.items)
        for k, s in enumerate(self.subsets):
            aug = s.captions.describe()
            lines.append(f"subset {k}: {os.path.basename(s.image_dir.rstrip('/'))} — {per_subset[k]} images × "
                         f"{s.num_repeats} repeats{' (regularization)' if s.is_reg else ''}"
                         f"{', flip_aug' if s.flip_aug else ''}" + (f"; captions: {aug}" if aug else ""))
        configs = {s.block: self.buckets_of(s) for s in self.subsets}
        if len(set(configs.values())) > 1:
            for block, c in sorted(configs.items()):
                lines.append(f"dataset #{block + 1}: {c.resolution[0]}x{c.resolution[1]}, "
                             + (f"buckets {c.min_bucket_reso}-{c.max_bucket_reso} step {c.bucket_reso_steps}"
                                if c.enable_bucket else "no buckets"))
        hist = Counter(i.bucket for i in self.items)
        lines.append("buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(hist.items())))
        if self.skipped_files:
            lines.append(f"skipped {self.skipped_files} non-image files")
        return "\n".join(lines)


def subsets_from_folder(folder: str, caption_extension: str = ".txt", default_repeats: int = 1,
                        class_tokens: str = "", is_reg: bool = False, flip_aug: bool = False) -> list[Subset]:
    """``N_name`` sub-folders become subsets (N repeats, class token ``name``); loose images one more."""
    check_dir(folder, "dataset")
    subsets = []
    for entry in sorted(os.listdir(folder)):
        m = REPEAT_DIR.match(entry)
        if m and os.path.isdir(os.path.join(folder, entry)):
            subsets.append(Subset(os.path.join(folder, entry), int(m.group(1)), class_tokens or m.group(2),
                                  caption_extension, is_reg, flip_aug=flip_aug))
    if any(is_image_file(e) for e in os.listdir(folder)):
        subsets.append(Subset(folder, default_repeats, class_tokens, caption_extension, is_reg, flip_aug=flip_aug))
    return subsets


def dataset_from_images(images: list[MemoryImage], captions: list[str], subset: Subset, buckets: BucketConfig,
                        batch_size: int = 1) -> Dataset:
    """One in-memory subset (Dataset from Images), its images placed in buckets exactly as build_dataset places
    files. An empty caption falls back to the class token; item paths are labels such as
    'Dataset from Images/image 03' (used in messages and as a stable order), the pixels travel in ``source``."""
    if not images:
        raise KilnError("the dataset has no images: connect at least one image.")
    table = bucket_resolutions(buckets) if buckets.enable_bucket else None
    width = len(str(len(images) - 1))
    items = [ImageItem(f"{subset.image_dir}/image {k:0{width}d}", (caption or "").strip() or subset.class_tokens,
                       im.size, choose_bucket(im.size, buckets, table), 0, source=im)
             for k, (im, caption) in enumerate(zip(images, captions))]
    from .masks import opaque_alpha_notes
    return Dataset([subset], items, buckets, batch_size, 0, opaque_alpha_notes([subset], items))


def build_dataset(subsets: list[Subset], buckets: BucketConfig, batch_size: int = 1) -> Dataset:
    """Scan every subset: captions, upright sizes (header only) and bucket assignment."""
    from PIL import Image  # local: only the header is read here

    if not subsets:
        raise KilnError("the dataset has no images: put images (with .txt captions) in the folder, or in "
                        "kohya-style 'N_name' sub-folders such as '10_mychar'.")
    tables: dict[BucketConfig, list | None] = {}
    items, skipped = [], 0
    for k, s in enumerate(subsets):
        cfg = s.buckets or buckets  # kohya: every [[datasets]] block buckets its images by its own settings
        if cfg not in tables:
            tables[cfg] = bucket_resolutions(cfg) if cfg.enable_bucket else None
        check_dir(s.image_dir, "image")
        names = sorted(os.listdir(s.image_dir))
        images = [n for n in names if is_image_file(n) and os.path.isfile(os.path.join(s.image_dir, n))]
        caption_files = {n for n in names if n.lower().endswith(s.caption_extension.lower())}
        skipped += sum(1 for n in names if os.path.isfile(os.path.join(s.image_dir, n))
                       and n not in images and n not in caption_files)
        for n in images:
            path = os.path.join(s.image_dir, n)
            try:
                with Image.open(path) as im:
                    size = im.size
                    orientation = im.getexif().get(0x0112, 1)
            except Exception as e:
                raise KilnError(f"cannot read image {path}: {e}. Re-export it as PNG/JPEG or remove it.") from e
            if orientation in (5, 6, 7, 8):  # EXIF rotations by 90°: width and height swap
                size = (size[1], size[0])
            caption, _ = read_caption(path, s.caption_extension, s.class_tokens)
            items.append(ImageItem(path, caption, size, choose_bucket(size, cfg, tables[cfg]), k))
        if not images:
            raise KilnError(f"no images in {s.image_dir}: add PNG/JPEG/WebP files, or remove the folder.")
    from .masks import opaque_alpha_notes
    return Dataset(list(subsets), items, buckets, batch_size, skipped, opaque_alpha_notes(subsets, items))
