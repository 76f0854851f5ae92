"""Tiles cover the frame with the asked overlap; merging removes the duplicates that overlaps and
tile borders make, per class, and keeps distinct objects."""

from __future__ import annotations

import numpy as np
import pytest

from stages.tiling import MergeMethod, merge_detections, tile_grid


def test_tiles_cover_the_frame_and_overlap_at_least_as_asked() -> None:
    tiles = tile_grid(1920, 1080, (640, 640), 0.2)
    covered = np.zeros((1080, 1920), dtype=bool)
    for t in tiles:
        assert t.width == 640 and t.height == 640
        covered[t.y0 : t.y1, t.x0 : t.x1] = True
    assert covered.all()
    xs = sorted({t.x0 for t in tiles})
    assert all(b - a <= 640 - 128 for a, b in zip(xs, xs[1:]))  # >= 20 % of 640 overlap
    assert max(t.x1 for t in tiles) == 1920 and max(t.y1 for t in tiles) == 1080


def test_a_frame_smaller_than_a_tile_is_one_tile_and_pixel_overlap_works() -> None:
    assert [(t.x0, t.y0, t.x1, t.y1) for t in tile_grid(300, 200, (640, 640))] == [(0, 0, 300, 200)]
    tiles = tile_grid(1000, 400, (400, 400), 100)
    assert len({t.x0 for t in tiles}) == 3 and {t.y0 for t in tiles} == {0}


@pytest.mark.parametrize("overlap", [1.0, -0.1, 640])
def test_an_overlap_without_stride_is_refused(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(1920, 1080, (640, 640), overlap)


def _merge(boxes, labels, scores, method):
    return merge_detections(
        np.array(labels),
        np.array(boxes, dtype=np.float32),
        np.array(scores, dtype=np.float32),
        method,
    )


def test_greedy_ios_joins_a_box_cut_by_a_tile_border_into_the_whole_box() -> None:
    whole = [100, 100, 160, 140]  # seen whole by the full frame or the neighbouring tile
    cut = [100, 100, 128, 140]  # the same car cut at a tile border at x=128
    labels, boxes, scores = _merge([cut, whole], [2, 2], [0.9, 0.6], MergeMethod.GREEDY_IOS)
    assert labels.tolist() == [2]
    np.testing.assert_allclose(boxes[0], whole)
    assert scores[0] == pytest.approx(0.9)
    # NMS by IoU keeps both (IoU 0.47): that is why greedy IOS is the default for tiles.
    assert len(_merge([cut, whole], [2, 2], [0.9, 0.6], MergeMethod.NMS)[0]) == 2


@pytest.mark.parametrize("method", list(MergeMethod))
def test_duplicates_in_an_overlap_become_one_and_classes_stay_apart(method: MergeMethod) -> None:
    a = [10, 10, 50, 50]
    a_shifted = [11, 10, 51, 50]  # the same object seen by two overlapping tiles
    labels, boxes, scores = _merge(
        [a, a_shifted, a, [200, 200, 240, 260]], [0, 0, 1, 0], [0.8, 0.7, 0.6, 0.5], method
    )
    assert sorted(labels.tolist()) == [0, 0, 1]  # a person and a car at the same place both stay
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    assert len(boxes) == 3


def test_separate_objects_of_one_class_are_kept_and_empty_input_is_fine() -> None:
    labels, boxes, _ = _merge(
        [[0, 0, 10, 10], [20, 0, 30, 10]], [3, 3], [0.9, 0.8], MergeMethod.GREEDY_IOS
    )
    assert len(labels) == 2
    empty = merge_detections(
        np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    )
    assert [len(x) for x in empty] == [0, 0, 0]
