"""Smoke test of ``bench.official_loop``: its sequential ingredient writes the frames it read,
with boxes drawn, and the table's ratios are those of the figures. No speed is asserted."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from bench import official_loop
from tests.conftest import FIXTURES, MEDIA

CHECKPOINT = FIXTURES / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
CLIP = MEDIA / "cars_320x240.h265"


@pytest.mark.skipif(
    not (CHECKPOINT.is_file() and CLIP.is_file()), reason="needs ../shared (fixture, media)"
)
def test_sequential_loop_writes_annotated_frames(tmp_path: Path) -> None:
    plain, drawn = tmp_path / "plain.mp4", tmp_path / "drawn.mp4"
    # Threshold 1.0 draws nothing, 0.0 draws all 300 boxes: the pictures must differ.
    for out, threshold in ((plain, 1.0), (drawn, 0.0)):
        done = official_loop.sequential_loop(
            CLIP, CHECKPOINT, out, imgsz=320, threshold=threshold, max_frames=2
        )
        assert done == 2
    pictures = []
    for out in (plain, drawn):
        with av.open(str(out)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 2 and frames[0].shape == (240, 320, 3)
        pictures.append(frames[0].astype(np.int16))
    assert np.abs(pictures[0] - pictures[1]).mean() > 1.0


def test_table_ratios_are_those_of_the_runs() -> None:
    runs = [
        {"ingredient": official_loop.DEFAULT, "frames": 10, "wall_s": 5.0, "cpu_s": 8.0},
        {"ingredient": official_loop.TORCH, "frames": 10, "wall_s": 8.0, "cpu_s": 12.0},
        {"ingredient": official_loop.SEQUENTIAL, "frames": 10, "wall_s": 10.0, "cpu_s": 16.0},
    ]
    rows = official_loop.format_table({"runs": runs}).splitlines()[2:]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [c[5] for c in cells] == ["2.00×", "1.25×", "1.00×"]
    assert [c[6] for c in cells] == ["2.00×", "1.33×", "1.00×"]
    assert cells[0][3] == "2.00"  # fps
