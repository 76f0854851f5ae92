"""Opening a sink's output file: one place for the checks every file sink makes."""

from __future__ import annotations

from pathlib import Path
from typing import IO


def open_text_output(path: Path, sink_name: str, encoding: str = "utf-8") -> IO[str]:
    """``path`` opened for writing text, its folder made; a folder in its place is refused with
    a one-line error naming the sink's config key."""
    if path.is_dir():
        raise ValueError(f"{sink_name}.path is a folder, not a file: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding=encoding)
