"""The D-FINE detector (backbone → hybrid encoder → decoder) and its five official sizes.

``build_model("n")`` gives the network of ``configs/dfine/dfine_hgnetv2_n_coco.yml`` (and so on
for s, m, l, x), with the same module names as the official code so that official
checkpoints load with strict key matching (see ``dfine.checkpoint``).

Input: float32 ``(B, 3, H, W)``, RGB in [0, 1] (no mean/std normalisation), H and W multiples
of 32 (the official models are trained at 640x640). Output, in eval mode: ``pred_logits``
``(B, Q, num_classes)`` raw logits (sigmoid gives the score) and ``pred_boxes`` ``(B, Q, 4)``
normalized cx, cy, w, h; ``Q`` = 300 queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfine.decoder import DFineDecoder
from dfine.encoder import HybridEncoder
from dfine.hgnetv2 import HGNetv2

INPUT_MULTIPLE = 32


@dataclass(frozen=True)
class DFineSize:
    """Hyper-parameters that differ between the official sizes (the rest are shared)."""

    name: str
    backbone: str
    return_idx: tuple[int, ...]
    use_lab: bool
    freeze_norm: bool
    backbone_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    encoder_dim: int
    encoder_ffn: int
    expansion: float
    depth_mult: float
    decoder_dim: int
    decoder_ffn: int
    num_layers: int
    eval_idx: int
    num_points: tuple[int, ...]
    reg_scale: float


# From configs/dfine/dfine_hgnetv2_{n,s,m,l,x}_coco.yml over include/dfine_hgnetv2.yml.
SIZES: dict[str, DFineSize] = {
    "n": DFineSize(
        "n", "B0", (2, 3), True, False, (512, 1024), (16, 32),
        128, 512, 0.34, 0.5, 128, 512, 3, -1, (6, 6), 4.0,
    ),
    "s": DFineSize(
        "s", "B0", (1, 2, 3), True, False, (256, 512, 1024), (8, 16, 32),
        256, 1024, 0.5, 0.34, 256, 1024, 3, -1, (3, 6, 3), 4.0,
    ),
    "m": DFineSize(
        "m", "B2", (1, 2, 3), True, False, (384, 768, 1536), (8, 16, 32),
        256, 1024, 1.0, 0.67, 256, 1024, 4, -1, (3, 6, 3), 4.0,
    ),
    "l": DFineSize(
        "l", "B4", (1, 2, 3), False, True, (512, 1024, 2048), (8, 16, 32),
        256, 1024, 1.0, 1.0, 256, 1024, 6, -1, (3, 6, 3), 4.0,
    ),
    "x": DFineSize(
        "x", "B5", (1, 2, 3), False, True, (512, 1024, 2048), (8, 16, 32),
        384, 2048, 1.0, 1.0, 256, 1024, 6, -1, (3, 6, 3), 8.0,
    ),
}


class DFINE(nn.Module):
    """Backbone, hybrid encoder and decoder; call the parts directly for intermediate maps.

    ``model.backbone(images)`` gives the backbone maps, ``model.encoder(maps)`` the encoder
    maps, ``model.decoder(encoder_maps)`` the predictions.
    """

    def __init__(self, backbone: HGNetv2, encoder: HybridEncoder, decoder: DFineDecoder, size: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.size = size

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detect.

        Args:
            images: float32 ``(B, 3, H, W)``, RGB in [0, 1]; H, W multiples of 32.

        Returns:
            ``pred_logits`` float32 ``(B, Q, num_classes)`` raw logits and ``pred_boxes``
            float32 ``(B, Q, 4)`` normalized cx, cy, w, h.
        """
        if self.training:
            # TRAINING HOOK: needs denoising groups from targets, all layers' outputs and
            # the D-FINE criterion; not part of this package yet.
            raise NotImplementedError("D-FINE training is not implemented; call model.eval() first")
        h, w = images.shape[-2:]
        if not torch.jit.is_tracing() and (h % INPUT_MULTIPLE or w % INPUT_MULTIPLE):
            raise ValueError(f"input height and width must be multiples of {INPUT_MULTIPLE}, got {h}x{w}")
        return self.decoder(self.encoder(self.backbone(images)))

    def deploy(self) -> DFINE:
        """Switch to eval mode and drop the decoder layers after ``eval_idx``, as the
        official deploy conversion does. Load the checkpoint first: strict loading needs them.
        """
        self.eval()
        self.decoder.drop_unused_layers()
        return self


def build_model(size: str, num_classes: int = 80) -> DFINE:
    """The D-FINE network of an official size, randomly initialised.

    Args:
        size: "n", "s", "m", "l" or "x" (case-insensitive).
        num_classes: classes of the heads (80 for COCO, 365 for Objects365).

    Raises:
        ValueError: unknown size or a non-positive class count.
    """
    key = size.lower() if isinstance(size, str) else size
    if key not in SIZES:
        raise ValueError(f"unknown D-FINE size {size!r}; valid sizes: {', '.join(SIZES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    cfg = SIZES[key]
    backbone = HGNetv2(cfg.backbone, cfg.return_idx, use_lab=cfg.use_lab, freeze_norm=cfg.freeze_norm)
    encoder = HybridEncoder(
        in_channels=cfg.backbone_channels,
        feat_strides=cfg.feat_strides,
        hidden_dim=cfg.encoder_dim,
        nhead=8,
        dim_feedforward=cfg.encoder_ffn,
        use_encoder_idx=(len(cfg.feat_strides) - 1,),
        num_encoder_layers=1,
        expansion=cfg.expansion,
        depth_mult=cfg.depth_mult,
    )
    decoder = DFineDecoder(
        num_classes=num_classes,
        hidden_dim=cfg.decoder_dim,
        num_queries=300,
        feat_channels=(cfg.encoder_dim,) * len(cfg.feat_strides),
        feat_strides=cfg.feat_strides,
        num_points=cfg.num_points,
        nhead=8,
        num_layers=cfg.num_layers,
        dim_feedforward=cfg.decoder_ffn,
        eval_idx=cfg.eval_idx,
        reg_max=32,
        reg_scale=cfg.reg_scale,
    )
    return DFINE(backbone, encoder, decoder, size=key)
