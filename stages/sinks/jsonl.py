"""Write one JSON line per frame: what was found, where, and what happened.

Input: ``FramePacket``s (read only), from any number of streams.
Output: a UTF-8 text file, one object per line::

    {"stream": "0", "frame": 12, "pts": 0.4004,
     "detections": [{"box": [x1, y1, x2, y2], "score": 0.91, "class_id": 2, "label": "car",
                     "track_id": 7}],
     "events": [{"event": "track_started", "track_id": 7, "class_id": 2}]}

``frame`` is the packet's 0-based index in its stream; ``pts`` seconds from the stream's start
(6 decimals); ``box`` source-frame pixels rounded to 2 decimals; ``score`` to 4; ``track_id``
-1 when untracked; ``detections`` is ``[]`` when nothing was found (or no detector ran).
Non-finite numbers become ``null`` so every line is strict JSON.

Lines are flushed to the OS every ``flush_every`` frames and at teardown, so a crash loses at
most the last ``flush_every - 1`` lines (no fsync: a power cut may lose more).

Thread: the sink's own thread. Ownership: nothing is handed on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.stage import StageBase
from stages.sinks.output_file import open_text_output
from stages.frame import Detections, FramePacket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JsonLinesSinkConfig:
    """Settings of a ``JsonLinesSink``.

    Attributes:
        path: the file to write (replaced if it exists; parent folders are created).
        flush_every: hand lines to the OS every this many frames.
    """

    path: str
    flush_every: int = 1

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("jsonl_sink.path must name an output file, got an empty string")
        if self.flush_every < 1:
            raise ValueError(f"jsonl_sink.flush_every must be >= 1, got {self.flush_every}")


def _num(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def detections_to_json(detections: Detections | None, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The ``"detections"`` list of a line (shared with other JSON outputs)."""
    if detections is None:
        return []
    rows = []
    for box, score, class_id, track_id in zip(
        detections.boxes_xyxy.tolist(),
        detections.scores.tolist(),
        detections.class_ids.tolist(),
        detections.track_ids.tolist(),
    ):
        rows.append({
            "box": [_num(v, 2) for v in box],
            "score": _num(score, 4),
            "class_id": class_id,
            "label": class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id),
            "track_id": track_id,
        })
    return rows


def packet_to_json(packet: FramePacket, class_names: Sequence[str]) -> dict[str, Any]:
    """One line's object for ``packet``."""
    return {
        "stream": packet.stream_id,
        "frame": packet.index,
        "pts": _num(packet.pts_s, 6),
        "detections": detections_to_json(packet.detections, class_names),
        "events": list(packet.events),
    }


class JsonLinesSink(StageBase[FramePacket]):
    """Sink[FramePacket]: a JSON Lines file, one line per frame of every stream."""

    def __init__(self, config: JsonLinesSinkConfig, class_names: Sequence[str] = ()) -> None:
        self.config = config
        self.name = "jsonl_sink"
        self.class_names = tuple(class_names)
        self._file: IO[str] | None = None
        self._unflushed = 0
        self.lines_written = 0

    @property
    def path(self) -> Path:
        return Path(self.config.path)

    def setup(self) -> None:
        if self._file is not None:
            return
        self._file = open_text_output(self.path, "jsonl_sink", encoding="utf-8")

    def write(self, item: FramePacket) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.name}: write() before setup() or after teardown()")
        line = json.dumps(packet_to_json(item, self.class_names), separators=(",", ":"),
                          allow_nan=False, default=_json_default)
        self._file.write(line + "\n")
        self.lines_written += 1
        self._unflushed += 1
        if self._unflushed >= self.config.flush_every:
            self._file.flush()
            self._unflushed = 0

    def teardown(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
            logger.info("%s: wrote %d lines", self.path, self.lines_written)


def _json_default(value: Any) -> Any:
    """Numpy scalars that slipped into events become plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"event value of type {type(value).__name__} is not JSON-serialisable")
