"""Latent cache: every image (and its mask) encoded once, in same-bucket VAE batches.

``encode`` is the host's VAE as a function of BCHW pixels in [0, 1]; latents are stored exactly as
it returns them (the family applies the model's latent scaling at train time). Entries are looked up
first in a ``MemoryStore`` and then a ``DiskStore`` (see latent_store.py for what the keys cover), so a
second run over the same images encodes nothing and an edited image or mask re-encodes only itself.

flip_aug: the mirror image is encoded too, from flipped pixels (a VAE is not mirror-symmetric, so
flipping the latent would not be the same thing); its mask goes through the very same geometry.
random_crop / color_aug need new pixels every epoch, so they are refused here, as kohya refuses them
together with latent caching.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .captions import CaptionOptions
from .dataset import Dataset, ImageItem, Subset
from .images import open_image
from .masks import INPUT_MASKS, image_and_mask, image_rgb, load_mask, mask_file_for
from .transforms import Geometry, apply_geometry, plan_geometry, to_tensor
from ..errors import KilnError
from ..training import distributed
from .latent_store import DiskStore, Entry, MemoryStore, entry_key, file_digest

log = logging.getLogger("kiln")

FRESH_PIXEL_AUGS = ("random_crop", "color_aug")


@dataclass
class CachedSample:
    latent: torch.Tensor              # [C, h, w], float32, CPU
    mask: torch.Tensor | None         # [1, h, w] in [0, 1] at latent size, or None
    caption: str
    repeats: int
    is_reg: bool
    geometry: Geometry
    path: str
    captions: CaptionOptions = CaptionOptions()  # its subset's augmentation, applied each time it is drawn
    flipped_latent: torch.Tensor | None = None   # flip_aug: the mirror image's latent
    flipped_mask: torch.Tensor | None = None
    block: int = 0                               # [[datasets]] block: batches never mix blocks (kohya)
    batch_size: int = 0                          # its block's batch size; 0: the training's

    def __repr__(self) -> str:
        mask = "none" if self.mask is None else tuple(self.mask.shape)
        return (f"CachedSample({self.path!r}, latent {tuple(self.latent.shape)}, mask {mask}, "
                f"flipped twin {self.flipped_latent is not None}, repeats {self.repeats})")

    def drawn_geometry(self, flip: bool) -> Geometry:
        """The geometry of what ``view(flip)`` returns (the mirrored twin's, when it is the one drawn)."""
        return replace(self.geometry, flip=True) if flip and self.flipped_latent is not None else self.geometry

    def view(self, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latent, mask), mirrored when ``flip`` and this sample has a flipped twin."""
        if flip and self.flipped_latent is not None:
            return self.flipped_latent, self.flipped_mask
        return self.latent, self.mask


@dataclass
class CacheStats:
    encoded: int = 0        # latents the VAE computed in this run
    from_memory: int = 0
    from_disk: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        total = self.encoded + self.from_memory + self.from_disk
        return (f"{total} latents: {self.encoded} encoded, {self.from_memory} reused from memory, "
                f"{self.from_disk} from the disk cache ({self.seconds:.1f} s)")


@dataclass
class LatentCache:
    samples: list[CachedSample]
    dataset: Dataset
    encoder_id: str
    seconds: float = 0.0
    stats: CacheStats = field(default_factory=CacheStats)

    def __repr__(self) -> str:  # short: hosts repr node inputs (asyncio task names, error reports)
        return (f"LatentCache({len(self.samples)} samples, encoder {self.encoder_id}, masks {self.has_masks}, "
                f"{self.stats.summary()})")

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LatentCache":
        """The same cache with ``fn`` applied to every tensor (e.g. to make them autograd-safe)."""
        def f(t):
            return None if t is None else fn(t)
        samples = [replace(s, latent=f(s.latent), mask=f(s.mask), flipped_latent=f(s.flipped_latent),
                           flipped_mask=f(s.flipped_mask)) for s in self.samples]
        return replace(self, samples=samples)


def refuse_uncacheable(dataset: Dataset, node: str = "Cache Latents") -> None:
    """random_crop / color_aug cannot be trained from cached latents: say which subset and what to do."""
    for k, s in enumerate(dataset.subsets):
        bad = [name for name in FRESH_PIXEL_AUGS if getattr(s, name)]
        if bad:
            keys = " and ".join(f"{b} = true" for b in bad)
            raise KilnError(
                f"{node}: subset {k + 1} ({s.image_dir}) has {keys}, which needs freshly augmented pixels every "
                f"epoch and so cannot be trained from cached latents (kohya refuses the same combination). Set "
                f"{' and '.join(f'{b} = false' for b in bad)} for that subset in the dataset TOML: Kiln crops the "
                f"centre of each bucket; flip_aug = true is the augmentation that works with the cache.")


def training_pixels(rgb, mask, g: Geometry):
    """(CHW pixels in [0,1], 1HW mask or None) as the VAE sees them: image and mask through one geometry."""
    return to_tensor(apply_geometry(rgb, g)), (to_tensor(apply_geometry(mask, g)) if mask is not None else None)


def item_geometry(item: ImageItem, flip: bool = False) -> Geometry:
    """The resize/crop (and flip) an item trains with: its upright size covered onto its bucket, centre crop."""
    return plan_geometry(item.size, item.bucket, flip)


def item_digest(item: ImageItem) -> str:
    """The content key of an item's image: its file's bytes, or the in-memory pixels' digest."""
    return item.source.digest if item.source is not None else file_digest(item.path)


def load_pixels(path: str, bucket, subset: Subset, flip: bool = False):
    """(CHW pixels in [0,1], 1HW mask or None, geometry) with the mask cropped exactly like the image."""
    image = open_image(path)
    mask = load_mask(path, image, subset.mask_mode, subset.mask_dir, subset.missing_mask_is_white)
    g = plan_geometry(image.size, bucket, flip)
    pixels, m = training_pixels(image_rgb(image), mask, g)
    return pixels, m, g


def area_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """1HW pixel mask -> latent size by area averaging."""
    return F.interpolate(mask[None], size=tuple(size), mode="area")[0]


def dilate(mask: torch.Tensor | None, dilation: int) -> torch.Tensor | None:
    """Grow a 1hw latent mask by ``dilation`` latent pixels (symmetric, so it commutes with flips)."""
    if mask is None or dilation <= 0:
        return mask
    return F.max_pool2d(mask[None], 2 * dilation + 1, stride=1, padding=dilation)[0]


def latent_mask(mask: torch.Tensor, size, dilation: int = 0) -> torch.Tensor:
    """1HW pixel mask -> latent size by area averaging, then optionally grown by ``dilation`` latent pixels."""
    return dilate(area_mask(mask, size), dilation)


def mask_token(item: ImageItem, subset: Subset) -> str:
    """What the mask of ``item`` depends on besides the image bytes (part of the cache key)."""
    if subset.mask_mode == "none":
        return "none"
    if subset.mask_mode == INPUT_MASKS:  # the mask's own content, handed over with the image
        return f"input {item.source.mask_digest}" if item.source is not None else "input none"
    if subset.mask_mode == "alpha":  # the alpha channel is in the image's own bytes
        return "alpha, missing=white" if subset.missing_mask_is_white else "alpha"
    if subset.mask_mode == "folder":
        path = mask_file_for(item.path, subset.mask_dir, subset.missing_mask_is_white)
        return f"file {file_digest(path)}" if path else "folder, missing=white"
    raise KilnError(f"unknown mask mode {subset.mask_mode!r} in subset {subset.image_dir}")


def format_seconds(s: float) -> str:
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def eta_text(done: int, total: int, elapsed: float) -> str:
    """'12/40 images, ETA 8 s' (the ETA from the mean rate so far; none before the first batch)."""
    if done <= 0 or elapsed <= 0:
        return f"{done}/{total} images"
    return f"{done}/{total} images, ETA {format_seconds((total - done) * elapsed / done)}"


@dataclass(frozen=True)
class _Job:
    item: int
    flip: bool
    geometry: Geometry
    key: str


def _plan_jobs(dataset: Dataset, encoder_id: str) -> list[_Job]:
    """One job per latent to have: every item, plus its mirror image under flip_aug."""
    jobs = []
    for idx, item in enumerate(dataset.items):
        subset = dataset.subsets[item.subset]
        image_digest, token = item_digest(item), mask_token(item, subset)
        for flip in (False, True) if subset.flip_aug else (False,):
            g = item_geometry(item, flip)
            jobs.append(_Job(idx, flip, g, entry_key(image_digest, token, g, encoder_id)))
    return jobs


def _load_chunk(dataset: Dataset, chunk: list[_Job]):
    """Pixels and pixel masks of a batch; an image shared by a job and its flipped twin is read once."""
    opened: dict[int, tuple] = {}
    out = []
    for job in chunk:
        item = dataset.items[job.item]
        if job.item not in opened:
            image, mask = image_and_mask(item, dataset.subsets[item.subset])
            opened[job.item] = (image_rgb(image), mask)
        out.append(training_pixels(*opened[job.item], job.geometry))
    return out


def encode_dataset(dataset: Dataset, encode: Callable[[torch.Tensor], torch.Tensor], encoder_id: str,
                   batch_size: int = 4, progress: Callable[[int, int, str], None] | None = None,
                   memory: MemoryStore | None = None, disk: DiskStore | None = None) -> LatentCache:
    """Latents (and latent-size masks) of every item, from ``memory`` / ``disk`` where they hold the same
    key, else encoded in same-bucket batches of ``batch_size`` and stored in both.

    ``progress(done, total, text)`` is called after every VAE batch, counting only latents to encode.

    In a multi-process run with a disk cache, each rank encodes every world-th latent (as kohya) into the shared
    disk cache and, after a barrier, reads the others' from it; one it cannot find there (a node-local cache folder
    on a multi-node run) it encodes itself.
    """
    refuse_uncacheable(dataset)
    start = time.perf_counter()
    stats = CacheStats()
    jobs = _plan_jobs(dataset, encoder_id)
    entries: dict[tuple[int, bool], Entry] = {}
    todo: list[_Job] = []
    scheduled: set[str] = set()
    twins: list[_Job] = []  # the key of a job already to encode: the same image (mask, crop) again, encoded once
    for job in jobs:
        if job.key in scheduled:
            twins.append(job)
            continue
        entry = memory.get(job.key) if memory is not None else None
        if entry is not None:
            stats.from_memory += 1
        elif disk is not None and (entry := disk.get(job.key)) is not None:
            stats.from_disk += 1
            if memory is not None:
                memory.put(job.key, entry)
        if entry is None:
            todo.append(job)
            scheduled.add(job.key)
        else:
            entries[job.item, job.flip] = entry

    split = disk is not None and distributed.world() > 1
    position = {id(job): k for k, job in enumerate(jobs)}
    mine = [j for j in todo if position[id(j)] % distributed.world() == distributed.rank()] if split else todo
    encode_start = time.perf_counter()

    def encode_all(batch_jobs: list[_Job]) -> None:
        by_bucket: dict[tuple[int, int], list[_Job]] = defaultdict(list)
        for job in batch_jobs:
            by_bucket[job.geometry.bucket].append(job)
        chunks = [jobs_[b:b + batch_size] for jobs_ in by_bucket.values() for b in range(0, len(jobs_), batch_size)]
        # one batch ahead: decoding and resizing (PIL releases the GIL) overlap the VAE instead of stalling it
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-cache-load") as pool:
            pending = pool.submit(_load_chunk, dataset, chunks[0]) if chunks else None
            for n, chunk in enumerate(chunks):
                loaded = pending.result()
                pending = pool.submit(_load_chunk, dataset, chunks[n + 1]) if n + 1 < len(chunks) else None
                with torch.no_grad():
                    latents = encode(torch.stack([p for p, _ in loaded])).float().cpu()
                if not torch.isfinite(latents).all():
                    raise KilnError(f"the VAE returned NaN/inf latents for {dataset.items[chunk[0].item].path} "
                                    f"(batch of {len(chunk)}): try the VAE in fp32.")
                for job, (_, mask), lat in zip(chunk, loaded, latents):
                    entry = Entry(lat, area_mask(mask, lat.shape[-2:]) if mask is not None else None)
                    entries[job.item, job.flip] = entry
                    if memory is not None:
                        memory.put(job.key, entry)
                    if disk is not None:
                        disk.put(job.key, entry, source=dataset.items[job.item].path)
                stats.encoded += len(chunk)
                if progress:
                    progress(stats.encoded, len(mine), eta_text(stats.encoded, len(mine),
                                                                time.perf_counter() - encode_start))

    encode_all(mine)
    if split:
        distributed.barrier()  # every rank's share is on disk now
        missing = []
        for job in todo:
            if (job.item, job.flip) in entries:
                continue
            entry = disk.get(job.key)
            if entry is None:
                missing.append(job)
                continue
            stats.from_disk += 1
            entries[job.item, job.flip] = entry
            if memory is not None:
                memory.put(job.key, entry)
        encode_all(missing)

    encoded = {job.key: entries[job.item, job.flip] for job in todo}
    for job in twins:
        entries[job.item, job.flip] = encoded[job.key]
        stats.from_memory += 1
    repeats = dataset.sample_repeats()
    geometry = {job.item: job.geometry for job in jobs if not job.flip}
    samples = []
    for i, item in enumerate(dataset.items):
        subset = dataset.subsets[item.subset]
        plain, mirrored = entries[i, False], entries.get((i, True))
        if plain.mask is not None and not bool((plain.mask > 0).any()):
            log.warning("kiln: the mask of %s is entirely black: this image contributes nothing to training. "
                        "Check its mask (white = train), or remove the image.", item.path)
        samples.append(CachedSample(
            plain.latent, dilate(plain.mask, subset.mask_dilation), item.caption, repeats[i], subset.is_reg,
            geometry[i], item.path, subset.captions,
            flipped_latent=mirrored.latent if mirrored else None,
            flipped_mask=dilate(mirrored.mask, subset.mask_dilation) if mirrored else None,
            block=subset.block, batch_size=subset.batch_size))
    stats.seconds = time.perf_counter() - start
    return LatentCache(samples, dataset, encoder_id, stats.seconds, stats)
