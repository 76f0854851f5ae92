"""D-FINE in PyTorch: the network, checkpoint loading and postprocessing.

model = dfine.build_model("n")
dfine.load_checkpoint(model, "dfine_n_coco.pth")
outputs = model.eval()(images)            # images: float32 (B, 3, H, W) in [0, 1]
labels, boxes_xyxy, scores = dfine.PostProcessor()(outputs, orig_sizes_wh)
"""

from __future__ import annotations

from dfine.checkpoint import CheckpointError, load_checkpoint
from dfine.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from dfine.criterion import Criterion
from dfine.matcher import HungarianMatcher
from dfine.model import DFINE, SIZES, DFineSize, build_model
from dfine.postprocess import PostProcessor

__all__ = [
    "COCO_CATEGORY_IDS",
    "COCO_CLASSES",
    "DFINE",
    "SIZES",
    "CheckpointError",
    "Criterion",
    "DFineSize",
    "HungarianMatcher",
    "PostProcessor",
    "build_model",
    "load_checkpoint",
]
