"""The D-FINE detector (backbone → hybrid encoder → decoder) and its five official sizes.

``build_model("n")`` gives the network of ``configs/dfine/dfine_hgnetv2_n_coco.yml`` (and so on
for s, m, l, x), with the same module names as the official code so that official
checkpoints load with strict key matching (see ``dfine.checkpoint``).

Input: float32 ``(B, 3, H, W)``, RGB in [0, 1] (no mean/std normalisation), H and W multiples
of 32 (the official models are trained at 640x640). Output, in eval mode: ``pred_logits``
``(B, Q, num_classes)`` raw logits (sigmoid gives the score) and ``pred_boxes`` ``(B, Q, 4)``
normalized cx, cy, w, h; ``Q`` = 300 queries. In train mode, ``model(images, targets)`` gives
the official outputs dict that the D-FINE criterion reads (see ``DFineDecoder.forward_train``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfine.decoder import DFineDecoder
from dfine.denoising import DenoisingGroup
from dfine.encoder import HybridEncoder
from dfine.fuse import fuse_network
from dfine.hgnetv2 import HGNetv2

logger = logging.getLogger(__name__)

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
    # Backbone freezing for training (official HGNetv2 freeze_at / freeze_stem_only): stages
    # up to freeze_at (or only the stem) get requires_grad=False; -1 freezes nothing.
    freeze_at: int = -1
    freeze_stem_only: bool = True


# From configs/dfine/dfine_hgnetv2_{n,s,m,l,x}_coco.yml over include/dfine_hgnetv2.yml.
# One row per size reads as the table it is.
# fmt: off
SIZES: dict[str, DFineSize] = {
    "n": DFineSize(
        "n", "B0", (2, 3), True, False, (512, 1024), (16, 32),
        128, 512, 0.34, 0.5, 128, 512, 3, -1, (6, 6), 4.0, freeze_at=-1,
    ),
    "s": DFineSize(
        "s", "B0", (1, 2, 3), True, False, (256, 512, 1024), (8, 16, 32),
        256, 1024, 0.5, 0.34, 256, 1024, 3, -1, (3, 6, 3), 4.0, freeze_at=-1,
    ),
    "m": DFineSize(
        "m", "B2", (1, 2, 3), True, False, (384, 768, 1536), (8, 16, 32),
        256, 1024, 1.0, 0.67, 256, 1024, 4, -1, (3, 6, 3), 4.0, freeze_at=-1,
    ),
    "l": DFineSize(
        "l", "B4", (1, 2, 3), False, True, (512, 1024, 2048), (8, 16, 32),
        256, 1024, 1.0, 1.0, 256, 1024, 6, -1, (3, 6, 3), 4.0, freeze_at=0, freeze_stem_only=True,
    ),
    "x": DFineSize(
        "x", "B5", (1, 2, 3), False, True, (512, 1024, 2048), (8, 16, 32),
        384, 2048, 1.0, 1.0, 256, 1024, 6, -1, (3, 6, 3), 8.0, freeze_at=0, freeze_stem_only=True,
    ),
}
# fmt: on


class DFINE(nn.Module):
    """Backbone, hybrid encoder and decoder; call the parts directly for intermediate maps.

    ``model.backbone(images)`` gives the backbone maps, ``model.encoder(maps)`` the encoder
    maps, ``model.decoder(encoder_maps)`` the predictions.
    """

    def __init__(
        self, backbone: HGNetv2, encoder: HybridEncoder, decoder: DFineDecoder, size: str = ""
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.size = size
        self._deployed = False

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    def forward(
        self,
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        denoising: DenoisingGroup | None = None,
    ) -> dict[str, Any]:
        """Detect (eval mode) or produce the training outputs (train mode).

        Args:
            images: float32 ``(B, 3, H, W)``, RGB in [0, 1]; H, W multiples of 32.
            targets: train mode only: per image ``labels`` int64 ``(n,)`` and ``boxes``
                float32 ``(n, 4)`` normalised cx, cy, w, h, from which the denoising group is
                built (None: no denoising).
            denoising: train mode only: a ready denoising group, used instead of ``targets``.

        Returns:
            Eval mode: ``pred_logits`` float32 ``(B, Q, num_classes)`` raw logits and
            ``pred_boxes`` float32 ``(B, Q, 4)`` normalized cx, cy, w, h. Train mode: the
            official outputs dict (``DFineDecoder.forward_train``).
        """
        h, w = images.shape[-2:]
        if not torch.jit.is_tracing() and (h % INPUT_MULTIPLE or w % INPUT_MULTIPLE):
            raise ValueError(
                f"input height and width must be multiples of {INPUT_MULTIPLE}, got {h}x{w}"
            )
        if targets is not None and len(targets) != images.shape[0]:
            raise ValueError(
                f"got {len(targets)} targets for a batch of {images.shape[0]} images; "
                "pass one dict per image"
            )
        return self.decoder(self.encoder(self.backbone(images)), targets, denoising)

    @property
    def deployed(self) -> bool:
        """Whether ``deploy()`` has run (the network is then in its fused inference form)."""
        return self._deployed

    def deploy(self) -> DFINE:
        """Turn the network into its inference form, in place; idempotent.

        Eval mode; the decoder layers after ``eval_idx`` dropped (as the official deploy
        conversion does); every BatchNorm folded into its conv, HGNetv2's learnable affines
        folded likewise, each encoder RepVGG block merged into one 3x3 conv, and the stem's
        2x2 max-pool computed from shifted views (see ``dfine.fuse``). Outputs equal the
        training form's up to float32 rounding.

        Load the checkpoint first: afterwards the state dict differs. The ``bn.*`` / ``norm.*``
        keys are gone and each fused conv has a ``bias``; a ``ConvBNAct`` or ``ConvNorm`` at
        ``P`` keeps ``P.conv.weight`` and gains ``P.conv.bias`` (a learnable affine's
        ``P.lab.*`` are folded into them); an input projection ``...input_proj.i`` holds
        ``...input_proj.i.conv.{weight,bias}``; a RepVGG block at ``P`` becomes
        ``P.conv.{weight,bias}`` instead of ``P.conv1.*`` and ``P.conv2.*``; the dropped decoder
        layers' keys are gone. Loading a training-form state dict into a deployed model is
        refused (``ValueError``).
        """
        self.eval()
        if not self._deployed:
            self.decoder.drop_unused_layers()
            fused = fuse_network(self)
            # Channels-last convolutions are faster on CPUs (oneDNN's native layout) and on
            # CUDA tensor cores; the input may stay contiguous: the first conv converts it.
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self._deployed = True
            logger.debug("deploy: %d units fused", fused)
        return self

    def train(self, mode: bool = True) -> DFINE:
        """``nn.Module.train``; a deployed network is inference-only and refuses train mode."""
        if mode and getattr(self, "_deployed", False):
            raise ValueError(
                "this D-FINE network is deployed (inference-only: norms folded, layers dropped); "
                "build and load a new one to train"
            )
        return super().train(mode)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``; refuses a training-form state dict once deployed."""
        if self._deployed and any(k.endswith(".running_mean") for k in state_dict):
            raise ValueError(
                "this D-FINE network is deployed (norms folded into the convs) and cannot load a "
                "training-form state dict; load the checkpoint before calling deploy()"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_model(size: str, num_classes: int = 80, num_denoising: int = 100) -> DFINE:
    """The D-FINE network of an official size, randomly initialised.

    The backbone is frozen as the official training config of the size says (L and X: the
    stem's parameters have ``requires_grad=False`` and every backbone norm is a
    ``FrozenBatchNorm2d``; N, S and M: nothing frozen).

    Args:
        size: "n", "s", "m", "l" or "x" (case-insensitive).
        num_classes: classes of the heads (80 for COCO, 365 for Objects365).
        num_denoising: contrastive denoising queries requested per image in training (the
            official 100); 0 turns denoising off. The denoising embedding exists either way,
            so checkpoints load strictly.

    Raises:
        ValueError: unknown size, a non-positive class count or a negative num_denoising.
    """
    key = size.lower() if isinstance(size, str) else size
    if key not in SIZES:
        raise ValueError(f"unknown D-FINE size {size!r}; valid sizes: {', '.join(SIZES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if num_denoising < 0:
        raise ValueError(f"num_denoising must be 0 (off) or positive, got {num_denoising}")
    cfg = SIZES[key]
    backbone = HGNetv2(
        cfg.backbone,
        cfg.return_idx,
        use_lab=cfg.use_lab,
        freeze_norm=cfg.freeze_norm,
        freeze_at=cfg.freeze_at,
        freeze_stem_only=cfg.freeze_stem_only,
    )
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
        num_denoising=num_denoising,
    )
    return DFINE(backbone, encoder, decoder, size=key)
