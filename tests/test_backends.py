"""The torch and ONNX Runtime backends against the official reference outputs (io.pt).

Real ONNX Runtime sessions on the official export users bring, and on our own export; the torch
backend on the calibrated fixture checkpoint. CUDA variants skip here (no GPU) and say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import dfine
from dfine.backends.class_names import resolve_class_names
from dfine.backends.onnx_backend import OnnxRuntimeBackend
from dfine.backends.torch_backend import TorchBackend
from dfine.export import export_onnx
from matching import match_detections

CALIBRATED = "dfine_n_calibrated"
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"
)


@pytest.fixture(scope="module")
def io(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixtures_dir / CALIBRATED / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_onnx(fixtures_dir: Path) -> Path:
    return fixtures_dir / CALIBRATED / "dfine_n_calibrated_official.onnx"


@pytest.fixture(scope="module")
def ort_backend(official_onnx: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(official_onnx, intra_op_threads=2)


@pytest.fixture(scope="module")
def torch_backend(fixtures_dir: Path) -> TorchBackend:
    return TorchBackend.from_checkpoint(fixtures_dir / CALIBRATED / "dfine_n_calibrated.pth", "n")


def _check_against_reference(
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    io: dict[str, torch.Tensor],
    box_px: float,
    score: float,
) -> None:
    labels, boxes, scores = out
    assert labels.dtype == np.int64 and boxes.dtype == np.float32 and scores.dtype == np.float32
    assert labels.shape == (1, 300) and boxes.shape == (1, 300, 4) and scores.shape == (1, 300)
    assert np.all(np.diff(scores[0]) <= 0), "scores must be sorted descending"
    ref = (io["labels"][0].numpy(), io["boxes"][0].numpy(), io["scores"][0].numpy())
    report = match_detections(ref, (labels[0], boxes[0], scores[0]))
    assert report.label_mismatches == 0, report
    assert report.max_box_px <= box_px, report
    assert report.max_score <= score, report


# ---- ONNX Runtime ---------------------------------------------------------------------------


def test_ort_runs_the_official_export(
    ort_backend: OnnxRuntimeBackend, io: dict[str, torch.Tensor]
) -> None:
    assert ort_backend.input_size_hw == (640, 640)
    assert ort_backend.device == torch.device("cpu")
    assert ort_backend.class_names == list(dfine.COCO_CLASSES)  # 80 classes read off the graph
    out = ort_backend(io["images"], io["orig_target_sizes"])
    _check_against_reference(out, io, box_px=0.01, score=1e-5)


def test_ort_outputs_belong_to_the_caller(
    ort_backend: OnnxRuntimeBackend, io: dict[str, torch.Tensor]
) -> None:
    labels, boxes, scores = ort_backend(io["images"], io["orig_target_sizes"])
    kept = boxes.copy(), scores.copy()
    ort_backend(torch.zeros_like(io["images"]), torch.tensor([[100, 50]]))
    np.testing.assert_array_equal(boxes, kept[0])
    np.testing.assert_array_equal(scores, kept[1])


def test_ort_batch_of_two(ort_backend: OnnxRuntimeBackend, io: dict[str, torch.Tensor]) -> None:
    images = torch.cat([io["images"], io["images"]])
    sizes = torch.tensor([[640, 480], [1280, 960]])
    labels, boxes, _ = ort_backend(images, sizes)
    assert labels.shape == (2, 300)
    # Same picture, twice the original size: same detections, boxes scaled by 2.
    np.testing.assert_array_equal(labels[0], labels[1])
    np.testing.assert_allclose(boxes[1], 2 * boxes[0], atol=1e-3)
    single = ort_backend(io["images"], io["orig_target_sizes"])
    np.testing.assert_allclose(boxes[0], single[1][0], atol=1e-3)


def test_ort_reads_class_names_from_our_metadata(tmp_path: Path, fixtures_dir: Path) -> None:
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, fixtures_dir / CALIBRATED / "dfine_n_calibrated.pth")
    names = [f"kind_{i}" for i in range(80)]
    path = export_onnx(
        model, dfine.PostProcessor(), tmp_path / "n320.onnx", imgsz=320, class_names=names
    )
    backend = OnnxRuntimeBackend(path)
    assert backend.input_size_hw == (320, 320)
    assert backend.class_names == names
    # An explicit list wins over the metadata.
    assert OnnxRuntimeBackend(path, class_names=list(dfine.COCO_CLASSES)).class_names[0] == "person"
    labels, _, _ = backend(torch.rand(1, 3, 320, 320), torch.tensor([[320, 320]]))
    assert labels.shape == (1, 300)


def test_class_count_of_the_official_export_is_read_from_its_graph(official_onnx: Path) -> None:
    from dfine.model_info import ModelKind, read_model_info

    info = read_model_info(official_onnx)  # no metadata: the count comes from the graph
    assert (
        info.kind is ModelKind.ONNX and info.num_classes == 80 and info.input_size_hw == (640, 640)
    )


def test_ort_refuses_wrong_inputs(ort_backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(
        ValueError, match=r"images must have shape \(B, 3, 640, 640\), got \(1, 3, 320, 320\)"
    ):
        ort_backend(torch.rand(1, 3, 320, 320), torch.tensor([[320, 320]]))
    with pytest.raises(ValueError, match=r"orig_sizes_wh must have shape \(1, 2\)"):
        ort_backend(torch.rand(1, 3, 640, 640), torch.tensor([640, 480]))


def test_ort_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(
        dfine.CheckpointError, match="garbage.onnx: ONNX Runtime cannot load it"
    ) as err:
        OnnxRuntimeBackend(garbage)
    assert "\n" not in str(err.value)

    with pytest.raises(dfine.CheckpointError, match="no such ONNX file"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")

    # A valid ONNX model that is not a D-FINE deploy export.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    other = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    with pytest.raises(dfine.CheckpointError, match="not a D-FINE deploy export"):
        OnnxRuntimeBackend(other)


def test_ort_refuses_unavailable_provider(official_onnx: Path) -> None:
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        OnnxRuntimeBackend(official_onnx, providers=["NoSuchExecutionProvider"])


# ---- torch ----------------------------------------------------------------------------------


def test_torch_backend_matches_reference(
    torch_backend: TorchBackend, io: dict[str, torch.Tensor]
) -> None:
    assert torch_backend.input_size_hw == (640, 640)
    assert torch_backend.device == torch.device("cpu")
    assert torch_backend.class_names[0] == "person" and len(torch_backend.class_names) == 80
    out = torch_backend(io["images"], io["orig_target_sizes"])
    _check_against_reference(out, io, box_px=0.01, score=1e-5)


def test_torch_outputs_belong_to_the_caller(
    torch_backend: TorchBackend, io: dict[str, torch.Tensor]
) -> None:
    _, boxes, _ = torch_backend(io["images"], io["orig_target_sizes"])
    kept = boxes.copy()
    torch_backend(torch.zeros_like(io["images"]), torch.tensor([[10, 10]]))
    np.testing.assert_array_equal(boxes, kept)


def test_torch_and_ort_agree_on_a_batch(
    torch_backend: TorchBackend, ort_backend: OnnxRuntimeBackend
) -> None:
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 640, 640, generator=generator)
    sizes = torch.tensor([[1920, 1080], [640, 640]])
    a = torch_backend(images, sizes)
    b = ort_backend(images, sizes)
    for i in range(2):
        report = match_detections(tuple(x[i] for x in a), tuple(x[i] for x in b))
        assert report.label_mismatches == 0 and report.max_box_px <= 0.05, report


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fp16": True}, "need a CUDA device"),
        ({"cuda_graphs": True}, "need a CUDA device"),
        ({"input_size_hw": (640, 600)}, "multiples of 32"),
        ({"intra_op_threads": 0}, "intra_op_threads must be >= 1"),
        ({"device": "mps"}, "device must be"),
        ({"class_names": ["a"]}, "class_names has 1 entries"),
    ],
)
def test_torch_backend_refuses_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TorchBackend(torch.nn.Identity(), dfine.PostProcessor(), **kwargs)  # type: ignore[arg-type]


def test_torch_from_checkpoint_wrong_size(fixtures_dir: Path) -> None:
    with pytest.raises(dfine.CheckpointError, match="build_model"):
        TorchBackend.from_checkpoint(fixtures_dir / CALIBRATED / "dfine_n_calibrated.pth", "s")


@needs_cuda
@pytest.mark.parametrize(
    ("fp16", "cuda_graphs"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_torch_cuda(
    fixtures_dir: Path, io: dict[str, torch.Tensor], fp16: bool, cuda_graphs: bool
) -> None:
    backend = TorchBackend.from_checkpoint(
        fixtures_dir / CALIBRATED / "dfine_n_calibrated.pth",
        "n",
        device="cuda",
        fp16=fp16,
        cuda_graphs=cuda_graphs,
    )
    for _ in range(2):  # the second call replays the captured graph
        labels, boxes, scores = backend(io["images"].cuda(), io["orig_target_sizes"])
    ref = (io["labels"][0].numpy(), io["boxes"][0].numpy(), io["scores"][0].numpy())
    report = match_detections(ref, (labels[0], boxes[0], scores[0]))
    if fp16:  # FP16: most labels and boxes hold, within FP16 resolution
        assert report.label_mismatches <= 30 and report.max_score <= 5e-3, report
    else:
        assert report.label_mismatches == 0 and report.max_box_px <= 0.05, report


@needs_cuda
def test_ort_cuda_provider(official_onnx: Path, io: dict[str, torch.Tensor]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA execution provider")
    backend = OnnxRuntimeBackend(official_onnx, providers=["CUDAExecutionProvider"])
    _check_against_reference(backend(io["images"], io["orig_target_sizes"]), io, 0.05, 1e-4)


# ---- class names ----------------------------------------------------------------------------


def test_class_names_fallbacks() -> None:
    assert resolve_class_names(80)[:2] == ["person", "bicycle"]
    assert resolve_class_names(3) == ["class_0", "class_1", "class_2"]
    assert resolve_class_names(2, ("cat", "dog")) == ["cat", "dog"]
    with pytest.raises(ValueError, match="has 1 entries but the model has 2 classes"):
        resolve_class_names(2, ["cat"])
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        resolve_class_names(0)
    assert json.loads(json.dumps(resolve_class_names(80))) == list(dfine.COCO_CLASSES)
