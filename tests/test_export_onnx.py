"""ONNX export: the exported graph in ONNX Runtime gives the torch detections (as a matched set).

N uses the calibrated fixture weights (every part of the network active); S is randomly
initialised and exported at 320 to keep the time down. Each export runs once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import dfine
from dfine.export import DeployModel, export_from_checkpoint, export_onnx
from matching import match_detections

CKPT = "dfine_n_calibrated/dfine_n_calibrated.pth"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, images: torch.Tensor, sizes: torch.Tensor) -> list[np.ndarray]:
    feed = {"images": images.numpy(), "orig_target_sizes": sizes.numpy()}
    return list(_session(path).run(["labels", "boxes", "scores"], feed))


@pytest.fixture(scope="module")
def n_model(fixtures_dir: Path) -> DeployModel:
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, fixtures_dir / CKPT)
    return DeployModel(model.eval(), dfine.PostProcessor()).eval()


@pytest.fixture(scope="module")
def n_onnx(n_model: DeployModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "n.onnx"
    return export_onnx(n_model.model, n_model.postprocessor, out, imgsz=640, opset=17)


@pytest.fixture(scope="module")
def s_model_and_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeployModel, Path]:
    torch.manual_seed(0)
    model = dfine.build_model("s", num_classes=20)
    # Plain random init leaves the heads at zero: every detection is an anchor box with the
    # same score, and exact ties make the selection order arbitrary. Jitter every weight so
    # that the comparison is between distinct detections.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    deploy = DeployModel(model.eval(), dfine.PostProcessor(num_classes=20)).eval()
    out = tmp_path_factory.mktemp("export") / "s.onnx"
    names = [f"thing{i}" for i in range(20)]
    export_onnx(model, deploy.postprocessor, out, imgsz=320, opset=17, class_names=names)
    return deploy, out


def _assert_close_sets(
    torch_out: tuple[torch.Tensor, ...], onnx_out: list[np.ndarray], box_px: float, score: float
) -> None:
    for b in range(onnx_out[0].shape[0]):
        report = match_detections(
            tuple(t[b].numpy() for t in torch_out), tuple(o[b] for o in onnx_out)
        )
        assert report.label_mismatches == 0, report
        assert report.max_box_px <= box_px, report
        assert report.max_score <= score, report


def test_n_export_matches_torch(n_model: DeployModel, n_onnx: Path, fixtures_dir: Path) -> None:
    io = torch.load(fixtures_dir / "dfine_n_calibrated/io.pt", weights_only=True)
    images, sizes = io["images"], io["orig_target_sizes"]
    with torch.no_grad():
        expected = n_model(images, sizes)
    got = _run(n_onnx, images, sizes)
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32 and got[2].dtype == np.float32
    assert got[1].shape == (1, 300, 4)
    _assert_close_sets(expected, got, box_px=0.05, score=1e-4)
    # The calibrated outputs are varied: a real test, not 300 copies of one detection.
    assert len(np.unique(got[0])) > 10


def test_n_export_dynamic_batch(n_model: DeployModel, n_onnx: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 640, 640, generator=generator)
    sizes = torch.tensor([[640, 480], [1920, 1080], [320, 240], [640, 640]])
    got4 = _run(n_onnx, images, sizes)
    assert got4[0].shape == (4, 300) and got4[1].shape == (4, 300, 4)
    with torch.no_grad():
        expected = n_model(images, sizes)
    _assert_close_sets(expected, got4, box_px=0.05, score=1e-4)
    # Batch 1 runs on the same file and agrees with row 2 of the batch.
    got1 = _run(n_onnx, images[2:3], sizes[2:3])
    assert got1[0].shape == (1, 300)
    report = match_detections(tuple(o[0] for o in got1), tuple(o[2] for o in got4))
    assert report.label_mismatches == 0 and report.max_box_px <= 0.05, report


def test_n_export_file_contents(n_onnx: Path) -> None:
    proto = onnx.load(str(n_onnx))
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 17
    ops = {n.op_type for n in proto.graph.node}
    assert "LayerNormalization" in ops  # one op per norm (what TensorRT keeps in FP32)
    assert [i.name for i in proto.graph.input] == ["images", "orig_target_sizes"]
    assert [o.name for o in proto.graph.output] == ["labels", "boxes", "scores"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 640, 640]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == list(dfine.COCO_CLASSES)
    assert meta["num_classes"] == "80" and meta["input_size_hw"] == "640,640"
    assert meta["dfine_size"] == "n"


def test_s_export_matches_torch(s_model_and_onnx: tuple[DeployModel, Path]) -> None:
    deploy, path = s_model_and_onnx
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 320, 320, generator=generator)
    sizes = torch.tensor([[960, 540], [320, 320]])
    with torch.no_grad():
        expected = deploy(images, sizes)
    got = _run(path, images, sizes)
    assert got[0].shape == (2, 300) and int(got[0].max()) < 20
    _assert_close_sets(expected, got, box_px=0.05, score=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["class_names"])[3] == "thing3" and meta["input_size_hw"] == "320,320"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 16}, "opset must be >= 17"),
        ({"imgsz": 300}, "multiple of 32"),
        ({"imgsz": (640, 0)}, "multiple of 32"),
        ({"class_names": ["a", "b"]}, "class_names has 2 entries"),
    ],
)
def test_export_refuses_bad_arguments(
    kwargs: dict[str, object], message: str, tmp_path: Path
) -> None:
    model = torch.nn.Identity()
    with pytest.raises(ValueError, match=message):
        export_onnx(model, dfine.PostProcessor(), tmp_path / "x.onnx", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "x.onnx").exists()


def test_export_from_checkpoint_refuses_wrong_size(fixtures_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(dfine.CheckpointError):
        export_from_checkpoint(fixtures_dir / CKPT, "s", 80, tmp_path / "s.onnx", imgsz=320)
    assert not (tmp_path / "s.onnx").exists()
