"""Training data in one import: reading and validation (``datasets``), augmentation (``augment``),
batches (``loader``). The modules below hold the code; this one only gathers their public names."""

from __future__ import annotations

from dfine.train.augment import AugmentPolicy, build_transform
from dfine.train.datasets import (
    DatasetError,
    DatasetSpec,
    Sample,
    load_dataset,
    to_coco_ground_truth,
)
from dfine.train.loader import (
    DetectionDataset,
    EpochBatchSampler,
    MultiScaleCollate,
    collate_batch,
    make_loader,
    multiscale_sizes,
)

__all__ = [
    "AugmentPolicy",
    "DatasetError",
    "DatasetSpec",
    "DetectionDataset",
    "EpochBatchSampler",
    "MultiScaleCollate",
    "Sample",
    "build_transform",
    "collate_batch",
    "load_dataset",
    "make_loader",
    "multiscale_sizes",
    "to_coco_ground_truth",
]
