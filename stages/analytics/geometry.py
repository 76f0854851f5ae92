"""Vectorised plane geometry for the camera analytics: segments against lines, points in
polygons, a ground-plane homography. Pure numpy, no state.

Coordinates are image pixels, x to the right and y *down*. In that frame the sign of
``cross(B - A, P - A)`` is negative when P is on the left of A→B *as seen on the picture*
(walking from A to B on the screen, left is on your left hand) and positive on its right.

Every function works on whole arrays at once (T tracks × L lines, P points × Z polygons): the
cost of a frame is a few numpy calls, not a Python loop per pair.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ClassFilter",
    "apply_homography",
    "homography_from_points",
    "points_in_polygons",
    "polygon_self_intersects",
    "segments_cross_lines",
    "signed_side",
]


class ClassFilter:
    """Which of K items (lines or zones) watch which class, as one table lookup per frame.

    ``classes[k]`` is the class ids item k watches, or ``None`` for every class.
    """

    def __init__(self, classes: list[tuple[int, ...] | None]) -> None:
        named = [c for item in classes if item is not None for c in item]
        self._other = max(named, default=-1) + 1  # the row for every class no item names
        self._table = np.zeros((self._other + 1, len(classes)), dtype=bool)
        for k, item in enumerate(classes):
            if item is None:
                self._table[:, k] = True
            else:
                self._table[list(item), k] = True
        self.trivial = all(item is None for item in classes)

    def mask(self, class_ids: np.ndarray) -> np.ndarray:
        """bool ``(T, K)``: item k watches the class of row t."""
        return self._table[np.clip(class_ids, 0, self._other)]


def signed_side(points_xy: np.ndarray, a_xy: np.ndarray, b_xy: np.ndarray) -> np.ndarray:
    """Signed distance in pixels of each point from each infinite line A→B.

    Args:
        points_xy: float ``(T, 2)``.
        a_xy, b_xy: float ``(L, 2)``, the lines' ends (A != B).

    Returns:
        float64 ``(T, L)``: negative on the left of A→B as seen on the picture, positive on the
        right, 0 on the line.
    """
    d = (b_xy - a_xy).astype(np.float64)  # (L, 2)
    unit = d / np.hypot(d[:, 0], d[:, 1])[:, None]
    # cross(d, P - A) / |d| = ux * Py - uy * Px - (ux * Ay - uy * Ax): one (T, L) product each.
    offset = unit[:, 0] * a_xy[:, 1] - unit[:, 1] * a_xy[:, 0]
    pts = points_xy.astype(np.float64)
    return pts[:, 1:2] * unit[:, 0] - pts[:, 0:1] * unit[:, 1] - offset


def segments_cross_lines(
    p0_xy: np.ndarray, p1_xy: np.ndarray, a_xy: np.ndarray, b_xy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which travelled segments P0→P1 cross which line segments A→B, and which way.

    A point exactly on a line counts as on its right, so a path that touches the line and
    turns back never crosses, and one that stops on the line crosses once, when it goes on.

    Args:
        p0_xy, p1_xy: float ``(T, 2)``, each track's previous and current anchor point.
        a_xy, b_xy: float ``(L, 2)``, the lines' ends.

    Returns:
        ``crossed`` bool ``(T, L)``; ``into_right`` bool ``(T, L)`` (meaningful where crossed:
        True when P0 was on the left and P1 on the right, the ``in`` direction);
        ``point_xy`` float64 ``(T, L, 2)``, where the path meets the line (NaN where not
        crossed); ``side1`` float64 ``(T, L)``, P1's signed distance from the line (pixels).
    """
    side0 = signed_side(p0_xy, a_xy, b_xy)
    side1 = signed_side(p1_xy, a_xy, b_xy)
    right0 = side0 >= 0
    right1 = side1 >= 0
    # Only pairs whose infinite line separates P0 and P1 can cross; they are few in any frame,
    # so the segment test runs on those pairs alone (NaN sides compare False: never a pair).
    changed = (right0 != right1) & np.isfinite(side0) & np.isfinite(side1)
    crossed = np.zeros_like(changed)
    point_xy = np.full((*changed.shape, 2), np.nan)
    t_idx, l_idx = np.nonzero(changed)
    if len(t_idx):
        p0, p1 = p0_xy[t_idx].astype(np.float64), p1_xy[t_idx].astype(np.float64)
        a, b = a_xy[l_idx], b_xy[l_idx]
        r = p1 - p0
        side_a = r[:, 0] * (a[:, 1] - p0[:, 1]) - r[:, 1] * (a[:, 0] - p0[:, 0])
        side_b = r[:, 0] * (b[:, 1] - p0[:, 1]) - r[:, 1] * (b[:, 0] - p0[:, 0])
        # The path's own line must separate A and B (or touch one of them).
        hit = side_a * side_b <= 0
        s0, s1 = side0[t_idx, l_idx], side1[t_idx, l_idx]
        t = s0 / (s0 - s1)
        crossed[t_idx[hit], l_idx[hit]] = True
        point_xy[t_idx[hit], l_idx[hit]] = (p0 + t[:, None] * r)[hit]
    return crossed, right1 & ~right0, point_xy, side1


def points_in_polygons(
    points_xy: np.ndarray, vertices_xy: np.ndarray, next_xy: np.ndarray | None = None
) -> np.ndarray:
    """Even-odd test of every point against every polygon.

    Args:
        points_xy: float ``(P, 2)``.
        vertices_xy: float ``(Z, V, 2)``, each polygon's vertices in order; a polygon with
            fewer than V vertices repeats its last one (zero-length edges change nothing).
        next_xy: ``np.roll(vertices_xy, -1, axis=1)`` (each edge's other end), if the caller
            keeps it: saves recomputing it every frame.

    Returns:
        bool ``(P, Z)``. Points exactly on an edge may fall either side.
    """
    e1_all = np.roll(vertices_xy, -1, axis=1) if next_xy is None else next_xy
    lo, hi = vertices_xy.min(axis=1), vertices_xy.max(axis=1)  # (Z, 2) bounding boxes
    px, py = points_xy[:, None, 0], points_xy[:, None, 1]
    # Most points are outside most zones' boxes: the edge test runs on the other pairs only.
    near = (px >= lo[:, 0]) & (px <= hi[:, 0]) & (py >= lo[:, 1]) & (py <= hi[:, 1])
    inside = np.zeros_like(near)
    p_idx, z_idx = np.nonzero(near)
    if len(p_idx):
        e0, e1 = vertices_xy[z_idx], e1_all[z_idx]  # (k, V, 2)
        qx, qy = points_xy[p_idx, 0][:, None], points_xy[p_idx, 1][:, None]  # (k, 1)
        y0, y1 = e0[..., 1], e1[..., 1]
        straddles = (y0 > qy) != (y1 > qy)
        dy = np.where(straddles, y1 - y0, 1.0)
        x_at = e0[..., 0] + (qy - y0) * (e1[..., 0] - e0[..., 0]) / dy
        hits = np.count_nonzero(straddles & (qx < x_at), axis=1)
        inside[p_idx, z_idx] = (hits % 2) == 1
    return inside


def polygon_self_intersects(vertices_xy: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed polygon ``(V, 2)`` touch or cross."""
    v = np.asarray(vertices_xy, dtype=np.float64)
    n = len(v)
    e0, e1 = v, np.roll(v, -1, axis=0)

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
            - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # the first and last edges share a vertex
    i, j = i[keep], j[keep]
    a, b, c, d = e0[i], e1[i], e0[j], e1[j]
    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    proper = (o1 * o2 < 0) & (o3 * o4 < 0)

    def on(p: np.ndarray, q: np.ndarray, r: np.ndarray, o: np.ndarray) -> np.ndarray:
        within = (
            (np.minimum(p[:, 0], q[:, 0]) <= r[:, 0])
            & (r[:, 0] <= np.maximum(p[:, 0], q[:, 0]))
            & (np.minimum(p[:, 1], q[:, 1]) <= r[:, 1])
            & (r[:, 1] <= np.maximum(p[:, 1], q[:, 1]))
        )
        return (o == 0) & within

    touching = on(a, b, c, o1) | on(a, b, d, o2) | on(c, d, a, o3) | on(c, d, b, o4)
    return bool(np.any(proper | touching))


def homography_from_points(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """The 3×3 projective map taking four ``src`` points to four ``dst`` points.

    Args:
        src_xy, dst_xy: float ``(4, 2)`` (e.g. image pixels → ground-plane metres).

    Raises:
        ValueError: three of the points are on one line (no unique map).
    """
    src = np.asarray(src_xy, dtype=np.float64)
    dst = np.asarray(dst_xy, dtype=np.float64)
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    matrix = np.array(rows)
    if np.linalg.matrix_rank(matrix) < 8:
        raise ValueError("the four points must be in general position (no three on one line)")
    h = np.linalg.solve(matrix, np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def apply_homography(h_3x3: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """``points_xy`` float ``(N, 2)`` mapped by ``h_3x3``; float64 ``(N, 2)``."""
    pts = np.asarray(points_xy, dtype=np.float64)
    mapped = pts @ h_3x3[:, :2].T + h_3x3[:, 2]
    return mapped[:, :2] / mapped[:, 2:3]
