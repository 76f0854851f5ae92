"""The one data type that flows between the video stages.

A ``FramePacket`` is made by a decoder and filled in as it moves on: the preprocessor adds the
model input, the inference stage the detections, the tracker the track ids. Arrays follow
supervision's ``Detections``: parallel arrays, one row per object.

Ownership: a packet belongs to the stage holding it until it is put into the next buffer.
Sinks receive the same packet (fan-out) and must not modify it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Detections:
    """Objects found in one frame.

    Attributes:
        boxes_xyxy: float32 ``(n, 4)``, ``[x1, y1, x2, y2]`` in source-frame pixels.
        scores: float32 ``(n,)``, in [0, 1].
        class_ids: int64 ``(n,)``, 0-based index into the model's classes.
        track_ids: int64 ``(n,)``, track id, or -1 where not (yet) tracked.
        edge_std_px: float32 ``(n, 4)``, the standard deviation of each box's left, top, right
            and bottom edge in source-frame pixels (D-FINE's edge distributions, see
            ``dfine.postprocess.EdgeStdNetwork``); ``None`` when the model does not give it.
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    track_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    edge_std_px: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.track_ids.shape == (0,) and n > 0:
            self.track_ids = np.full(n, -1, dtype=np.int64)
        if self.boxes_xyxy.shape != (n, 4):
            raise ValueError(f"boxes_xyxy must have shape ({n}, 4), got {self.boxes_xyxy.shape}")
        for name in ("class_ids", "track_ids"):
            shape = getattr(self, name).shape
            if shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {shape}")
        if self.edge_std_px is not None and self.edge_std_px.shape != (n, 4):
            raise ValueError(f"edge_std_px must have shape ({n}, 4), got {self.edge_std_px.shape}")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            boxes_xyxy=np.zeros((0, 4), dtype=np.float32),
            scores=np.zeros(0, dtype=np.float32),
            class_ids=np.zeros(0, dtype=np.int64),
            track_ids=np.zeros(0, dtype=np.int64),
        )

    def select(self, mask: np.ndarray) -> Detections:
        """The rows where ``mask`` (bool ``(n,)`` or index array) holds."""
        return Detections(
            boxes_xyxy=self.boxes_xyxy[mask],
            scores=self.scores[mask],
            class_ids=self.class_ids[mask],
            track_ids=self.track_ids[mask],
            edge_std_px=None if self.edge_std_px is None else self.edge_std_px[mask],
        )


@dataclass
class FramePacket:
    """One decoded frame and everything learnt about it.

    Attributes:
        stream_id: which source the frame came from (``"0"`` for a single file).
        index: 0-based frame number within its stream, counting every decoded frame (dropped
            ones included, so gaps show drops).
        pts_s: presentation time in seconds from the stream's start.
        image_rgb_u8: uint8 ``(H, W, 3)`` RGB, the displayed picture (rotation applied).
        arrival_s: ``time.monotonic()`` when the decoder handed the frame over; latency is
            measured from here.
        model_input: the preprocessed tensor (backend-specific: a torch tensor on CPU or CUDA,
            float32 ``(1, 3, S, S)`` in [0, 1]), set by the preprocessor, cleared after inference.
        detections: set by the inference stage; track ids by the tracker.
        analytics: set by the analytics stage: a read-only ``AnalyticsOverlay`` (lines, zones
            and their counts, in this frame's pixels) for the annotated video.
    """

    stream_id: str
    index: int
    pts_s: float
    image_rgb_u8: np.ndarray
    arrival_s: float
    model_input: Any = None
    detections: Detections | None = None
    analytics: Any = None

    @property
    def width(self) -> int:
        return int(self.image_rgb_u8.shape[1])

    @property
    def height(self) -> int:
        return int(self.image_rgb_u8.shape[0])
