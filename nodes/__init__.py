"""Kiln's ComfyUI nodes: validation and conversion only; the training math lives in trainer_core."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .compare_nodes import KilnCompareLoras
from .dreambooth_nodes import KilnSaveCheckpoint, KilnTrainDreamBooth
from .export_nodes import KilnExportRun
from .dataset_nodes import KilnCacheLatents, KilnDatasetFromImages, KilnLoadDataset, KilnMaskSource
from .lora_nodes import KilnLoraConfig, KilnSaveLora
from .reg_images_nodes import KilnMakeRegImages
from .train_nodes import KilnTrainAnyModel, KilnTrainFlux, KilnTrainSD1, KilnTrainSD3, KilnTrainSDXL

NODES: list[type[io.ComfyNode]] = [KilnLoadDataset, KilnDatasetFromImages, KilnMaskSource, KilnCacheLatents, KilnLoraConfig,
                                 KilnTrainSD1, KilnTrainSDXL, KilnTrainSD3, KilnTrainFlux, KilnTrainAnyModel,
                                 KilnSaveLora,
                                 KilnTrainDreamBooth,
                                 KilnSaveCheckpoint, KilnMakeRegImages, KilnCompareLoras, KilnExportRun]


class KilnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> KilnExtension:
    return KilnExtension()
