"""The custom socket types Kiln nodes pass between each other."""
from __future__ import annotations

from dataclasses import dataclass, replace

from comfy_api.latest import io

from ..trainer_core.data.cache import LatentCache
from ..trainer_core.data.dataset import Dataset

KilnDatasetType = io.Custom("KILN_DATASET")
KilnLoraConfigType = io.Custom("KILN_LORA_CONFIG")
KilnLoraType = io.Custom("KILN_LORA")


@dataclass(frozen=True)
class KilnDataset:
    """The dataset as it flows through the graph; Cache Latents fills in ``cache`` (and its VAE)."""
    dataset: Dataset
    cache: LatentCache | None = None
    vae: object = None

    def replace(self, **kw) -> "KilnDataset":
        return replace(self, **kw)
