"""The inference stage on real frames, with real ONNX Runtime and torch backends.

Frames come from the shared clips decoded by PyAV and preprocessed by the real preprocessor.
The fixture weights are random (calibrated), so the detections are not meaningful objects; the
tests check the stage's own work: shapes, clipping, threshold, class filter, errors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import dfine
from dfine.backends.onnx_backend import OnnxRuntimeBackend
from dfine.model_info import ModelKind, model_kind
from stages.decode import frame_to_rgb_u8
from stages.frame import FramePacket
from stages.infer import (
    Backend,
    Device,
    InferConfig,
    InferenceStage,
    choose_backend,
    make_backend,
    resolve_backend,
)
from stages.preprocess import image_to_model_input

CALIBRATED = "dfine_n_calibrated"


@pytest.fixture(scope="module")
def frame_rgb(media_dir: Path) -> np.ndarray:
    """A real 960x540 street frame."""
    with av.open(str(media_dir / "traffic_highway_960x540.mp4")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == 30:
                return frame_to_rgb_u8(frame)
    raise AssertionError("clip shorter than expected")


def _packet(image: np.ndarray, size: int = 640) -> FramePacket:
    packet = FramePacket("0", 30, 1.0, image, time.monotonic())
    packet.model_input = image_to_model_input(
        image, size, torch.device("cpu"), resize_in_uint8=True
    )
    return packet


@pytest.fixture(scope="module")
def official_onnx(fixtures_dir: Path) -> Path:
    return fixtures_dir / CALIBRATED / "dfine_n_calibrated_official.onnx"


@pytest.fixture(scope="module")
def checkpoint(fixtures_dir: Path) -> Path:
    return fixtures_dir / CALIBRATED / "dfine_n_calibrated.pth"


@pytest.fixture(scope="module")
def ort_backend(official_onnx: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(official_onnx)


def _stage(backend: object, **changes: object) -> InferenceStage:
    config = InferConfig(**changes)  # type: ignore[arg-type]
    stage = InferenceStage(config, lambda: backend)  # type: ignore[arg-type, return-value]
    stage.setup()
    return stage


def _check_well_formed(packet: FramePacket, threshold: float) -> None:
    det = packet.detections
    assert det is not None and packet.model_input is None
    n = len(det)
    assert det.boxes_xyxy.dtype == np.float32 and det.boxes_xyxy.shape == (n, 4)
    assert det.scores.dtype == np.float32 and det.class_ids.dtype == np.int64
    assert np.all(det.track_ids == -1)
    assert np.all(det.scores >= threshold) and np.all(det.scores <= 1)
    assert np.all((det.class_ids >= 0) & (det.class_ids < 80))
    x1, y1, x2, y2 = det.boxes_xyxy.T
    assert np.all((x1 >= 0) & (x2 <= packet.width) & (y1 >= 0) & (y2 <= packet.height))
    assert np.all((x1 <= x2) & (y1 <= y2))


def test_ort_stage_on_a_real_frame(ort_backend: OnnxRuntimeBackend, frame_rgb: np.ndarray) -> None:
    everything = _stage(ort_backend, score_threshold=0.0).process(_packet(frame_rgb))
    _check_well_formed(everything, 0.0)
    all_det = everything.detections
    assert all_det is not None and len(all_det) == 300
    # The random model's boxes spill over the frame; the stage clips them to it.
    raw = ort_backend(_packet(frame_rgb).model_input, torch.tensor([[960, 540]]))[1][0]
    assert raw.min() < 0 or raw[:, 2].max() > 960 or raw[:, 3].max() > 540
    assert all_det.boxes_xyxy.min() >= 0

    # Threshold: exactly the detections scoring at or above it survive.
    threshold = float(np.median(all_det.scores))
    some = _stage(ort_backend, score_threshold=threshold).process(_packet(frame_rgb))
    _check_well_formed(some, threshold)
    assert some.detections is not None
    assert len(some.detections) == int((all_det.scores >= threshold).sum())
    assert 0 < len(some.detections) < 300

    # Class filter: only the asked classes, and all of them that pass the threshold.
    wanted = tuple(int(c) for c in np.unique(all_det.class_ids)[:2])
    only = _stage(ort_backend, score_threshold=0.0, classes=wanted).process(_packet(frame_rgb))
    assert only.detections is not None
    assert set(only.detections.class_ids.tolist()) == set(wanted)
    assert len(only.detections) == int(np.isin(all_det.class_ids, wanted).sum())


def test_torch_stage_on_a_real_frame(
    checkpoint: Path, frame_rgb: np.ndarray, ort_backend: OnnxRuntimeBackend
) -> None:
    config = InferConfig(
        model=checkpoint, backend=Backend.TORCH, device=Device.CPU, score_threshold=0.0
    )
    stage = InferenceStage(config, lambda: make_backend(config))
    stage.setup()
    packet = stage.process(_packet(frame_rgb))
    _check_well_formed(packet, 0.0)
    # The same weights through the official ONNX file give the same detections.
    reference = _stage(ort_backend, score_threshold=0.0).process(_packet(frame_rgb)).detections
    assert packet.detections is not None and reference is not None
    np.testing.assert_allclose(
        np.sort(packet.detections.scores), np.sort(reference.scores), atol=1e-5
    )
    assert sorted(packet.detections.class_ids.tolist()) == sorted(reference.class_ids.tolist())


def test_stage_moves_input_to_the_backend_device(
    ort_backend: OnnxRuntimeBackend, frame_rgb: np.ndarray
) -> None:
    packet = _packet(frame_rgb)
    packet.model_input = packet.model_input.to(torch.float64).to("cpu")  # any tensor is accepted
    _check_well_formed(_stage(ort_backend, score_threshold=0.0).process(packet), 0.0)


def test_stage_refuses_a_missing_input(
    ort_backend: OnnxRuntimeBackend, frame_rgb: np.ndarray
) -> None:
    packet = FramePacket("0", 0, 0.0, frame_rgb, time.monotonic())
    with pytest.raises(TypeError, match="model_input must be a torch tensor"):
        _stage(ort_backend).process(packet)


def test_stage_refuses_a_size_mismatch(official_onnx: Path) -> None:
    config = InferConfig(model=official_onnx, imgsz=320)
    stage = InferenceStage(config, lambda: make_backend(config))
    with pytest.raises(
        ValueError, match="takes 640x640 images but model.imgsz is 320; drop --imgsz"
    ):
        stage.setup()


def test_stage_refuses_classes_the_model_lacks(ort_backend: OnnxRuntimeBackend) -> None:
    config = InferConfig(num_classes=365, classes=(0, 300))
    with pytest.raises(ValueError, match=r"names a class the model does not have \(it has 80"):
        InferenceStage(config, lambda: ort_backend).setup()


def test_stage_needs_setup(ort_backend: OnnxRuntimeBackend, frame_rgb: np.ndarray) -> None:
    stage = InferenceStage(InferConfig(), lambda: ort_backend)
    with pytest.raises(RuntimeError, match="setup"):
        stage.process(_packet(frame_rgb))


# ---- make_backend ---------------------------------------------------------------------------


def test_make_backend_picks_by_suffix(official_onnx: Path, checkpoint: Path) -> None:
    from dfine.backends.torch_backend import TorchBackend

    assert isinstance(
        make_backend(InferConfig(model=official_onnx, device=Device.CPU)), OnnxRuntimeBackend
    )
    assert isinstance(
        make_backend(InferConfig(model=checkpoint, backend=Backend.TORCH, device=Device.CPU)),
        TorchBackend,
    )


def test_untrained_model_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from dfine.backends.torch_backend import TorchBackend

    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="stages.infer"):
        backend = make_backend(
            InferConfig(model=None, backend=Backend.TORCH, device=Device.CPU, imgsz=320)
        )
    assert isinstance(backend, TorchBackend)
    assert "UNTRAINED" in caplog.text and "github.com/Peterande" in caplog.text
    assert torch.equal(torch.random.get_rng_state(), state)  # the seeding did not leak
    labels, _, _ = backend(torch.rand(1, 3, 320, 320), torch.tensor([[320, 320]]))
    assert labels.shape == (1, 300)


def test_checkpoint_for_onnxruntime_is_exported_once(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = InferConfig(
        model=checkpoint,
        backend=Backend.ONNXRUNTIME,
        device=Device.CPU,
        imgsz=320,
        onnx_cache_dir=tmp_path / "cache",
    )
    first = make_backend(config)
    assert isinstance(first, OnnxRuntimeBackend) and first.input_size_hw == (320, 320)
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].name.startswith("dfine_n_calibrated-n-320-op17-")
    mtime = cached[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="stages.infer"):
        second = make_backend(config)
    assert "using cached ONNX export" in caplog.text
    assert isinstance(second, OnnxRuntimeBackend) and second.path == cached[0]
    assert cached[0].stat().st_mtime_ns == mtime
    # Another input size is another cache entry.
    assert cached[0] not in (tmp_path / "cache").glob("*-640-*")


def test_wrong_model_files_give_one_line_errors(tmp_path: Path) -> None:
    fake_pth = tmp_path / "notes.pth"
    fake_pth.write_text("not a checkpoint")
    with pytest.raises(dfine.CheckpointError) as err:
        make_backend(InferConfig(model=fake_pth, device=Device.CPU))
    assert "notes.pth" in str(err.value) and "\n" not in str(err.value)

    fake_onnx = tmp_path / "model.onnx"
    fake_onnx.write_bytes(b"\x00\x01garbage")
    with pytest.raises(dfine.CheckpointError) as err:
        make_backend(InferConfig(model=fake_onnx, device=Device.CPU))
    assert "model.onnx" in str(err.value) and "\n" not in str(err.value)


def test_tensorrt_without_tensorrt_says_so(tmp_path: Path) -> None:
    from dfine.backends.tensorrt_backend import TensorRTUnavailableError, tensorrt_available

    if tensorrt_available() and torch.cuda.is_available():
        pytest.skip("TensorRT is installed here; the unavailable path cannot be seen")
    engine = tmp_path / "n.engine"
    engine.write_bytes(b"\x00")
    with pytest.raises(TensorRTUnavailableError, match="TensorRT"):
        make_backend(InferConfig(model=engine))


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": "q"}, "model.size must be one of n, s, m, l, x"),
        ({"num_classes": 0}, "model.num_classes must be >= 1"),
        ({"imgsz": 600}, "model.imgsz must be a multiple of 32"),
        ({"score_threshold": 1.5}, r"model.score_threshold must be in \[0, 1\]"),
        ({"score_threshold": -0.1}, r"model.score_threshold must be in \[0, 1\]"),
        ({"classes": (0, 80), "num_classes": 80}, r"class indices in \[0, 79\]"),
        ({"classes": (-1,)}, "class indices"),
        ({"classes": ()}, "non-empty"),
        ({"intra_op_threads": 0}, "model.intra_op_threads must be >= 1"),
        ({"opset": 16}, "model.opset must be >= 17"),
        ({"backend": "tflite"}, "model.backend must be one of auto, torch, onnxruntime, tensorrt"),
        ({"device": "tpu"}, "model.device must be one of auto, cpu, cuda"),
        ({"fp16": True, "device": "cpu"}, "need a CUDA device"),
        ({"model": "weights.bin"}, "unknown file type '.bin'"),
        ({"model": "n.onnx", "backend": "torch"}, "torch backend needs a .pth"),
        ({"model": "n.pth", "backend": "tensorrt"}, "TensorRT needs an engine"),
        ({"model": None, "backend": "tensorrt"}, "TensorRT needs an engine"),
        ({"model": "n.engine", "backend": "onnxruntime"}, "ONNX Runtime takes an .onnx"),
    ],
)
def test_invalid_configs(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InferConfig(**changes)  # type: ignore[arg-type]


def test_config_normalises_plain_values() -> None:
    config = InferConfig(backend="onnxruntime", device="cpu", model="~/m.pth", classes=[0, 2])  # type: ignore[arg-type]
    assert config.backend is Backend.ONNXRUNTIME and config.device is Device.CPU
    assert config.model == Path("~/m.pth").expanduser() and config.classes == (0, 2)
    assert dataclasses.replace(config, imgsz=320).imgsz == 320


@pytest.mark.parametrize(
    ("model", "on_cpu", "on_cuda"),
    [
        (None, Backend.ONNXRUNTIME, Backend.TORCH),
        ("a.pth", Backend.ONNXRUNTIME, Backend.TORCH),
        ("a.PT", Backend.ONNXRUNTIME, Backend.TORCH),
        ("a.onnx", Backend.ONNXRUNTIME, Backend.ONNXRUNTIME),
        ("a.engine", Backend.TENSORRT, Backend.TENSORRT),
        ("a.plan", Backend.TENSORRT, Backend.TENSORRT),
    ],
)
def test_auto_backend_is_the_fastest_here(
    model: str | None, on_cpu: Backend, on_cuda: Backend
) -> None:
    """auto: a checkpoint runs through ONNX Runtime on a CPU and in torch FP16 on CUDA."""
    config = InferConfig(model=model)  # type: ignore[arg-type]
    assert resolve_backend(config, cuda_available=False) is on_cpu
    assert resolve_backend(config, cuda_available=True) is on_cuda
    kind = model_kind(config.model)
    assert choose_backend(config, kind, cuda_available=True).fp16 is (on_cuda is Backend.TORCH)
    assert not choose_backend(config, kind, cuda_available=False).fp16
    forced = InferConfig(model=model, backend=Backend.TORCH) if on_cuda is Backend.TORCH else None  # type: ignore[arg-type]
    if forced is not None:
        assert resolve_backend(forced, cuda_available=False) is Backend.TORCH


def test_cuda_without_a_gpu_is_an_error_everywhere() -> None:
    from dfine.backends.device import resolve_device
    from stages.preprocess import PreprocessConfig, Preprocessor

    with pytest.raises(ValueError, match="no GPU"):
        resolve_device(Device.CUDA, cuda_available=False)
    with pytest.raises(ValueError, match="no GPU"):
        choose_backend(
            InferConfig(model="a.pth", device=Device.CUDA),
            ModelKind.CHECKPOINT,  # type: ignore[arg-type]
            cuda_available=False,
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            Preprocessor(PreprocessConfig(device=Device.CUDA)).setup()
