"""D-FINE through ONNX Runtime: runs a deploy export (ours or the official one).

The file must be a deploy export: inputs ``images`` float32 ``(B, 3, H, W)`` and
``orig_target_sizes`` int64 ``(B, 2)`` (width, height), outputs ``labels``, ``boxes`` (xyxy
pixels) and ``scores``, postprocessing inside the graph, and optionally ``edge_std`` (found by
name; ``detect`` returns it as ``edge_std_px``). Batch may be dynamic; H and W are read
from the graph. Inputs are handed to ONNX Runtime as host arrays, so ``device`` is the CPU even
with the CUDA execution provider (which copies them over itself).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dfine.backends.base import BackendOutput
from dfine.backends.class_names import resolve_class_names
from dfine.checkpoint import CheckpointError

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
#: The optional fourth output of ``finestream export --edge-std``: per-edge spreads in pixels.
EDGE_STD_OUTPUT = "edge_std"
#: metadata_props keys our exporter writes (dfine/export.py); other files may lack them.
META_CLASS_NAMES = "class_names"
META_NUM_CLASSES = "num_classes"

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


def default_providers() -> list[str]:
    """CUDA then CPU where ONNX Runtime was built with CUDA, else CPU only.

    The TensorRT execution provider is left out on purpose: it builds an engine on every start
    and ignores our FP32 constraints; use the TensorRT backend for TensorRT.
    """
    import onnxruntime as ort

    if _CUDA in ort.get_available_providers():
        return [_CUDA, _CPU]
    return [_CPU]


class OnnxRuntimeBackend:
    """A :class:`~dfine.backends.base.DetectorBackend` over an ONNX Runtime session.

    Args:
        path: a D-FINE deploy ``.onnx`` file.
        providers: ONNX Runtime execution providers in order of preference; ``None`` picks
            :func:`default_providers`.
        intra_op_threads: threads for one operator (the session's own pool, not global);
            ``None`` lets ONNX Runtime decide (one per core).
        class_names: names per label; ``None`` takes them from
            :func:`dfine.model_info.read_model_info` (the file's ``class_names`` metadata, else
            COCO when the model has 80 classes, else ``class_<i>``).
        input_size_hw: needed only when the graph leaves H and W dynamic.

    Raises:
        CheckpointError: the file is missing, not ONNX, or not a D-FINE deploy export.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        class_names: Sequence[str] | None = None,
        input_size_hw: tuple[int, int] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1 or None, got {intra_op_threads}")
        chosen = list(providers) if providers is not None else default_providers()
        available = ort.get_available_providers()
        missing = [p for p in chosen if p not in available]
        if missing or not chosen:
            raise ValueError(
                f"providers {chosen} not usable: {missing or 'empty list'}; "
                f"this onnxruntime offers {available}"
            )

        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        # Idle pool threads sleep instead of spinning: in a pipeline the decoder and encoder need
        # those cores between inferences (bench/RESULTS.md: spinning made the threaded pipeline
        # no faster than a sequential loop on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Errors only: the official exports make ORT warn about unused initializers on load.
        options.log_severity_level = 3
        self._session = _open_session(ort, self.path, options, chosen)
        self.providers: list[str] = self._session.get_providers()

        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if set(inputs) != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= set(outputs):
            raise CheckpointError(
                f"{self.path}: not a D-FINE deploy export (inputs {sorted(inputs)}, outputs "
                f"{outputs}; expected inputs {list(INPUT_NAMES)} and outputs "
                f"{list(OUTPUT_NAMES)}); export with `finestream export`"
            )
        #: whether the file has the ``edge_std`` output (``detect`` then returns it).
        self.provides_edge_std = EDGE_STD_OUTPUT in outputs
        self._run_names = [*OUTPUT_NAMES, EDGE_STD_OUTPUT] if self.provides_edge_std else None
        self.input_size_hw: tuple[int, int] = _input_size(
            self.path, inputs["images"].shape, input_size_hw
        )
        self.device = torch.device("cpu")

        if class_names is None:
            # One place reads class names from a model file (dfine.model_info).
            from dfine.model_info import read_model_info

            class_names = read_model_info(self.path).class_names
        num_classes = len(class_names)
        self.num_classes = num_classes
        self.class_names: list[str] = resolve_class_names(num_classes, class_names)
        logger.info(
            "ONNX Runtime: %s, input %dx%d, %d classes, providers %s%s",
            self.path.name,
            self.input_size_hw[0],
            self.input_size_hw[1],
            num_classes,
            self.providers,
            ", edge_std output" if self.provides_edge_std else "",
        )

    def __call__(
        self, images: torch.Tensor, orig_sizes_wh: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect objects; see :meth:`DetectorBackend.__call__` for the contract.

        Args:
            images: float32 ``(B, 3, H, W)`` in [0, 1]; on the CPU (a CUDA tensor is copied).
            orig_sizes_wh: int64 ``(B, 2)``, (width, height) of the original frames.

        Returns:
            ``labels`` int64 ``(B, K)``, ``boxes_xyxy`` float32 ``(B, K, 4)`` in original pixels,
            ``scores`` float32 ``(B, K)``: fresh arrays from ONNX Runtime, owned by the caller.
        """
        out = self._run(images, orig_sizes_wh, list(OUTPUT_NAMES))
        return out.labels, out.boxes_xyxy, out.scores

    def detect(self, images: torch.Tensor, orig_sizes_wh: torch.Tensor) -> BackendOutput:
        """``__call__``'s detections plus ``edge_std_px`` when the file has ``edge_std``."""
        return self._run(images, orig_sizes_wh, self._run_names or list(OUTPUT_NAMES))

    def _run(
        self, images: torch.Tensor, orig_sizes_wh: torch.Tensor, names: list[str]
    ) -> BackendOutput:
        check_inputs(images, orig_sizes_wh, self.input_size_hw)
        feed = {
            "images": images.detach().to("cpu", torch.float32).contiguous().numpy(),
            "orig_target_sizes": orig_sizes_wh.detach().to("cpu", torch.int64).contiguous().numpy(),
        }
        labels, boxes, scores, *rest = self._session.run(names, feed)
        return BackendOutput(
            labels=np.asarray(labels, dtype=np.int64),
            boxes_xyxy=np.asarray(boxes, dtype=np.float32),
            scores=np.asarray(scores, dtype=np.float32),
            edge_std_px=np.asarray(rest[0], dtype=np.float32) if rest else None,
        )


def check_inputs(
    images: torch.Tensor, orig_sizes_wh: torch.Tensor, input_size_hw: tuple[int, int]
) -> None:
    """Raise ``ValueError`` (expected vs actual) when inputs break the backend contract."""
    expected = (3, *input_size_hw)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got {tuple(images.shape)}"
        )
    if tuple(orig_sizes_wh.shape) != (images.shape[0], 2):
        raise ValueError(
            f"orig_sizes_wh must have shape ({images.shape[0]}, 2), got {tuple(orig_sizes_wh.shape)}"
        )


def _open_session(ort: Any, path: Path, options: Any, providers: list[str]) -> Any:
    errors = ort.capi.onnxruntime_pybind11_state
    load_errors = (
        errors.Fail,
        errors.InvalidArgument,
        errors.InvalidGraph,
        errors.InvalidProtobuf,
        errors.NoSuchFile,
        errors.NotImplemented,
        errors.RuntimeException,
    )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except load_errors as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: ONNX Runtime cannot load it ({first_line}); is it an ONNX file?"
        ) from err


def _input_size(
    path: Path, shape: Sequence[int | str | None], given: tuple[int, int] | None
) -> tuple[int, int]:
    if len(shape) != 4:
        raise CheckpointError(f"{path}: input 'images' has rank {len(shape)}, expected 4")
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if given is not None and tuple(given) != (h, w):
            raise ValueError(
                f"input_size_hw {tuple(given)} does not match the graph's fixed input {(h, w)}"
            )
        return (h, w)
    if given is None:
        raise ValueError(
            f"{path}: the graph leaves the image size dynamic ({h}x{w}); pass input_size_hw"
        )
    return (int(given[0]), int(given[1]))


def num_classes_from_model(model: onnx.ModelProto) -> int | None:
    """The class count of a deploy export, read from the shape of its final class scores.

    The postprocessor flattens the ``(B, Q, C)`` scores and takes a TopK over them; the last
    TopK whose input is (through Flatten/Reshape/Sigmoid) a rank-3 tensor gives ``C``.
    Returns ``None`` when no such pattern or no static ``C`` is found.
    """
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError) as err:
        logger.debug("shape inference failed (%s)", err)
    return _num_classes(model)


def _num_classes(model: onnx.ModelProto) -> int | None:
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    shapes: dict[str, list[int | None]] = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for node in reversed(graph.node):
        if node.op_type != "TopK":
            continue
        name = node.input[0]
        for _ in range(4):
            shape = shapes.get(name)
            if shape is not None and len(shape) == 3 and shape[2]:
                return shape[2]
            prev = producer.get(name)
            if prev is None or prev.op_type not in ("Flatten", "Reshape", "Sigmoid", "Cast"):
                break
            name = prev.input[0]
    return None
