"""Run D-FINE on each frame: preprocessed tensor in, detections in source pixels out.

Input: ``FramePacket`` with ``model_input`` set by the preprocessor (float32 ``(1, 3, S, S)``
torch tensor in [0, 1], on the CPU or a CUDA device).
Output: the same packet with ``detections`` (boxes clipped to the frame, scores at or above the
threshold, optionally only some classes) and ``model_input`` cleared, so the tensor's memory is
freed as soon as possible.

Thread: the inference stage's own thread. The backend is made in ``setup()`` in that thread
(CUDA contexts and streams are per thread) by the factory given to the stage.

Ownership: the backend returns new host arrays per call (see ``DetectorBackend``); the
detections built from them belong to the packet. Nothing is reused across frames.

:func:`make_backend` picks the backend from the config: a ``.pth`` checkpoint runs in torch (or,
with ``backend: onnxruntime``, is exported once to ONNX and cached by content hash), an
``.onnx`` file in ONNX Runtime, an ``.engine`` in TensorRT; no model at all gives an untrained
network (random weights) for trying the pipeline out, with a loud warning.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfine.backends.base import DetectorBackend
from pipeline.stage import StageBase
from stages.frame import Detections, FramePacket

logger = logging.getLogger(__name__)

#: D-FINE sizes; also the keys of ``dfine.SIZES`` (not imported here: it loads the network code).
SIZES = ("n", "s", "m", "l", "x")
DEFAULT_ONNX_CACHE = Path("~/.cache/finestream/onnx")
OFFICIAL_CHECKPOINTS = (
    "https://github.com/Peterande/storage/releases/download/dfinev1.0/dfine_{size}_coco.pth "
    "(model zoo: https://github.com/Peterande/D-FINE#model-zoo)"
)
RANDOM_SEED = 0
# Bump when the export changes in a way that makes older cached files stale.
_EXPORT_VERSION = "1"


class Backend(str, enum.Enum):
    AUTO = "auto"  # from the model file: .pth → torch, .onnx → onnxruntime, .engine → tensorrt
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Device(str, enum.Enum):
    AUTO = "auto"  # CUDA when available, else CPU
    CPU = "cpu"
    CUDA = "cuda"


_CHECKPOINT_SUFFIXES = (".pth", ".pt")
_ENGINE_SUFFIXES = (".engine", ".trt", ".plan")


@dataclass(frozen=True)
class InferConfig:
    """Settings of the inference stage (the ``model`` section of a config).

    Attributes:
        backend: which runtime; ``auto`` follows the model file's suffix.
        model: a ``.pth`` checkpoint (official trainer layout), an ``.onnx`` deploy export or a
            TensorRT ``.engine``; ``None`` runs untrained random weights (demo only).
        size: D-FINE size of a checkpoint or of the untrained model ("n" ... "x").
        num_classes: classes of a checkpoint or of the untrained model (ONNX files and engines
            carry their own; it still bounds ``classes``).
        imgsz: side S of the square model input (must match an ONNX file's or engine's input).
        device: where the model runs (ONNX Runtime: picks the CUDA provider when "cuda"/"auto").
        fp16: torch on CUDA only: FP16 autocast (norms stay FP32). TensorRT engines carry their
            precision from the build.
        cuda_graphs: torch on CUDA only: replay captured CUDA graphs.
        score_threshold: detections scoring below it are dropped, in [0, 1].
        classes: keep only these class indices (0-based labels); ``None`` keeps all.
        intra_op_threads: CPU threads per operator (torch: process-wide ``set_num_threads``;
            ONNX Runtime: the session's own pool); ``None`` leaves the library default.
        onnx_cache_dir: where checkpoints exported for ONNX Runtime are cached; ``None`` means
            ``~/.cache/finestream/onnx``.
        opset: ONNX opset of such exports (>= 17).
    """

    backend: Backend = Backend.AUTO
    model: Path | None = None
    size: str = "n"
    num_classes: int = 80
    imgsz: int = 640
    device: Device = Device.AUTO
    fp16: bool = False
    cuda_graphs: bool = False
    score_threshold: float = 0.5
    classes: tuple[int, ...] | None = None
    intra_op_threads: int | None = None
    onnx_cache_dir: Path | None = None
    opset: int = 17

    def __post_init__(self) -> None:
        # Accept plain strings from code and the CLI; the enums and Path are the stored forms.
        for name, kind in (("backend", Backend), ("device", Device)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(k.value for k in kind)
                raise ValueError(f"model.{name} must be one of {choices}, got {value!r}") from None
        for name in ("model", "onnx_cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value).expanduser())
        if self.classes is not None and not isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", tuple(self.classes))

        if self.size not in SIZES:
            raise ValueError(f"model.size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if not 32 <= self.imgsz <= 4096 or self.imgsz % 32:
            raise ValueError(f"model.imgsz must be a multiple of 32 in [32, 4096], got {self.imgsz}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"model.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < self.num_classes]
            if bad or not self.classes:
                raise ValueError(
                    f"model.classes must be a non-empty list of class indices in "
                    f"[0, {self.num_classes - 1}], got {list(self.classes)}"
                )
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ValueError(f"model.intra_op_threads must be >= 1, got {self.intra_op_threads}")
        if self.opset < 17:
            raise ValueError(f"model.opset must be >= 17 (LayerNormalization), got {self.opset}")
        if (self.fp16 or self.cuda_graphs) and self.device is Device.CPU:
            raise ValueError("model.fp16 and model.cuda_graphs need a CUDA device, not 'cpu'")
        resolve_backend(self)  # refuses a model file the chosen backend cannot run


def resolve_backend(config: InferConfig) -> Backend:
    """The backend ``config`` runs on: ``AUTO`` resolved from the model file's suffix.

    Raises:
        ValueError: the backend cannot run that kind of file (the message says what can).
    """
    path = config.model
    suffix = path.suffix.lower() if path is not None else None
    if suffix is None:
        kind = "no model (untrained weights)"
        auto = Backend.TORCH
    elif suffix in _CHECKPOINT_SUFFIXES:
        kind, auto = "a checkpoint", Backend.TORCH
    elif suffix == ".onnx":
        kind, auto = "an ONNX file", Backend.ONNXRUNTIME
    elif suffix in _ENGINE_SUFFIXES:
        kind, auto = "a TensorRT engine", Backend.TENSORRT
    else:
        raise ValueError(
            f"model.model {str(path)!r}: unknown file type {suffix!r}; give a .pth checkpoint, "
            "an .onnx export or a TensorRT .engine"
        )
    backend = auto if config.backend is Backend.AUTO else config.backend
    allowed = {
        Backend.TORCH: (None, *_CHECKPOINT_SUFFIXES),
        Backend.ONNXRUNTIME: (None, *_CHECKPOINT_SUFFIXES, ".onnx"),
        Backend.TENSORRT: _ENGINE_SUFFIXES,
    }[backend]
    if suffix not in allowed:
        hint = {
            Backend.TORCH: "the torch backend needs a .pth checkpoint; use backend onnxruntime "
            "for .onnx or tensorrt for .engine",
            Backend.ONNXRUNTIME: "ONNX Runtime takes an .onnx file or a .pth checkpoint",
            Backend.TENSORRT: "TensorRT needs an engine: build one with `finestream export "
            "CHECKPOINT --size S --tensorrt` (or the trtexec command it prints)",
        }[backend]
        raise ValueError(f"backend {backend.value} cannot run {kind}: {hint}")
    return backend


def _torch_device(device: Device) -> str:
    if device is Device.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device.value)


def _ort_providers(device: Device) -> list[str] | None:
    if device is Device.CPU:
        return ["CPUExecutionProvider"]
    if device is Device.CUDA:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None  # the backend's default: CUDA when this onnxruntime has it, else CPU


def untrained_model(size: str, num_classes: int) -> torch.nn.Module:
    """D-FINE with random weights (seed ``RANDOM_SEED``), in eval mode; logs a loud warning."""
    import dfine

    logger.warning(
        "NO MODEL GIVEN: running D-FINE-%s with UNTRAINED random weights (seed %d); its boxes and "
        "labels are MEANINGLESS. Download a trained checkpoint from the D-FINE GitHub releases, "
        "e.g. %s, and pass it with --model.",
        size.upper(),
        RANDOM_SEED,
        OFFICIAL_CHECKPOINTS.format(size=size),
    )
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = dfine.build_model(size, num_classes=num_classes)
    return model.eval()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_onnx_export(config: InferConfig) -> Path:
    """The ONNX export of ``config.model`` (a checkpoint, or ``None`` for untrained weights),
    made once and kept under ``config.onnx_cache_dir`` keyed by the checkpoint's content hash,
    size, class count, input size and opset.

    Raises:
        dfine.CheckpointError: the checkpoint is not one for ``size``/``num_classes``.
    """
    import dfine
    from dfine.export import export_onnx

    cache_dir = (config.onnx_cache_dir or DEFAULT_ONNX_CACHE).expanduser()
    source = "random" if config.model is None else _file_digest(config.model)
    key_text = "|".join(
        [_EXPORT_VERSION, source, config.size, str(config.num_classes), str(config.imgsz),
         str(config.opset)]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    stem = "untrained" if config.model is None else config.model.stem
    path = cache_dir / f"{stem}-{config.size}-{config.imgsz}-op{config.opset}-{key}.onnx"
    if path.is_file():
        logger.info("using cached ONNX export %s", path)
        return path

    if config.model is None:
        model = untrained_model(config.size, config.num_classes)
    else:
        model = dfine.build_model(config.size, num_classes=config.num_classes)
        dfine.load_checkpoint(model, config.model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Export beside the final name and rename: a crash never leaves a half-written cache entry,
    # and two processes exporting at once each write their own file.
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.onnx")
    try:
        export_onnx(
            model.eval(),
            dfine.PostProcessor(num_classes=config.num_classes),
            partial,
            imgsz=config.imgsz,
            opset=config.opset,
        )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("exported %s to %s (cached)", config.model or "untrained model", path)
    return path


def make_backend(config: InferConfig) -> DetectorBackend:
    """The backend ``config`` asks for, loaded and ready (see :func:`resolve_backend`).

    Raises:
        dfine.CheckpointError: the model file is missing, unreadable or of another size/classes.
        ValueError: the backend cannot run that file, or the device is unavailable.
        TensorRTUnavailableError: TensorRT asked for but not installed.
    """
    backend = resolve_backend(config)
    imgsz_hw = (config.imgsz, config.imgsz)
    if backend is Backend.TORCH:
        from dfine.backends.torch_backend import TorchBackend

        import dfine

        if config.model is None:
            model = untrained_model(config.size, config.num_classes)
        else:
            model = dfine.build_model(config.size, num_classes=config.num_classes)
            dfine.load_checkpoint(model, config.model)
            model.deploy()  # drop the decoder layers the output never reads
        return TorchBackend(
            model,
            dfine.PostProcessor(num_classes=config.num_classes),
            input_size_hw=imgsz_hw,
            device=_torch_device(config.device),
            fp16=config.fp16,
            cuda_graphs=config.cuda_graphs,
            intra_op_threads=config.intra_op_threads,
        )

    if backend is Backend.ONNXRUNTIME:
        from dfine.backends.onnx_backend import OnnxRuntimeBackend

        path = config.model
        if path is None or path.suffix.lower() in _CHECKPOINT_SUFFIXES:
            path = cached_onnx_export(config)
        return OnnxRuntimeBackend(
            path,
            providers=_ort_providers(config.device),
            intra_op_threads=config.intra_op_threads,
        )

    from dfine.backends.tensorrt_backend import TensorRTBackend

    if config.device is Device.CPU:
        raise ValueError("backend tensorrt runs on a CUDA GPU; model.device cannot be 'cpu'")
    assert config.model is not None  # resolve_backend refuses TensorRT without an engine
    return TensorRTBackend(config.model)


class InferenceStage(StageBase[FramePacket]):
    """Processor[FramePacket, FramePacket]: sets ``packet.detections``, clears ``model_input``.

    Args:
        config: threshold, class filter and input size (the rest is the factory's business).
        backend_factory: makes the backend; called once, in ``setup()``, in the stage thread.
    """

    def __init__(
        self, config: InferConfig, backend_factory: Callable[[], DetectorBackend]
    ) -> None:
        self.config = config
        self.name = "infer"
        self._factory = backend_factory
        self._backend: DetectorBackend | None = None
        self._keep_classes = (
            np.asarray(config.classes, dtype=np.int64) if config.classes is not None else None
        )

    @property
    def backend(self) -> DetectorBackend:
        """The backend made in ``setup()``."""
        if self._backend is None:
            raise RuntimeError("InferenceStage.setup() has not run: no backend yet")
        return self._backend

    def setup(self) -> None:
        backend = self._factory()
        expected = (self.config.imgsz, self.config.imgsz)
        if tuple(backend.input_size_hw) != expected:
            h, w = backend.input_size_hw
            raise ValueError(
                f"the model takes {h}x{w} images but model.imgsz is {self.config.imgsz}; "
                f"set imgsz to {h}" + (" (the model is not square)" if h != w else "")
            )
        if self.config.classes is not None and max(self.config.classes) >= len(backend.class_names):
            raise ValueError(
                f"model.classes {list(self.config.classes)} names a class the model does not have "
                f"(it has {len(backend.class_names)}: 0..{len(backend.class_names) - 1})"
            )
        self._backend = backend
        logger.info(
            "inference on %s, %d classes, score >= %.2f%s",
            backend.device,
            len(backend.class_names),
            self.config.score_threshold,
            f", classes {list(self.config.classes)}" if self.config.classes else "",
        )

    def process(self, item: FramePacket) -> FramePacket:
        backend = self.backend
        images = item.model_input
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"frame {item.stream_id}/{item.index}: model_input must be a torch tensor set by "
                f"the preprocessor, got {type(images).__name__}"
            )
        # Free the input tensor as soon as the backend is done with it.
        item.model_input = None
        if images.device != backend.device:
            images = images.to(backend.device)
        orig_wh = torch.tensor([[item.width, item.height]], dtype=torch.int64)
        labels, boxes, scores = backend(images, orig_wh)
        item.detections = self._detections(labels[0], boxes[0], scores[0], item.width, item.height)
        return item

    def _detections(
        self, labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, width: int, height: int
    ) -> Detections:
        keep = scores >= self.config.score_threshold
        if self._keep_classes is not None:
            keep &= np.isin(labels, self._keep_classes)
        boxes_xyxy = boxes[keep].astype(np.float32, copy=True)
        # Clip to the frame: boxes may reach past the border (the model does not clip).
        np.clip(boxes_xyxy[:, 0::2], 0.0, float(width), out=boxes_xyxy[:, 0::2])
        np.clip(boxes_xyxy[:, 1::2], 0.0, float(height), out=boxes_xyxy[:, 1::2])
        return Detections(
            boxes_xyxy=boxes_xyxy,
            scores=scores[keep].astype(np.float32, copy=True),
            class_ids=labels[keep].astype(np.int64, copy=True),
        )
