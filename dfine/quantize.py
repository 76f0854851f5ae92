"""INT8 static quantisation of a deploy ONNX export, calibrated on the user's own footage.

``finestream export --int8 --calibrate VIDEO_OR_DIR`` runs :func:`quantize_int8` on the FP32
export and writes ``<name>.int8.onnx`` beside it. The steps are ONNX Runtime's own tools:

1. ``quant_pre_process``: ONNX Runtime's graph optimisation and shape inference (symbolic when
   it completes, else ONNX's). Among other things it folds the NanoDet teacher's float16 → float32
   weight casts into plain initializers, which the quantiser needs to quantise weights per channel.
2. Calibration: ``num_frames`` frames spread evenly over the video (or the sorted image folder),
   decoded with PyAV and preprocessed by the pipeline's own code (``stages.decode``,
   ``stages.preprocess``), so the activation ranges are those the model sees when it runs.
3. ``quantize_static``: QDQ format, INT8 weights per output channel, UINT8 activations, ranges
   from ``minmax``, ``entropy`` or ``percentile`` calibration.

What stays in float (:class:`FloatPart`) was found by measuring: quantise, compare the boxes with
the FP32 model's on real frames, keep a part in float, repeat (``bench/int8.py``, the table in
bench/RESULTS.md). Both parts are found from the graph's structure, not from node names, so they
apply to our exports, the official D-FINE exports and the NanoDet teacher alike:

- ``GEOMETRY``: arithmetic on ``orig_target_sizes`` alone (box scaling, the teacher's letterbox
  offsets). Calibrated on one clip it learns one frame size; frames of another size fall outside
  its range.
- ``TAIL``: every node after the last convolution: the detection heads' split into class scores
  and box distributions, the distribution softmax and integral, decoding, NMS and top-k. For
  D-FINE this is the whole transformer decoder and the postprocessor (the backbone and hybrid
  encoder are quantised).

The output keeps the FP32 file's metadata (class names, input size) and adds ``quantization``
(JSON: format, method, calibration frames and source, the parts kept in float), so
``dfine.model_info`` reads it like any deploy export and says it is INT8.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import logging
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CALIBRATION_FRAMES",
    "CalibrationMethod",
    "CalibrationSource",
    "FloatPart",
    "Int8Export",
    "QuantizeError",
    "calibration_inputs",
    "check_calibration_source",
    "float_node_names",
    "int8_path",
    "is_quantized",
    "quantize_int8",
]

DEFAULT_CALIBRATION_FRAMES = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
META_QUANTIZATION = "quantization"
#: op types that only a quantised graph holds (QDQ pairs, or operators ORT fused from them).
QUANTIZED_OP_TYPES = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
     "MatMulInteger", "DynamicQuantizeLinear"}
)  # fmt: skip
#: histogram calibrators keep every tensor of every frame they are given at once; they are fed
#: this many frames at a time (ORT merges the histograms), which bounds the memory.
_HISTOGRAM_CHUNK = 8


class QuantizeError(ValueError):
    """Bad input to INT8 export (one line: the thing and the fix); refused before work starts."""


class CalibrationMethod(str, enum.Enum):
    """How activation ranges are set from the calibration frames."""

    MINMAX = "minmax"  # the observed minimum and maximum
    ENTROPY = "entropy"  # the range whose histogram loses least information (KL divergence)
    PERCENTILE = "percentile"  # the 99.999th percentile of |x|: clips rare outliers


class FloatPart(str, enum.Enum):
    """A part of the graph kept in float; see the module docstring for why each one."""

    GEOMETRY = "geometry"
    TAIL = "tail"


DEFAULT_FLOAT_PARTS = (FloatPart.GEOMETRY, FloatPart.TAIL)


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration frames come from: a video file, or a folder of images.

    Attributes:
        path: the video or the folder.
        images: the folder's image files, sorted by name; empty for a video.
    """

    path: Path
    images: tuple[Path, ...] = ()

    @property
    def is_video(self) -> bool:
        return not self.images


@dataclass(frozen=True)
class Int8Export:
    """What :func:`quantize_int8` wrote.

    Attributes:
        path: the INT8 ``.onnx``.
        calibration_frames: frames the ranges were computed from.
        method: the calibration method.
        float_parts: the parts kept in float.
        float_nodes: how many nodes of the (pre-processed) FP32 graph were kept in float.
        nodes: how many nodes that graph had.
    """

    path: Path
    calibration_frames: int
    method: CalibrationMethod
    float_parts: tuple[FloatPart, ...]
    float_nodes: int
    nodes: int


def int8_path(fp32_path: Path) -> Path:
    """Where the INT8 model of ``fp32_path`` goes: ``model.onnx`` → ``model.int8.onnx``."""
    return fp32_path.with_suffix(".int8.onnx")


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph is already quantised (QDQ pairs or integer operators)."""
    return any(node.op_type in QUANTIZED_OP_TYPES for node in model.graph.node)


def check_calibration_source(path: str | Path) -> CalibrationSource:
    """Check ``--calibrate`` before anything loads: a folder must hold images, a file must be a
    video whose first frame decodes.

    Raises:
        QuantizeError: missing, an empty folder, not a readable video.
    """
    import av

    path = Path(path)
    if not path.exists():
        raise QuantizeError(
            f"--calibrate {path}: no such file or folder; give a video or a folder of images "
            "from the footage the model will run on"
        )
    if path.is_dir():
        images = tuple(
            sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        )
        if not images:
            raise QuantizeError(
                f"--calibrate {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "put frames of your footage in it or give a video"
            )
        return CalibrationSource(path, images)
    if path.stat().st_size == 0:
        raise QuantizeError(f"--calibrate {path}: the file is empty (0 bytes); give a video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise QuantizeError(f"--calibrate {path}: has no video stream; give a video file")
            next(container.decode(container.streams.video[0]))
    except (av.error.FFmpegError, StopIteration, UnicodeDecodeError):
        raise QuantizeError(
            f"--calibrate {path}: not a readable video (no frame decodes); give a video FFmpeg "
            "reads or a folder of images"
        ) from None
    return CalibrationSource(path)


def _evenly_spaced(total: int, count: int) -> list[int]:
    if total <= count:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def _video_frames_rgb_u8(path: Path, count: int) -> Iterable[np.ndarray]:
    import av

    from stages.decode import frame_to_rgb_u8

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = int(stream.frames) or sum(1 for p in container.demux(stream) if p.size > 0)
    wanted = set(_evenly_spaced(total, count))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:  # only the chosen frames are converted to RGB
                yield frame_to_rgb_u8(frame)
            if index >= max(wanted, default=-1):
                break


def _image_frames_rgb_u8(images: Sequence[Path], count: int) -> Iterable[np.ndarray]:
    from PIL import Image

    for index in _evenly_spaced(len(images), count):
        try:
            with Image.open(images[index]) as image:
                yield np.array(image.convert("RGB"))  # a writable copy, as torch wants
        except OSError as err:
            raise QuantizeError(
                f"--calibrate: {images[index]} is not a readable image ({err}); remove it"
            ) from None


def calibration_inputs(
    source: CalibrationSource, count: int, input_size_hw: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` frames of ``source`` (evenly spaced; all when it has fewer), as the model sees
    them.

    Returns:
        ``(image_u8, orig_size_wh)`` pairs: ``image_u8`` uint8 ``(1, 3, H, W)``, the pipeline's
        preprocessed input × 255 (exact: it is a resized uint8 picture; stored so, 64 frames at
        640 take 79 MB rather than 315), ``orig_size_wh`` int64 ``(1, 2)``.

    Raises:
        QuantizeError: ``count`` < 1, a non-square size, or no frame could be read.
    """
    import torch

    from stages.preprocess import image_to_model_input

    if count < 1:
        raise QuantizeError(f"--calibration-frames must be >= 1, got {count}")
    h, w = input_size_hw
    if h != w:
        raise QuantizeError(f"the model takes {h}x{w} images; only square inputs are supported")
    frames = (
        _video_frames_rgb_u8(source.path, count)
        if source.is_video
        else _image_frames_rgb_u8(source.images, count)
    )
    out = []
    for frame in frames:
        model_input = image_to_model_input(frame, h, torch.device("cpu"), resize_in_uint8=True)
        image_u8 = (model_input * 255.0).round_().to(torch.uint8).numpy()
        out.append((image_u8, np.array([[frame.shape[1], frame.shape[0]]], dtype=np.int64)))
    if not out:
        raise QuantizeError(f"--calibrate {source.path}: no frame could be read")
    return out


def _reader(inputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class FrameReader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds the frames one at a time; ``set_range`` lets ORT take them in chunks."""

        def __init__(self) -> None:
            self._start, self._end = 0, len(inputs)

        def __len__(self) -> int:
            return len(inputs)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._start, self._end = start_index, min(end_index, len(inputs))

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._start >= self._end:
                return None
            image_u8, size_wh = inputs[self._start]
            self._start += 1
            # The same float32 values image_to_model_input made: a uint8 level / 255.
            return {"images": image_u8.astype(np.float32) / 255.0, "orig_target_sizes": size_wh}

    return FrameReader()


def float_node_names(model: onnx.ModelProto, parts: Collection[FloatPart]) -> list[str]:
    """The names of ``model``'s nodes in ``parts`` (see :class:`FloatPart`), in graph order.

    ``GEOMETRY``: nodes fed, through any path, by ``orig_target_sizes`` and by no path from
    ``images``. ``TAIL``: nodes from which no ``Conv`` can be reached (the graph's nodes are in
    topological order, as ONNX requires).
    """
    nodes = list(model.graph.node)
    keep: set[str] = set()
    if FloatPart.GEOMETRY in parts:
        keep |= _descendants(nodes, "orig_target_sizes") - _descendants(nodes, "images")
    if FloatPart.TAIL in parts:
        consumers: dict[str, list[str]] = defaultdict(list)
        for node in nodes:
            for name in node.input:
                consumers[name].append(node.name)
        reaches_conv: dict[str, bool] = {}
        for node in reversed(nodes):
            reaches_conv[node.name] = node.op_type == "Conv" or any(
                reaches_conv.get(c, False) for out in node.output for c in consumers[out]
            )
        keep |= {name for name, reaches in reaches_conv.items() if not reaches}
    return [node.name for node in nodes if node.name in keep]


def _descendants(nodes: Sequence[onnx.NodeProto], tensor: str) -> set[str]:
    reached, tensors = set(), {tensor}
    for node in nodes:
        if any(name in tensors for name in node.input):
            reached.add(node.name)
            tensors.update(node.output)
    return reached


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run ORT's tools inside ``path``: its symbolic shape inference and external-data saving
    write scratch files (``sym_shape_infer_temp.onnx``, ``<uuid>.data``) into the current
    directory, which is the user's. (Process-wide: export runs before any thread starts.)"""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _pre_process(fp32_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path))
    except Exception as err:  # ORT's symbolic inference raises bare Exception/AssertionError
        # Symbolic shape inference stops on some ops (D-FINE's, the teacher's); ONNX's own
        # inference plus ORT's optimisation is all the quantiser needs for fixed input sizes.
        logger.info("symbolic shape inference incomplete (%s); using ONNX shape inference", err)
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)


class _PerTensorFallback(logging.Filter):
    """ORT warns (on the root logger) for every 1-D weight, e.g. a LayerNorm's, that per-channel
    quantisation falls back to one scale for it: expected here, so it is logged at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "is out-of-range for weight" in record.getMessage():
            logger.debug("%s (quantised per tensor)", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """While ORT quantises: its per-tensor fallback warnings at DEBUG, and its progress prints
    (histogram calibration writes to stdout, which belongs to the caller) into our log."""
    fallback = _PerTensorFallback()
    logging.getLogger().addFilter(fallback)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logging.getLogger().removeFilter(fallback)
        for line in printed.getvalue().splitlines():
            logger.debug("onnxruntime: %s", line)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    source: CalibrationSource,
    *,
    num_frames: int = DEFAULT_CALIBRATION_FRAMES,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    float_parts: Collection[FloatPart] = DEFAULT_FLOAT_PARTS,
    extra_float_nodes: Sequence[str] = (),
) -> Int8Export:
    """Quantise a deploy export to INT8 (QDQ), calibrated on frames of ``source``.

    Args:
        fp32_path: a deploy ``.onnx`` (inputs ``images``, ``orig_target_sizes``) with a fixed
            input size; ours, the official export, or the NanoDet teacher.
        out_path: the INT8 ``.onnx`` to write (usually :func:`int8_path` of ``fp32_path``).
        source: from :func:`check_calibration_source`.
        num_frames: calibration frames, evenly spaced over the source.
        method: how activation ranges are set.
        float_parts: parts kept in float (default: geometry and tail).
        extra_float_nodes: more node names to keep in float (names of the pre-processed graph;
            ``bench/int8.py`` uses this to measure other choices).

    Raises:
        QuantizeError: the file is already quantised, its input size is not fixed, or no
            calibration frame could be read.
        dfine.CheckpointError: the file is not a readable deploy export.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from dfine.model_info import read_model_info

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    info = read_model_info(fp32_path)  # CheckpointError for anything that is not an export
    original = onnx.load(str(fp32_path))
    if is_quantized(original):
        raise QuantizeError(f"{fp32_path} is already quantised; give the FP32 .onnx")
    if info.input_size_hw is None:
        raise QuantizeError(
            f"{fp32_path}: its input size is dynamic; export with a fixed --imgsz to quantise"
        )
    inputs = calibration_inputs(source, num_frames, info.input_size_hw)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ort_method = {
        CalibrationMethod.MINMAX: OrtMethod.MinMax,
        CalibrationMethod.ENTROPY: OrtMethod.Entropy,
        CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
    }[method]
    extra: dict[str, Any] = {}
    if method is not CalibrationMethod.MINMAX:
        # ORT feeds set_range chunks of this size; the chunk must divide the frame count.
        extra["CalibStridedMinMax"] = math.gcd(len(inputs), _HISTOGRAM_CHUNK)
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    with tempfile.TemporaryDirectory(prefix="finestream_int8_") as tmp, _working_dir(Path(tmp)):
        prepared_path = Path(tmp) / "prepared.onnx"
        _pre_process(fp32_path, prepared_path)
        prepared = onnx.load(str(prepared_path))
        excluded = float_node_names(prepared, float_parts)
        excluded += [n for n in extra_float_nodes if n not in set(excluded)]
        logger.info(
            "quantising %s: %d calibration frames, %s, %d of %d nodes kept in float",
            fp32_path.name,
            len(inputs),
            method.value,
            len(excluded),
            len(prepared.graph.node),
        )
        with _quiet_quantizer():
            quantize_static(
                str(prepared_path),
                str(out_path),
                _reader(inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # U8 activations and S8 weights: ORT's recommended pair on x86 CPUs.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=ort_method,
                extra_options=extra,
            )
        nodes = len(prepared.graph.node)

    quantized = onnx.load(str(out_path))
    metadata = {p.key: p.value for p in original.metadata_props}
    metadata[META_QUANTIZATION] = json.dumps(
        {
            "format": "QDQ",
            "weights": "int8 per channel",
            "activations": "uint8",
            "method": method.value,
            "calibration_frames": len(inputs),
            "calibration_source": source.path.name,
            "float_parts": [p.value for p in float_parts],
        }
    )
    del quantized.metadata_props[:]
    for key, value in metadata.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(out_path))
    logger.info("wrote %s (%d bytes)", out_path, out_path.stat().st_size)
    return Int8Export(out_path, len(inputs), method, tuple(float_parts), len(excluded), nodes)
