"""D-FINE through a TensorRT 10 engine, on a CUDA stream owned by the backend.

Made by :func:`dfine.backends.tensorrt_build.build_engine` (or ``trtexec``) from a deploy ONNX
export: inputs ``images`` float32 ``(B, 3, H, W)`` and ``orig_target_sizes`` int64 ``(B, 2)``,
outputs ``labels``/``boxes``/``scores`` and, from an ``--edge-std`` export, ``edge_std`` (found
by name; ``detect`` returns it as ``edge_std_px``). Device buffers are torch CUDA tensors allocated once for
the engine's largest batch; inputs already on the GPU are bound in place (no host round trip).
The outputs handed back are copied to new host arrays, so the next call cannot overwrite them.

TensorRT is imported lazily; ``import tensorrt`` can succeed without TensorRT when only the
type stubs (``tensorrt-stubs``) are installed, so :func:`require_tensorrt` checks for the real
compiled package.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dfine.backends.base import BackendOutput
from dfine.backends.class_names import resolve_class_names
from dfine.backends.onnx_backend import EDGE_STD_OUTPUT, INPUT_NAMES, OUTPUT_NAMES, check_inputs
from dfine.checkpoint import CheckpointError

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (the real package, not its stubs) or a CUDA GPU is missing."""


def tensorrt_available() -> bool:
    """Whether the real TensorRT Python package is importable (type stubs alone do not count)."""
    try:
        import tensorrt
    except ImportError:
        return False
    # The stubs install a namespace package of .pyi files: no __file__, no Builder.
    return getattr(tensorrt, "__file__", None) is not None and hasattr(tensorrt, "Builder")


def require_tensorrt() -> None:
    """Raise :class:`TensorRTUnavailableError` unless the real TensorRT package is installed."""
    if not tensorrt_available():
        raise TensorRTUnavailableError(
            "TensorRT is not installed (at most its type stubs are); on a machine with an NVIDIA "
            "GPU install it with `pip install 'finestream[tensorrt]'` (tensorrt>=10,<11)"
        )


def sidecar_path(engine_path: str | Path) -> Path:
    """Where :func:`build_engine` records class names and build settings beside an engine."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


@functools.cache
def trt_logger() -> trt.ILogger:
    """One TensorRT logger per process (TensorRT warns when builders get different ones),
    forwarding to :mod:`logging` under this module's logger."""
    import tensorrt as trt

    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.INFO,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _ToLogging(trt.ILogger):
        def __init__(self) -> None:
            # pybind11 trampolines need the base initialiser called explicitly.
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            logger.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return _ToLogging()


def dims_list(dims: trt.Dims) -> list[int]:
    """A ``Dims`` as a list (``list(dims)`` works at run time but the stubs do not say so)."""
    return [dims[i] for i in range(len(dims))]


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise ValueError(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTBackend:
    """A :class:`~dfine.backends.base.DetectorBackend` over a serialized TensorRT engine.

    Create it in the thread that will call it (CUDA work is per thread and stream).

    Args:
        engine_path: a ``.engine`` file built for this GPU and TensorRT version.
        device_index: which CUDA device runs it.
        class_names: names per label; ``None`` reads the sidecar ``<engine>.json`` written by
            :func:`~dfine.backends.tensorrt_build.build_engine`, else COCO (80 classes).

    Raises:
        TensorRTUnavailableError: no TensorRT or no CUDA device.
        CheckpointError: the file is missing, not an engine for this TensorRT/GPU, or not a
            D-FINE deploy engine.
    """

    def __init__(
        self,
        engine_path: str | Path,
        *,
        device_index: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        require_tensorrt()
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise TensorRTUnavailableError("TensorRT needs a CUDA GPU and torch sees none")
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such TensorRT engine file")
        self.device = torch.device("cuda", device_index)

        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(trt_logger())
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise CheckpointError(
                    f"{self.path}: TensorRT cannot load it (not an engine, or built with another "
                    "TensorRT version or GPU); rebuild it on this machine"
                )
            self._engine: trt.ICudaEngine = engine
            self._context: trt.IExecutionContext = engine.create_execution_context()
            # Our own stream: TensorRT work does not queue behind (or block) the default stream.
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if set(inputs) != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= set(outputs):
            raise CheckpointError(
                f"{self.path}: not a D-FINE deploy engine (inputs {inputs}, outputs {outputs}; "
                f"expected inputs {list(INPUT_NAMES)} and outputs {list(OUTPUT_NAMES)})"
            )
        self._output_names = outputs
        #: whether the engine has the ``edge_std`` output (``detect`` then returns it).
        self.provides_edge_std = EDGE_STD_OUTPUT in outputs

        image_shape = dims_list(engine.get_tensor_shape("images"))
        if len(image_shape) != 4 or image_shape[2] < 1 or image_shape[3] < 1:
            raise CheckpointError(
                f"{self.path}: input 'images' has shape {image_shape}; expected (B, 3, H, W) with "
                "a fixed H and W"
            )
        self.input_size_hw: tuple[int, int] = (image_shape[2], image_shape[3])
        if image_shape[0] == -1:
            # Profile 0 is the one build_engine makes: (min, opt, max) shapes per input.
            min_shape, _, max_shape = engine.get_tensor_profile_shape("images", 0)
            self.batch_range: tuple[int, int] = (min_shape[0], max_shape[0])
        else:
            self.batch_range = (image_shape[0], image_shape[0])

        # One buffer per output, sized for the largest batch; a call uses the first B rows.
        # Inputs need none: the caller's device tensors are bound in place.
        max_batch = self.batch_range[1]
        for name in inputs:
            shape = dims_list(engine.get_tensor_shape(name))
            shape[0] = max_batch
            self._context.set_input_shape(name, trt.Dims(shape))
        self._buffers: dict[str, torch.Tensor] = {}
        for name in outputs:
            shape = dims_list(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CheckpointError(
                    f"{self.path}: output {name!r} has a data-dependent shape {shape}; "
                    "not supported"
                )
            self._buffers[name] = torch.empty(
                shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device=self.device
            )

        if class_names is None:
            # One place reads class names from a model file (dfine.model_info): the sidecar,
            # else the ONNX the engine was built from.
            from dfine.model_info import read_model_info

            class_names = read_model_info(self.path).class_names
        num_classes = len(class_names)
        self.class_names: list[str] = resolve_class_names(num_classes, class_names)
        logger.info(
            "TensorRT: %s, input %dx%d, batch %d..%d, %d classes",
            self.path.name,
            *self.input_size_hw,
            *self.batch_range,
            num_classes,
        )

    def __call__(
        self, images: torch.Tensor, orig_sizes_wh: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect objects; see :meth:`DetectorBackend.__call__` for the contract.

        Args:
            images: float32 ``(B, 3, H, W)`` in [0, 1], on ``self.device`` (a CPU tensor is
                copied over). Work queued on the caller's current stream is waited for.
            orig_sizes_wh: int64 ``(B, 2)`` (width, height), on the CPU or the GPU.

        Returns:
            ``labels`` int64 ``(B, K)``, ``boxes_xyxy`` float32 ``(B, K, 4)``, ``scores`` float32
            ``(B, K)``: new host arrays; the device buffers stay private to the backend.
        """
        out = self.detect(images, orig_sizes_wh)
        return out.labels, out.boxes_xyxy, out.scores

    def detect(self, images: torch.Tensor, orig_sizes_wh: torch.Tensor) -> BackendOutput:
        """``__call__``'s detections plus ``edge_std_px`` when the engine has ``edge_std``."""
        check_inputs(images, orig_sizes_wh, self.input_size_hw)
        batch = int(images.shape[0])
        low, high = self.batch_range
        if not low <= batch <= high:
            raise ValueError(f"batch size {batch} is outside the engine's range {low}..{high}")

        images = images.to(self.device, torch.float32).contiguous()
        sizes = orig_sizes_wh.to(self.device, torch.int64).contiguous()
        stream = self._stream
        # The inputs may still be being written on the caller's stream.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Bind the caller's tensors directly: they outlive the synchronize below.
            bound = {"images": images, "orig_target_sizes": sizes}
            for name, tensor in bound.items():
                self._context.set_input_shape(name, tuple(tensor.shape))
                self._context.set_tensor_address(name, tensor.data_ptr())
            outputs: dict[str, torch.Tensor] = {}
            for name in self._output_names:
                shape = dims_list(self._context.get_tensor_shape(name))
                buffer = self._buffers[name]
                # A leading slice of a contiguous buffer is contiguous and starts at its base,
                # so the same address serves every batch size.
                outputs[name] = buffer[: shape[0]].view(shape)
                self._context.set_tensor_address(name, buffer.data_ptr())
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path.name} (see the log)")
            wanted = (*OUTPUT_NAMES, EDGE_STD_OUTPUT) if self.provides_edge_std else OUTPUT_NAMES
            host = {name: outputs[name].to("cpu") for name in wanted}
        stream.synchronize()
        edge_std = host.get(EDGE_STD_OUTPUT)
        return BackendOutput(
            labels=host["labels"].numpy().astype(np.int64, copy=False),
            boxes_xyxy=host["boxes"].numpy().astype(np.float32, copy=False),
            scores=host["scores"].numpy().astype(np.float32, copy=False),
            edge_std_px=None
            if edge_std is None
            else edge_std.float().numpy().astype(np.float32, copy=False),
        )
