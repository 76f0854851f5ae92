"""Per-edge uncertainty (``edge_std_px``) from D-FINE's edge distributions, end to end.

The definition (``dfine.fdr.distribution_std``) on synthetic distributions; the torch backend
against a real ONNX Runtime session on an ``--edge-std`` export of the calibrated fixture; the
official export (no such output) still running with no field; a real run of the CLI writing
``edge_std_px`` into JSON Lines that validate against docs/events.schema.json; the annotator's
band and the tracker's spread-scaled distance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import dfine
from dfine.backends.onnx_backend import EDGE_STD_OUTPUT, OnnxRuntimeBackend
from dfine.backends.torch_backend import TorchBackend
from dfine.checkpoint import build_and_load
from dfine.export import DeployModel, DeployModelWithEdgeStd
from dfine.fdr import distribution_std, edge_std_normalized, weighting_function
from dfine.postprocess import EdgeStdNetwork
from pipeline.cli import main
from stages.annotate import AnnotateConfig, make_annotator
from stages.events import frame_event
from stages.events_schema import SCHEMA_PATH
from stages.frame import Detections, FramePacket
from stages.track import (
    TrackConfig,
    Tracker,
    expected_noise_distance,
    spread_scaled_distance,
)

CALIBRATED = "dfine_n_calibrated"
IMGSZ = 320  # any multiple of 32 runs the fixture; small keeps the CPU tests short
CLIP = "traffic_highway_960x540.mp4"
REG_MAX = 32
VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def _project() -> torch.Tensor:
    return weighting_function(REG_MAX, torch.tensor([0.5]), torch.tensor([4.0]))


@pytest.fixture(scope="module")
def checkpoint(fixtures_dir: Path) -> Path:
    return fixtures_dir / CALIBRATED / "dfine_n_calibrated.pth"


@pytest.fixture(scope="module")
def edge_std_onnx(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture exported through the CLI with ``--edge-std``."""
    out = tmp_path_factory.mktemp("export") / "edge_std.onnx"
    code = main(
        ["export", str(checkpoint), "--edge-std", "--imgsz", str(IMGSZ), "--output", str(out)]
    )
    assert code == 0
    return out


# ---- the definition -------------------------------------------------------------------------


def test_a_sharper_distribution_gives_a_smaller_spread() -> None:
    project = _project()
    bins = torch.arange(REG_MAX + 1, dtype=torch.float32)
    centre = REG_MAX // 2 + 3
    # Gaussian-shaped logits around one bin, from flat to peaked; one edge each.
    widths = [100.0, 8.0, 3.0, 1.0, 0.3]
    logits = torch.stack([-((bins - centre) ** 2) / (2 * w**2) for w in widths])
    std = distribution_std(logits.repeat(1, 4), project, REG_MAX)  # 4 equal edges
    assert std.shape == (len(widths), 4)
    per_width = std[:, 0]
    assert torch.all(per_width[1:] < per_width[:-1]), per_width
    assert per_width[-1] < 0.01  # nearly one bin: nearly no spread
    # The flat distribution's spread is the population std of the bin values W(n).
    flat = distribution_std(torch.zeros(1, 4 * (REG_MAX + 1)), project, REG_MAX)
    assert flat[0].tolist() == pytest.approx([float(project.std(unbiased=False))] * 4, abs=1e-5)


def test_the_spread_is_the_std_of_w_under_the_softmax_per_edge() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 4 * (REG_MAX + 1), generator=generator) * 3
    project = _project()
    got = distribution_std(logits, project, REG_MAX)
    p = torch.softmax(logits.double().reshape(2, 5, 4, REG_MAX + 1), dim=-1).numpy()
    w = project.double().numpy()
    mean = (p * w).sum(-1)
    expected = np.sqrt((p * (w - mean[..., None]) ** 2).sum(-1))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Pixels: times the reference width (left, right) or height (top, bottom) over reg_scale.
    reference = torch.tensor([0.5, 0.5, 0.4, 0.1]).expand(2, 5, 4)
    normalized = edge_std_normalized(logits, reference, project, REG_MAX, torch.tensor([4.0]))
    scale = torch.tensor([0.4, 0.1, 0.4, 0.1]) / 4.0
    torch.testing.assert_close(normalized, got * scale)


# ---- torch and ONNX Runtime -----------------------------------------------------------------


def test_the_edge_std_network_gives_the_plain_forwards_detections(checkpoint: Path) -> None:
    model = build_and_load("n", 80, checkpoint).deploy()
    images = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[960, 540]])
    post = dfine.PostProcessor()
    with torch.no_grad():
        plain = DeployModel(model, post)(images, sizes)
        spread = DeployModelWithEdgeStd(model, post)(images, sizes)
    for a, b in zip(plain, spread[:3]):
        assert torch.equal(a, b)
    edge_std = spread[3]
    assert edge_std.shape == (1, 300, 4)
    assert bool((edge_std > 0).all()) and bool(torch.isfinite(edge_std).all())
    # A frame twice as wide doubles the left/right spreads, not the top/bottom ones.
    with torch.no_grad():
        wide = DeployModelWithEdgeStd(model, post)(images, torch.tensor([[1920, 540]]))[3]
    torch.testing.assert_close(wide[..., 0::2], 2 * edge_std[..., 0::2])
    torch.testing.assert_close(wide[..., 1::2], edge_std[..., 1::2])
    # The network's own outputs: the plain eval forward's, plus the spreads.
    with torch.no_grad():
        raw = EdgeStdNetwork(model)(images)
        ref = model(images)
    assert torch.equal(raw["pred_logits"], ref["pred_logits"])
    assert torch.equal(raw["pred_boxes"], ref["pred_boxes"])


def test_torch_and_onnxruntime_edge_std_agree(checkpoint: Path, edge_std_onnx: Path) -> None:
    graph_outputs = [o.name for o in onnx.load(str(edge_std_onnx)).graph.output]
    assert graph_outputs == ["labels", "boxes", "scores", EDGE_STD_OUTPUT]
    ort_backend = OnnxRuntimeBackend(edge_std_onnx, intra_op_threads=1)
    torch_backend = TorchBackend.from_checkpoint(checkpoint, "n", input_size_hw=(IMGSZ, IMGSZ))
    assert ort_backend.provides_edge_std and torch_backend.provides_edge_std
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=generator)
    sizes = torch.tensor([[960, 540], [640, 480]])
    a, b = torch_backend.detect(images, sizes), ort_backend.detect(images, sizes)
    assert a.edge_std_px is not None and b.edge_std_px is not None
    assert b.edge_std_px.shape == (2, 300, 4) and b.edge_std_px.dtype == np.float32
    for i in range(2):
        # Near-tied scores may be ordered differently: match one to one by label and box.
        cost = np.abs(a.boxes_xyxy[i][:, None] - b.boxes_xyxy[i][None]).sum(-1)
        cost += 1e6 * (a.labels[i][:, None] != b.labels[i][None])
        rows, cols = linear_sum_assignment(cost)
        assert (a.labels[i][rows] == b.labels[i][cols]).all()
        assert np.abs(a.boxes_xyxy[i][rows] - b.boxes_xyxy[i][cols]).max() < 0.05
        worst_px = float(np.abs(a.edge_std_px[i][rows] - b.edge_std_px[i][cols]).max())
        assert worst_px <= 0.05, (
            f"image {i}: torch and ONNX Runtime spreads differ by {worst_px} px"
        )
    # __call__ keeps the official three outputs.
    labels, boxes, scores = ort_backend(images, sizes)
    np.testing.assert_array_equal(boxes, b.boxes_xyxy)


def test_a_checkpoint_run_in_onnx_runtime_gives_edge_std_too(
    checkpoint: Path, tmp_path: Path
) -> None:
    """``backend: auto`` on a CPU runs a .pth through a cached export: it has the output."""
    from dfine.backends.device import Device
    from stages.infer import Backend, InferConfig, make_backend

    config = InferConfig(
        model=checkpoint,
        backend=Backend.ONNXRUNTIME,
        device=Device.CPU,
        imgsz=IMGSZ,
        onnx_cache_dir=tmp_path,
    )
    backend = make_backend(config)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.provides_edge_std
    out = backend.detect(torch.rand(1, 3, IMGSZ, IMGSZ), torch.tensor([[IMGSZ, IMGSZ]]))
    assert out.edge_std_px is not None and out.edge_std_px.shape == (1, 300, 4)


def test_the_official_export_runs_with_no_edge_std(fixtures_dir: Path) -> None:
    backend = OnnxRuntimeBackend(
        fixtures_dir / CALIBRATED / "dfine_n_calibrated_official.onnx", intra_op_threads=1
    )
    assert not backend.provides_edge_std
    out = backend.detect(torch.rand(1, 3, 640, 640), torch.tensor([[640, 480]]))
    assert out.edge_std_px is None and out.boxes_xyxy.shape == (1, 300, 4)
    dets = Detections(out.boxes_xyxy[0], out.scores[0], out.labels[0])
    packet = FramePacket("0", 0, 0.0, np.zeros((480, 640, 3), np.uint8), 0.0, detections=dets)
    event = frame_event(packet, [f"c{i}" for i in range(80)])
    assert event["detections"] and all("edge_std_px" not in d for d in event["detections"])
    VALIDATOR.validate(event)


# ---- a real run: JSON Lines ----------------------------------------------------------------


@pytest.mark.parametrize("with_edge_std", [True, False], ids=["edge-std-export", "official"])
def test_a_run_writes_edge_std_px_when_the_model_gives_it(
    with_edge_std: bool,
    edge_std_onnx: Path,
    fixtures_dir: Path,
    media_dir: Path,
    tmp_path: Path,
) -> None:
    model = (
        edge_std_onnx
        if with_edge_std
        else fixtures_dir / CALIBRATED / "dfine_n_calibrated_official.onnx"
    )
    jsonl = tmp_path / "run.jsonl"
    code = main(
        [
            "run",
            "--source",
            str(media_dir / CLIP),
            "--model",
            str(model),
            "--threshold",
            "0.05",  # the fixture's random weights score 0.04-0.1
            "--jsonl",
            str(jsonl),
            "--max-frames",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    frames = [m for m in map(json.loads, jsonl.read_text().splitlines()) if m["type"] == "frame"]
    assert len(frames) == 3
    records = [d for f in frames for d in f["detections"]]
    assert records, "the fixture should find something at threshold 0.05"
    for message in frames:
        VALIDATOR.validate(message)
    if not with_edge_std:
        assert all("edge_std_px" not in d for d in records)
        return
    width, height = frames[0]["width"], frames[0]["height"]
    for d in records:
        std = d["edge_std_px"]
        assert len(std) == 4 and all(0.0 < s < max(width, height) for s in std), d


# ---- annotator and tracker ------------------------------------------------------------------


def _dets(spread_px: float | None) -> Detections:
    return Detections(
        boxes_xyxy=np.array([[100, 80, 220, 200]], np.float32),
        scores=np.array([0.9], np.float32),
        class_ids=np.array([2]),
        edge_std_px=None if spread_px is None else np.full((1, 4), spread_px, np.float32),
    )


def test_the_annotator_band_widens_with_the_spread() -> None:
    scene = np.full((300, 320, 3), 40, np.uint8)
    plain = make_annotator(AnnotateConfig(text_scale=0))
    banded = make_annotator(AnnotateConfig(text_scale=0, edge_std_band=1.0))
    base = plain.annotate(scene, _dets(4.0), [])
    # No spreads (an official export): the same picture as without the option.
    assert np.array_equal(banded.annotate(scene, _dets(None), []), base)
    changed = [int((banded.annotate(scene, _dets(s), []) != base).any(-1).sum()) for s in (2, 8)]
    assert 0 < changed[0] < changed[1]
    # The band lies along the edges: the box's centre is untouched.
    assert np.array_equal(banded.annotate(scene, _dets(8.0), [])[140, 160], base[140, 160])
    with pytest.raises(ValueError, match="edge_std_band"):
        AnnotateConfig(edge_std_band=-1)


def test_expected_noise_distance_and_the_scaled_distance() -> None:
    boxes = np.array([[0, 0, 100, 50], [0, 0, 100, 50]], np.float64)
    spread = np.array([[0, 0, 0, 0], [10, 5, 10, 5]], np.float64)
    noise = expected_noise_distance(boxes, spread)
    assert noise[0] == 0.0
    assert noise[1] == pytest.approx(math.sqrt(2 / math.pi) * (20 / 100 + 10 / 50))

    class Obj:
        estimate = np.array([[0.0, 0.0], [100.0, 50.0]])

    class Det:
        points = np.array([[20.0, 0.0], [120.0, 50.0]])  # IoU 80 / 120
        noise_distance = float(noise[1])

    distance = spread_scaled_distance(1.0)(Det(), Obj())  # type: ignore[arg-type]
    assert distance == pytest.approx((1 - 80 / 120) / (1 + noise[1]))


def _frame(index: int, box: list[float], spread_px: float) -> FramePacket:
    dets = Detections(
        boxes_xyxy=np.array([box], np.float32),
        scores=np.array([0.9], np.float32),
        class_ids=np.array([2]),
        edge_std_px=np.full((1, 4), spread_px, np.float32),
    )
    image = np.zeros((400, 600, 3), np.uint8)
    return FramePacket("0", index, index / 25, image, 0.0, detections=dets)


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_spread_weighting_keeps_an_unsure_jump_on_its_track(weight: float) -> None:
    """A box that jumps to IoU 0.25 (beyond the 0.7 distance threshold) with edges the model is
    very unsure of (std 40 % of the side): the weighted tracker keeps its id, the plain one
    starts a new track."""
    tracker = Tracker(TrackConfig(initialization_delay=1, spread_weight=weight))
    ids = []
    box = [100.0, 100.0, 200.0, 200.0]
    for i in range(6):
        out = tracker.process(_frame(i, box, spread_px=40.0))
        assert out.detections is not None and out.detections.edge_std_px is not None
        ids.append(int(out.detections.track_ids[0]))
    for i in range(6, 9):
        out = tracker.process(_frame(i, [160.0, 100.0, 260.0, 200.0], spread_px=40.0))
        assert out.detections is not None
        ids.append(int(out.detections.track_ids[0]))
    first = ids[5]
    assert first > 0
    if weight > 0:
        assert ids[6:] == [first] * 3, ids
    else:
        assert first not in ids[6:], ids
    with pytest.raises(ValueError, match="spread_weight"):
        TrackConfig(spread_weight=-0.5)


def test_the_bench_counts_a_split_track_and_draws_known_noise() -> None:
    from bench.uncertainty import id_metrics, noisy_boxes

    box = np.array([[100, 100, 140, 160]], np.float32)

    def dets(track_id: int) -> Detections:
        return Detections(box, np.array([0.9], np.float32), np.array([2]), np.array([track_id]))

    reference = [dets(1) for _ in range(12)]
    run = [dets(5) for _ in range(6)] + [dets(9) for _ in range(6)]
    m = id_metrics(reference, run)
    assert (m["reference_tracks"], m["ids"], m["fragments"], m["id_switches"]) == (1, 2, 1, 1)
    assert m["coverage"] == 1.0
    clean = [dets(1) for _ in range(400)]
    noisy, shuffled = noisy_boxes(clean, 0.1, 0.1, seed=0)
    moved = np.stack([d.boxes_xyxy[0] for d in noisy]) - box[0]
    spread = noisy[0].edge_std_px
    assert spread is not None and spread[0].tolist() == pytest.approx([4, 6, 4, 6], abs=1e-4)
    # The drawn offsets have the stated spread (x2/y2 also carry the +1 px of the ordering).
    assert moved[:, 0].std() == pytest.approx(4.0, rel=0.15)
    assert moved[:, 1].std() == pytest.approx(6.0, rel=0.15)
    assert shuffled[0].edge_std_px is not None
