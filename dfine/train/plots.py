"""``results.png``: the loss terms over steps and the validation mAP over epochs.

Drawn with matplotlib's Agg backend (no display needed) from the run's CSV files, so the
picture can be redrawn after the fact: ``plot_results(run/"losses.csv", run/"metrics.csv",
run/"results.png")``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

# The main terms; their auxiliary, denoising and encoder copies are summed into them.
_MAIN_TERMS = ("loss_vfl", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf")


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.exists():
        return [], []
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_results(losses_csv: Path, metrics_csv: Path, out_png: Path) -> Path:
    """Write the picture; returns its path.

    Panels: total loss, one per main term (each with its auxiliary/denoising copies summed),
    the lr, and the val AP50:95 / AP50 per epoch.

    Raises:
        ValueError: ``losses_csv`` has no rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = _read(Path(losses_csv))
    if not rows:
        raise ValueError(f"{losses_csv} has no rows to plot")
    col = {name: i for i, name in enumerate(header)}
    steps = [int(r[col["step"]]) for r in rows]
    window = max(1, len(rows) // 50)
    series: dict[str, list[float]] = {"loss (total)": [_num(r[col["loss"]]) for r in rows]}
    for term in _MAIN_TERMS:
        members = [i for name, i in col.items() if name == term or name.startswith(term + "_")]
        if members:
            series[term] = [sum(_num(r[i]) for i in members) for r in rows]
    series["lr"] = [_num(r[col["lr"]]) for r in rows]

    m_header, m_rows = _read(Path(metrics_csv))
    m_col = {name: i for i, name in enumerate(m_header)}
    epochs = [int(r[m_col["epoch"]]) for r in m_rows] if m_rows else []

    panels = len(series) + 1
    cols = 4
    lines = math.ceil(panels / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 3 * lines), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (name, values) in zip(flat, series.items()):
        ax.plot(steps, values, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=1)
        if window > 1 and name != "lr":
            ax.plot(steps, _smooth(values, window), color="tab:blue", linewidth=1.5)
        ax.set_title(name)
        ax.set_xlabel("step")
    ax = flat[len(series)]
    for key, colour in (("map50_95", "tab:green"), ("map50", "tab:orange")):
        if key in m_col:
            values = [_num(r[m_col[key]]) for r in m_rows]
            if any(not math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o", color=colour, label=key.replace("map", "mAP"))
    ax.set_title("validation mAP")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    for extra in flat[panels:]:
        extra.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
