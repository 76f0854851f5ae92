"""Write the run's messages as JSON Lines: the same messages, with the same fields, as ZeroMQ.

Input: ``FramePacket``s (read only), from any number of streams, and the pipeline's events
(``on_event``: track, analytics and source events, delivered by the runner in this thread).
Output: a UTF-8 text file, one message per line, as ``stages.events.encode_event`` makes it:
a ``frame`` message per packet (``stages.events.frame_event``) and each event as it was
published. The schema is docs/events.md (version ``EVENT_SCHEMA_VERSION``).

Lines are flushed to the OS every ``flush_every`` lines and at teardown, so a crash loses at
most the last ``flush_every - 1`` lines (no fsync: a power cut may lose more).

Thread: the sink's own thread (``write`` and ``on_event`` both). Ownership: nothing is handed on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.stage import StageBase
from stages.events import EventError, encode_event, frame_event
from stages.frame import FramePacket
from stages.sinks.output_file import open_text_output

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JsonLinesSinkConfig:
    """Settings of a ``JsonLinesSink``.

    Attributes:
        path: the file to write (replaced if it exists; parent folders are created).
        flush_every: hand lines to the OS every this many lines.
    """

    path: str
    flush_every: int = 1

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("jsonl_sink.path must name an output file, got an empty string")
        if self.flush_every < 1:
            raise ValueError(f"jsonl_sink.flush_every must be >= 1, got {self.flush_every}")


class JsonLinesSink(StageBase[FramePacket]):
    """Sink[FramePacket] and event subscriber: a JSON Lines file of every stream's messages.

    Args:
        config: see ``JsonLinesSinkConfig``.
        class_names: index = class id, for the detections' ``label``.
    """

    def __init__(self, config: JsonLinesSinkConfig, class_names: Sequence[str] = ()) -> None:
        self.config = config
        self.name = "jsonl_sink"
        self.class_names = tuple(class_names)
        self._file: IO[str] | None = None
        self._unflushed = 0
        self.lines_written = 0
        self.events_written = 0

    @property
    def path(self) -> Path:
        return Path(self.config.path)

    def setup(self) -> None:
        if self._file is not None:
            return
        self._file = open_text_output(self.path, "jsonl_sink", encoding="utf-8")

    def write(self, item: FramePacket) -> None:
        self._write_message(frame_event(item, self.class_names))

    def on_event(self, event: Mapping[str, Any]) -> None:
        """One event from the pipeline's channel: written as it is, on its own line."""
        if self._write_message(event):
            self.events_written += 1

    def teardown(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
            logger.info(
                "%s: wrote %d lines (%d events)", self.path, self.lines_written, self.events_written
            )

    def _write_message(self, message: Mapping[str, Any]) -> bool:
        if self._file is None:
            raise RuntimeError(f"{self.name}: write() before setup() or after teardown()")
        try:
            line = encode_event(message).decode("utf-8")
        except EventError as exc:
            # A producer's bad event must not stop the run; say which one it was.
            logger.warning("%s: message not written: %s", self.name, exc)
            return False
        self._file.write(line + "\n")
        self.lines_written += 1
        self._unflushed += 1
        if self._unflushed >= self.config.flush_every:
            self._file.flush()
            self._unflushed = 0
        return True
