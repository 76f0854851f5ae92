"""Write tracks in the MOTChallenge results format, for evaluation with TrackEval/py-motmetrics.

Input: ``FramePacket``s (read only) of one stream, with tracked ``detections``.
Output: a text file with one line per tracked detection::

    frame,id,x,y,w,h,conf,-1,-1,-1

``frame`` is 1-based (packet index + 1), ``id`` the track id, ``x,y`` the box's top-left corner
and ``w,h`` its size in source-frame pixels (2 decimals), ``conf`` the score. Untracked rows
(track id -1) are left out: MOT results are tracks. Packets of other streams are ignored.

Lines are flushed at every frame and the file closed at teardown.

Thread: the sink's own thread. Ownership: nothing is handed on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from pipeline.stage import StageBase
from stages.frame import FramePacket
from stages.sinks.output_file import open_text_output

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MotSinkConfig:
    """Settings of a ``MotSink``.

    Attributes:
        path: the .txt to write (replaced if it exists; parent folders are created).
        stream_id: the stream to write; ``None`` takes the stream of the first packet.
    """

    path: str
    stream_id: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("mot_sink.path must name an output file, got an empty string")


def mot_lines(
    frame_number: int, boxes_xyxy: np.ndarray, scores: np.ndarray, track_ids: np.ndarray
) -> list[str]:
    """MOTChallenge lines for the tracked rows of one frame (``frame_number`` 1-based)."""
    lines = []
    for (x1, y1, x2, y2), score, track_id in zip(
        boxes_xyxy.tolist(), scores.tolist(), track_ids.tolist()
    ):
        if track_id < 0:
            continue
        lines.append(
            f"{frame_number},{track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1"
        )
    return lines


class MotSink(StageBase[FramePacket]):
    """Sink[FramePacket]: MOTChallenge ``frame,id,x,y,w,h,conf,-1,-1,-1`` lines."""

    def __init__(self, config: MotSinkConfig) -> None:
        self.config = config
        self.name = "mot_sink"
        self._stream_id = config.stream_id
        self._file: IO[str] | None = None
        self._warned_streams: set[str] = set()
        self.lines_written = 0

    @property
    def path(self) -> Path:
        return Path(self.config.path)

    def setup(self) -> None:
        if self._file is not None:
            return
        self._file = open_text_output(self.path, "mot_sink", encoding="ascii")

    def write(self, item: FramePacket) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.name}: write() before setup() or after teardown()")
        if self._stream_id is None:
            self._stream_id = item.stream_id
        if item.stream_id != self._stream_id:
            if item.stream_id not in self._warned_streams:
                self._warned_streams.add(item.stream_id)
                logger.warning(
                    "%s holds stream %r; ignoring stream %r",
                    self.path,
                    self._stream_id,
                    item.stream_id,
                )
            return
        dets = item.detections
        if dets is None or len(dets) == 0:
            return
        lines = mot_lines(item.index + 1, dets.boxes_xyxy, dets.scores, dets.track_ids)
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
            self.lines_written += len(lines)

    def teardown(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
            logger.info("%s: wrote %d lines", self.path, self.lines_written)
