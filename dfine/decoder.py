"""The D-FINE decoder: query selection, then layer-by-layer box refinement with FDR.

Input: the encoder maps, float32 ``(B, C, H / s_l, W / s_l)`` per level. Output (eval mode):
``pred_logits`` ``(B, Q, num_classes)`` raw class logits and ``pred_boxes`` ``(B, Q, 4)``
normalized cx, cy, w, h, from decoder layer ``eval_idx``.

1. Query selection: every cell of every level is an anchor box (centre of the cell,
   side ``0.05 * 2**level``); a linear + LayerNorm head scores each cell's memory, and the
   ``Q`` cells with the highest best-class logit become the queries (content = their memory,
   reference box = anchor + predicted correction).
2. Each decoder layer: self-attention among queries, deformable cross-attention into the
   memory around the reference box, a gate mixing the two, an FFN.
3. After layer 0, a head predicts the initial boxes; every layer then predicts edge
   distributions whose logits add to the previous layer's (FDR), integrated into box offsets
   from the initial boxes. The class logits of layer ``eval_idx`` get the LQE term.

In eval mode the layers after ``eval_idx`` are skipped (their weights stay loadable, as the
official checkpoints hold them; ``DFineDecoder.drop_unused_layers`` removes them).

In train mode every layer runs and the decoder returns the official outputs dict that the
criterion consumes (see ``DFineDecoder.forward_train``): each layer's logits, boxes and corner
logits, the layer-0 "pre" head, the encoder's top-k head, and, when a ``DenoisingGroup`` is
given or built from the targets, the same for the denoising queries placed in front of the
matching ones. Anchors are made from the actual feature shapes in both modes.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfine.deformable_attention import MSDeformableAttention
from dfine.denoising import DenoisingGroup, make_denoising_group
from dfine.fdr import LQE, distance_to_box, distribution_integral, weighting_function
from dfine.layers import MLP, bias_for_prior, inverse_sigmoid

# Anchor geometry of the query selection (fixed in the official code).
ANCHOR_GRID_SIZE = 0.05
ANCHOR_VALID_EPS = 1e-2
OFFICIAL_EVAL_SIZE_HW = (640, 640)


class Gate(nn.Module):
    """Sigmoid gates mixing the residual stream and the cross-attention output, then LayerNorm."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        nn.init.constant_(self.gate.bias, bias_for_prior(0.5))
        nn.init.zeros_(self.gate.weight)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], dim=-1))).chunk(2, dim=-1)
        return self.norm(g1 * x1 + g2 * x2)


class DecoderLayer(nn.Module):
    """Self-attention → deformable cross-attention (gated) → FFN, post-norm."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, num_points: list[int]
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, nhead, num_points)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        target: torch.Tensor,
        reference_boxes: torch.Tensor,
        values: list[torch.Tensor],
        spatial_shapes: list[tuple[int, int]],
        query_pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``target`` ``(B, Q, C)``, ``reference_boxes`` ``(B, Q, 1, 4)`` → ``(B, Q, C)``.

        ``attn_mask`` bool ``(Q, Q)``, True = blocked: keeps denoising groups apart in training.
        """
        q = k = target + query_pos
        # The averaged attention map is never used; in training, skipping it lets torch take its
        # fused kernel (a fifth of a CPU step). Inference keeps the unfused path, whose batched
        # and single-image results agree exactly (the fused one reorders near-tied queries).
        attn, _ = self.self_attn(
            q, k, value=target, attn_mask=attn_mask, need_weights=not self.training
        )
        target = self.norm1(target + attn)
        cross = self.cross_attn(target + query_pos, reference_boxes, values, spatial_shapes)
        target = self.gateway(target, cross)
        ffn = self.linear2(F.relu(self.linear1(target)))
        # The clamp keeps float16 runs finite; in float32 it never bites.
        return self.norm3((target + ffn).clamp(min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    """The stack of decoder layers and their LQE heads (official key prefix ``decoder.decoder``).

    ``up`` and ``reg_scale`` are the same parameters as the parent's (the official state
    dict holds them under both names).
    """

    def __init__(
        self,
        layer: DecoderLayer,
        num_layers: int,
        num_head: int,
        reg_max: int,
        up: nn.Parameter,
        reg_scale: nn.Parameter,
    ) -> None:
        super().__init__()
        self.num_head = num_head
        self.reg_max = reg_max
        self.up = up
        self.reg_scale = reg_scale
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LQE(4, 64, 2, reg_max) for _ in range(num_layers))

    def split_values(
        self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """``(B, L, C)`` memory → per level ``(B, heads, C / heads, H_l * W_l)``, contiguous.

        Copied once here because every layer samples them, and grid_sample on a CPU is
        markedly slower on strided maps.
        """
        b, length, c = memory.shape
        value = memory.reshape(b, length, self.num_head, c // self.num_head).permute(0, 2, 3, 1)
        return [v.contiguous() for v in value.split([h * w for h, w in spatial_shapes], dim=-1)]


class DFineDecoder(nn.Module):
    """Query selection + refinement decoder + heads (official class ``DFINETransformer``).

    Args:
        num_classes: classes of the score heads.
        hidden_dim: query width.
        num_queries: queries kept by the selection (300).
        feat_channels: channels of the encoder maps; a map whose width differs from
            ``hidden_dim`` gets a 1x1 conv + BN projection (only X: 384 → 256).
        feat_strides: strides of the encoder maps.
        num_points: deformable sampling points per level.
        nhead, num_layers, dim_feedforward: of the decoder layers.
        eval_idx: layer whose output is the prediction; negative counts from the end.
        reg_max: FDR bins minus one. reg_scale: FDR curvature (4, or 8 for X).
        num_denoising: denoising queries in training (only sizes the class embedding here).
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: tuple[int, ...] = (256, 256, 256),
        feat_strides: tuple[int, ...] = (8, 16, 32),
        num_points: tuple[int, ...] = (3, 6, 3),
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        eval_idx: int = -1,
        reg_max: int = 32,
        reg_scale: float = 4.0,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(feat_channels) != len(feat_strides) or len(num_points) != len(feat_strides):
            raise ValueError(
                "feat_channels, feat_strides and num_points need one entry per level, got "
                f"{feat_channels}, {feat_strides}, {num_points}"
            )
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(
                f"eval_idx must be in [-{num_layers}, {num_layers - 1}], got {eval_idx}"
            )
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.feat_strides = tuple(feat_strides)
        self.num_levels = len(feat_strides)
        self.num_layers = num_layers
        self.eval_idx = eval_idx % num_layers
        self.reg_max = reg_max
        self._anchor_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

        self.input_proj = nn.ModuleList(
            nn.Identity()
            if c == hidden_dim
            else nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(c, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim)
                )
            )
            for c in feat_channels
        )

        # Fixed FDR hyper-parameters, stored as (frozen) parameters as in the official model.
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        layer = DecoderLayer(hidden_dim, nhead, dim_feedforward, list(num_points))
        self.decoder = TransformerDecoder(
            layer, num_layers, nhead, reg_max, self.up, self.reg_scale
        )

        # Denoising queries take their content from these class embeddings (row num_classes
        # is the zero padding row); unused at inference. The embedding exists even with
        # num_denoising = 0, unlike the official model, so that every checkpoint (ours and
        # the official ones) loads strictly into every build.
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.denoising_class_embed = nn.Embedding(
            num_classes + 1, hidden_dim, padding_idx=num_classes
        )
        nn.init.normal_(self.denoising_class_embed.weight[:-1])

        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential(
            OrderedDict(proj=nn.Linear(hidden_dim, hidden_dim), norm=nn.LayerNorm(hidden_dim))
        )
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(
            nn.Linear(hidden_dim, num_classes) for _ in range(num_layers)
        )
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_bbox_head = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3) for _ in range(num_layers)
        )

        # Saved in the official checkpoints (computed for 640x640); kept so that they load
        # strictly, but anchors are recomputed for the size in use (see ``anchors_for``).
        anchors, valid_mask = generate_anchors(
            [
                (OFFICIAL_EVAL_SIZE_HW[0] // s, OFFICIAL_EVAL_SIZE_HW[1] // s)
                for s in self.feat_strides
            ]
        )
        self.register_buffer("anchors", anchors)
        self.register_buffer("valid_mask", valid_mask)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The official initialisation: heads start at a 1% class prior and at zero box
        # corrections (boxes = anchors, uniform edge distributions).
        prior = bias_for_prior(0.01)
        nn.init.constant_(self.enc_score_head.bias, prior)
        for head in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            assert isinstance(head, MLP)
            nn.init.zeros_(head.last.weight)
            nn.init.zeros_(head.last.bias)
        for linear in self.dec_score_head:
            assert isinstance(linear, nn.Linear)
            nn.init.constant_(linear.bias, prior)
        for linear in self.enc_output:
            if isinstance(linear, nn.Linear):
                nn.init.xavier_uniform_(linear.weight)
        for linear in self.query_pos_head.layers:
            assert isinstance(linear, nn.Linear)
            nn.init.xavier_uniform_(linear.weight)
        for proj in self.input_proj:
            for conv in proj.children():
                if isinstance(conv, nn.Conv2d):
                    nn.init.xavier_uniform_(conv.weight)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The anchor buffers depend on the training resolution only; a checkpoint trained at
        # another size carries other shapes. Take its buffers as they are instead of failing.
        for name in ("anchors", "valid_mask"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def drop_unused_layers(self) -> None:
        """Remove the decoder layers and heads after ``eval_idx`` (inference only).

        Do this after loading a checkpoint: the state dict no longer matches afterwards.
        """
        keep = self.eval_idx + 1
        self.decoder.layers = self.decoder.layers[:keep]
        self.decoder.lqe_layers = self.decoder.lqe_layers[:keep]
        self.dec_score_head = self.dec_score_head[:keep]
        self.dec_bbox_head = self.dec_bbox_head[:keep]

    def anchors_for(
        self, spatial_shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit-space anchors ``(1, L, 4)`` and their validity ``(1, L, 1)`` bool, cached per size."""
        key = (tuple(spatial_shapes), device, dtype)
        cached = self._anchor_cache.get(key)
        if cached is None:
            anchors, valid = generate_anchors(spatial_shapes)
            cached = (anchors.to(device=device, dtype=dtype), valid.to(device))
            self._anchor_cache[key] = cached
        return cached

    def flatten_features(
        self, feats: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Project the maps and flatten them into one ``(B, L, C)`` memory, finest level first."""
        if len(feats) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(feats)}")
        flat, shapes = [], []
        for proj, feat in zip(self.input_proj, feats):
            x = proj(feat)
            shapes.append((int(x.shape[2]), int(x.shape[3])))
            flat.append(x.flatten(2).permute(0, 2, 1))
        return torch.cat(flat, dim=1), shapes

    def _score_cells(
        self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]], anchor_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score every cell and pick the top ``Q``.

        Returns the class logits of every cell ``(B, L, num_classes)``, the selected
        indices ``(B, Q)`` int64 (best first), the selected cells' projected memory
        ``(B, Q, C)`` and their reference boxes as logits ``(B, Q, 4)``, none detached.
        """
        num_cells = sum(h * w for h, w in spatial_shapes)
        if num_cells < self.num_queries:
            raise ValueError(
                f"the input gives {num_cells} feature cells, fewer than the {self.num_queries} queries; "
                "use a larger input size"
            )
        anchors, valid = self.anchors_for(spatial_shapes, memory.device, anchor_dtype)
        # Cells too close to the border carry zero memory and infinite anchors; the official
        # model still lets them compete in the top-k, and so does this one.
        memory = valid.to(memory.dtype) * memory
        enc_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(enc_memory)
        topk_index = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=-1).indices

        batch = memory.shape[0]
        index = topk_index.unsqueeze(-1)
        topk_memory = enc_memory.gather(1, index.expand(-1, -1, enc_memory.shape[-1]))
        topk_anchors = anchors.expand(batch, -1, -1).gather(1, index.expand(-1, -1, 4))
        ref_logits = self.enc_bbox_head(topk_memory) + topk_anchors
        return enc_logits, topk_index, topk_memory, ref_logits

    def select_queries(
        self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query selection.

        Returns:
            content ``(B, Q, C)``, reference boxes as logits ``(B, Q, 4)`` (cx, cy, w, h before
            sigmoid), and the selected indices ``(B, Q)`` int64 into the flattened cells
            (finest level first, row-major), best first.
        """
        _, topk_index, topk_memory, ref_logits = self._score_cells(
            memory, spatial_shapes, memory.dtype
        )
        return topk_memory.detach(), ref_logits.detach(), topk_index

    def select_queries_train(
        self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> QuerySelection:
        """Query selection keeping what the loss needs (the encoder head of the selected cells).

        The anchors are float32 whatever the memory's dtype, as in the official training
        (under autocast the box logits then come out in float32).
        """
        enc_logits, topk_index, topk_memory, ref_logits = self._score_cells(
            memory, spatial_shapes, torch.float32
        )
        index = topk_index.unsqueeze(-1)
        return QuerySelection(
            content=topk_memory.detach(),
            ref_points_unact=ref_logits.detach(),
            topk_index=topk_index,
            enc_logits=enc_logits,
            topk_logits=enc_logits.gather(1, index.expand(-1, -1, enc_logits.shape[-1])),
            topk_boxes=torch.sigmoid(ref_logits),
        )

    def forward(
        self,
        feats: list[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        denoising: DenoisingGroup | None = None,
    ) -> dict[str, Any]:
        """Encoder maps → predictions.

        Eval mode: ``{"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4) cxcywh}``; ``targets``
        and ``denoising`` are ignored. Train mode: the official outputs dict of
        ``forward_train``.
        """
        if self.training:
            return self.forward_train(feats, targets, denoising)
        memory, spatial_shapes = self.flatten_features(feats)
        content, ref_logits, _ = self.select_queries(memory, spatial_shapes)
        logits, boxes = self.refine(content, ref_logits, memory, spatial_shapes)
        return {"pred_logits": logits, "pred_boxes": boxes}

    def make_denoising(self, targets: Sequence[dict[str, torch.Tensor]]) -> DenoisingGroup | None:
        """This decoder's denoising group for ``targets`` (None when ``num_denoising`` is 0)."""
        return make_denoising_group(
            targets,
            self.num_classes,
            self.num_queries,
            self.denoising_class_embed,
            num_denoising=self.num_denoising,
            label_noise_ratio=self.label_noise_ratio,
            box_noise_scale=self.box_noise_scale,
        )

    def forward_train(
        self,
        feats: list[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        denoising: DenoisingGroup | None = None,
    ) -> dict[str, Any]:
        """All layers, with everything the D-FINE criterion reads (official keys and meaning).

        Args:
            feats: the encoder maps, finest first.
            targets: per image ``labels`` int64 ``(n,)`` and ``boxes`` float32 ``(n, 4)``
                normalised cxcywh; used to build the denoising group unless ``denoising`` is
                given. None: no denoising.
            denoising: a ready denoising group (e.g. fixed inputs in a test); wins over
                ``targets``.

        Returns:
            With ``Q`` matching queries, ``D`` denoising queries and ``K`` = 4 * (reg_max + 1)
            corner logits (edge-major: left, top, right, bottom):
            ``pred_logits`` ``(B, Q, C)`` (last layer, LQE included), ``pred_boxes`` ``(B, Q, 4)``
            cxcywh, ``pred_corners`` ``(B, Q, K)``, ``ref_points`` ``(B, Q, 4)`` cxcywh (the
            detached layer-0 "pre" boxes every layer's offsets start from), ``up`` and
            ``reg_scale`` (the ``(1,)`` parameters); ``aux_outputs``: one dict per earlier
            layer with those four keys plus ``teacher_corners`` / ``teacher_logits`` (the last
            layer's, not detached); ``pre_outputs``: ``pred_logits`` (layer 0's class head
            without LQE) and ``pred_boxes`` (the pre head); ``enc_aux_outputs``: one dict with
            the encoder head's ``pred_logits`` and ``pred_boxes`` of the selected cells;
            ``enc_meta``: ``{"class_agnostic": False}``. With denoising also ``dn_outputs``
            (every layer, ``D`` queries, teacher = the last denoising layer),
            ``dn_pre_outputs`` and ``dn_meta``. Query order = the selection order.
        """
        memory, spatial_shapes = self.flatten_features(feats)
        if denoising is None and targets is not None:
            denoising = self.make_denoising(targets)
        selection = self.select_queries_train(memory, spatial_shapes)
        content, ref_logits, attn_mask = selection.content, selection.ref_points_unact, None
        num_dn = 0
        if denoising is not None:
            num_dn = denoising.num_queries
            if num_dn:
                content = torch.cat([denoising.query_logits.to(content.dtype), content], dim=1)
                ref_logits = torch.cat(
                    [denoising.ref_points_unact.to(ref_logits.dtype), ref_logits], dim=1
                )
                attn_mask = denoising.attn_mask

        states = self.run_layers(
            content, ref_logits, memory, spatial_shapes, len(self.decoder.layers), attn_mask
        )
        logits = [
            self.class_logits(i, h, c)
            for i, (h, c) in enumerate(zip(states.hidden, states.corners))
        ]
        pre_logits = self.dec_score_head[0](states.hidden[0])

        def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return t[:, :num_dn], t[:, num_dn:]

        def layer_dicts(part: int) -> list[dict[str, torch.Tensor]]:
            per_layer = [
                {
                    "pred_logits": split(lg)[part],
                    "pred_boxes": split(bx)[part],
                    "pred_corners": split(cr)[part],
                    "ref_points": split(states.ref_points)[part],
                }
                for lg, bx, cr in zip(logits, states.boxes, states.corners)
            ]
            for d in per_layer:
                d["teacher_corners"] = per_layer[-1]["pred_corners"]
                d["teacher_logits"] = per_layer[-1]["pred_logits"]
            return per_layer

        layers = layer_dicts(1)
        out: dict[str, Any] = {
            "pred_logits": layers[-1]["pred_logits"],
            "pred_boxes": layers[-1]["pred_boxes"],
            "pred_corners": layers[-1]["pred_corners"],
            "ref_points": layers[-1]["ref_points"],
            "up": self.up,
            "reg_scale": self.reg_scale,
            "aux_outputs": layers[:-1],
            "enc_aux_outputs": [
                {"pred_logits": selection.topk_logits, "pred_boxes": selection.topk_boxes}
            ],
            "pre_outputs": {
                "pred_logits": split(pre_logits)[1],
                "pred_boxes": split(states.pre_boxes)[1],
            },
            "enc_meta": {"class_agnostic": False},
        }
        if denoising is not None:
            out["dn_outputs"] = layer_dicts(0)
            out["dn_pre_outputs"] = {
                "pred_logits": split(pre_logits)[0],
                "pred_boxes": split(states.pre_boxes)[0],
            }
            out["dn_meta"] = denoising.dn_meta
        return out

    def class_logits(self, layer: int, hidden: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s class logits ``(B, N, C)``: its score head plus the LQE term."""
        return self.decoder.lqe_layers[layer](self.dec_score_head[layer](hidden), corners)

    def refine(
        self,
        content: torch.Tensor,
        ref_logits: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder layers up to ``eval_idx`` (inference).

        Returns the class logits ``(B, Q, C)`` and boxes ``(B, Q, 4)`` cxcywh of layer
        ``eval_idx``.
        """
        states = self.run_layers(content, ref_logits, memory, spatial_shapes, self.eval_idx + 1)
        return self.class_logits(
            self.eval_idx, states.hidden[-1], states.corners[-1]
        ), states.boxes[-1]

    def run_layers(
        self,
        content: torch.Tensor,
        ref_logits: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        num_layers: int,
        attn_mask: torch.Tensor | None = None,
    ) -> LayerStates:
        """Run the first ``num_layers`` decoder layers with FDR box refinement.

        Args:
            content: ``(B, N, C)`` query content; ref_logits: ``(B, N, 4)`` reference boxes
                before sigmoid (both detached by the caller, as in the official model).
            memory: ``(B, L, C)`` flattened encoder maps; spatial_shapes: ``(H_l, W_l)``.
            attn_mask: bool ``(N, N)``, True = blocked, for the self-attention.

        The detach points are the official ones: the reference box each layer attends
        around and the previous output fed to the next distribution head are detached; the
        corner logits accumulate with their gradients.
        """
        dec = self.decoder
        values = dec.split_values(memory, spatial_shapes)
        project = weighting_function(self.reg_max, self.up, self.reg_scale)

        output = content
        output_prev: torch.Tensor | None = None
        corners_prev: torch.Tensor | None = None
        ref_boxes = torch.sigmoid(ref_logits)
        initial_boxes = pre_boxes = ref_boxes
        hidden, all_corners, all_boxes = [], [], []
        for i in range(num_layers):
            query_pos = self.query_pos_head(ref_boxes).clamp(min=-10, max=10)
            output = dec.layers[i](
                output, ref_boxes.unsqueeze(2), values, spatial_shapes, query_pos, attn_mask
            )

            if i == 0:
                # Layer 0 sets the initial boxes that all FDR offsets are relative to.
                pre_boxes = torch.sigmoid(self.pre_bbox_head(output) + inverse_sigmoid(ref_boxes))
                initial_boxes = pre_boxes.detach()

            # Each layer's distribution head sees its output plus the previous layer's
            # (detached), and its logits refine the previous layer's.
            head_in = output if output_prev is None else output + output_prev
            corners = self.dec_bbox_head[i](head_in)
            if corners_prev is not None:
                corners = corners + corners_prev
            offsets = distribution_integral(corners, project, self.reg_max)
            boxes = distance_to_box(initial_boxes, offsets, self.reg_scale)
            hidden.append(output)
            all_corners.append(corners)
            all_boxes.append(boxes)

            corners_prev = corners
            ref_boxes = boxes.detach()
            output_prev = output.detach()
        return LayerStates(hidden, all_corners, all_boxes, initial_boxes, pre_boxes)


@dataclass(frozen=True)
class QuerySelection:
    """The query selection of a training forward.

    Attributes:
        content: ``(B, Q, C)`` the selected cells' projected memory, detached.
        ref_points_unact: ``(B, Q, 4)`` their reference boxes before sigmoid, detached.
        topk_index: ``(B, Q)`` int64, the selected cells, best first.
        enc_logits: ``(B, L, num_classes)`` the encoder class head on every cell.
        topk_logits: ``(B, Q, num_classes)`` its logits of the selected cells.
        topk_boxes: ``(B, Q, 4)`` cxcywh, sigmoid of the selected cells' box logits.
    """

    content: torch.Tensor
    ref_points_unact: torch.Tensor
    topk_index: torch.Tensor
    enc_logits: torch.Tensor
    topk_logits: torch.Tensor
    topk_boxes: torch.Tensor


@dataclass(frozen=True)
class LayerStates:
    """What each decoder layer produced (index = layer), ``N`` queries.

    Attributes:
        hidden: per layer ``(B, N, C)`` output.
        corners: per layer ``(B, N, 4 * (reg_max + 1))`` accumulated corner logits.
        boxes: per layer ``(B, N, 4)`` cxcywh.
        ref_points: ``(B, N, 4)`` cxcywh, the detached layer-0 pre boxes (FDR reference).
        pre_boxes: ``(B, N, 4)`` cxcywh, the same, with their gradient.
    """

    hidden: list[torch.Tensor]
    corners: list[torch.Tensor]
    boxes: list[torch.Tensor]
    ref_points: torch.Tensor
    pre_boxes: torch.Tensor


def generate_anchors(spatial_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor boxes for query selection, one per cell of each level, finest level first.

    Returns:
        anchors: float32 ``(1, L, 4)``, logit(cx, cy, w, h) with the cell centre and side
            ``0.05 * 2**level``; ``inf`` where invalid.
        valid_mask: bool ``(1, L, 1)``, all four values within (0.01, 0.99).
    """
    per_level = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centers = (torch.stack([grid_x, grid_y], dim=-1) + 0.5) / torch.tensor(
            [w, h], dtype=torch.float32
        )
        sizes = torch.ones_like(centers) * ANCHOR_GRID_SIZE * (2.0**level)
        per_level.append(torch.cat([centers, sizes], dim=-1).reshape(1, h * w, 4))
    anchors = torch.cat(per_level, dim=1)
    valid = ((anchors > ANCHOR_VALID_EPS) & (anchors < 1 - ANCHOR_VALID_EPS)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    anchors = torch.where(valid, anchors, torch.inf)
    return anchors, valid
