"""Run D-FINE on each frame: preprocessed tensor in, detections in source pixels out.

Input: ``FramePacket`` with ``model_input`` set by the preprocessor (float32 ``(1, 3, S, S)``
torch tensor in [0, 1], on the CPU or a CUDA device), or with tiling on (``model.tiling``) a
``stages.tiling.TiledInput``: a ``(B, 3, S, S)`` batch of crops (tiles, and the whole frame when
``full_frame``) with where each lies. All crops of a frame go to the backend in one call (dynamic
batch); an export with a fixed batch runs them that many at a time, one after another (said at
start-up). Each crop's boxes come back in that crop's pixels, are shifted to the frame's, and
merged across crops (``stages.tiling.merge_crops``: NMS or greedy IOS, pieces cut by inner tile
borders dropped).
Output: the same packet with ``detections`` (boxes clipped to the frame, scores at or above the
threshold, optionally only some classes) and ``model_input`` cleared, so the tensor's memory is
freed as soon as possible.

Batches (several cameras, one stage): the runner may hand the stage a batch of packets from
different streams (``process_batch``, ``pipeline.batching``). Their ``(1, 3, S, S)`` inputs go to
the backend as one ``(B, 3, S, S)`` call and each packet gets its own detections back, in the
batch's order. The backend's own limit applies as for tiles: an export with a fixed batch (the
official batch-1 exports) runs the frames in turn, said at start-up. A tiled packet is a batch of
its own and runs alone.

Live runs drop before work: given a ``preprocessor`` the stage makes the model input itself, in
its thread, for each packet it takes that has none, so only frames that will be inferred are
converted and resized (``stages.live.LiveFramePacket``, ``stages.preprocess``).

Thread: the inference stage's own thread. The backend is made in ``setup()`` in that thread
(CUDA contexts and streams are per thread) by the factory given to the stage.

Ownership: the backend returns new host arrays per call (see ``DetectorBackend``); the
detections built from them belong to the packet. Nothing is reused across frames.

:func:`prepare_model` is the check phase for the model (main thread, before any stage starts):
it reads the file's facts once (``dfine.model_info.ModelInfo``: class names, input size, size),
checks them against the config and picks the backend (:func:`choose_backend`: with ``auto``, an
``.onnx`` runs in ONNX Runtime, an ``.engine`` in TensorRT, a ``.pth`` in torch FP16 on CUDA or,
on a CPU, in ONNX Runtime on an export made once and cached by content hash). :func:`make_backend`
then loads it, in the stage's thread. No model at all gives an untrained network (random
weights) for trying the pipeline out, with a loud warning.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfine.backends.base import BackendOutput, DetectorBackend
from dfine.backends.device import Device, resolve_device
from dfine.model_info import ModelInfo, ModelKind, model_kind, read_model_info
from pipeline.stage import StageBase
from stages.frame import Detections, FramePacket
from stages.preprocess import Preprocessor
from stages.tiling import CropResult, TiledInput, TilingConfig, merge_crops

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
# 2: the export has the edge_std output (a checkpoint gives edge_std_px in torch and here alike).
_EXPORT_VERSION = "2"


class Backend(str, enum.Enum):
    #: the fastest for the file here: .onnx → onnxruntime, .engine → tensorrt; a .pth (or no
    #: model) → torch FP16 on a CUDA GPU, else ONNX Runtime on a cached export.
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class InferConfig:
    """Settings of the inference stage (the ``model`` section of a config).

    Attributes:
        backend: which runtime; ``auto`` picks the fastest here (see ``Backend.AUTO``).
        model: a ``.pth`` checkpoint (official trainer layout, or ours), an ``.onnx`` deploy
            export or a TensorRT ``.engine``; ``None`` runs untrained random weights (demo only).
        size: D-FINE size ("n" ... "x"); ``None``: read from the checkpoint ("n" untrained).
            Given with a checkpoint, it must match the file.
        num_classes: ``None``: read from the model file (80 untrained). Given, it must match.
        imgsz: side S of the square model input; ``None``: the size an ``.onnx``/``.engine``
            is fixed to, else the side a checkpoint of ours was trained at, else 640. Given, it
            must match a fixed file.
        device: where the model runs (ONNX Runtime: picks the CUDA provider when "cuda"/"auto").
        fp16: torch on CUDA only: FP16 autocast (norms stay FP32); ``backend: auto`` turns it on
            for a checkpoint on CUDA. TensorRT engines carry their precision from the build.
        cuda_graphs: torch on CUDA only: replay captured CUDA graphs.
        score_threshold: detections scoring below it are dropped, in [0, 1].
        classes: keep only these class indices (0-based labels); ``None`` keeps all.
        intra_op_threads: CPU threads per operator (torch: process-wide ``set_num_threads``;
            ONNX Runtime: the session's own pool); ``None`` leaves the library default.
        onnx_cache_dir: where checkpoints exported for ONNX Runtime are cached; ``None`` means
            ``~/.cache/finestream/onnx``.
        opset: ONNX opset of such exports (>= 17).
        tiling: sliced inference for small objects (``stages.tiling.TilingConfig``); off by
            default. The preprocessor cuts the crops, this stage merges their detections.
    """

    backend: Backend = Backend.AUTO
    model: Path | None = None
    size: str | None = None
    num_classes: int | None = None
    imgsz: int | None = None
    device: Device = Device.AUTO
    fp16: bool = False
    cuda_graphs: bool = False
    score_threshold: float = 0.5
    classes: tuple[int, ...] | None = None
    intra_op_threads: int | None = None
    onnx_cache_dir: Path | None = None
    opset: int = 17
    tiling: TilingConfig = field(default_factory=TilingConfig)

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

        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"model.size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if self.imgsz is not None and (not 32 <= self.imgsz <= 4096 or self.imgsz % 32):
            raise ValueError(
                f"model.imgsz must be a multiple of 32 in [32, 4096], got {self.imgsz}"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"model.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.classes is not None:
            bound = self.num_classes if self.num_classes is not None else None
            bad = [c for c in self.classes if c < 0 or (bound is not None and c >= bound)]
            if bad or not self.classes:
                limit = f"[0, {bound - 1}]" if bound is not None else ">= 0"
                raise ValueError(
                    f"model.classes must be a non-empty list of class indices in {limit}, "
                    f"got {list(self.classes)}"
                )
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ValueError(f"model.intra_op_threads must be >= 1, got {self.intra_op_threads}")
        if self.opset < 17:
            raise ValueError(f"model.opset must be >= 17 (LayerNormalization), got {self.opset}")
        if (self.fp16 or self.cuda_graphs) and self.device is Device.CPU:
            raise ValueError("model.fp16 and model.cuda_graphs need a CUDA device, not 'cpu'")
        _check_backend_takes(self.backend, model_kind(self.model))


_KINDS_OF = {
    Backend.TORCH: (ModelKind.UNTRAINED, ModelKind.CHECKPOINT),
    Backend.ONNXRUNTIME: (ModelKind.UNTRAINED, ModelKind.CHECKPOINT, ModelKind.ONNX),
    Backend.TENSORRT: (ModelKind.ENGINE,),
}
_KIND_WORDS = {
    ModelKind.UNTRAINED: "no model (untrained weights)",
    ModelKind.CHECKPOINT: "a checkpoint",
    ModelKind.ONNX: "an ONNX file",
    ModelKind.ENGINE: "a TensorRT engine",
}


def _check_backend_takes(backend: Backend, kind: ModelKind) -> None:
    if backend is Backend.AUTO or kind in _KINDS_OF[backend]:
        return
    hint = {
        Backend.TORCH: "the torch backend needs a .pth checkpoint; use backend onnxruntime "
        "for .onnx or tensorrt for .engine",
        Backend.ONNXRUNTIME: "ONNX Runtime takes an .onnx file or a .pth checkpoint",
        Backend.TENSORRT: "TensorRT needs an engine: build one with `finestream export "
        "CHECKPOINT --tensorrt` (or the trtexec command it prints)",
    }[backend]
    raise ValueError(f"backend {backend.value} cannot run {_KIND_WORDS[kind]}: {hint}")


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a model here, and why (the CLI's start-up line).

    Attributes:
        backend: never ``AUTO``.
        fp16: torch FP16 autocast.
        reason: a short phrase, e.g. "a checkpoint on a CPU runs fastest in ONNX Runtime".
    """

    backend: Backend
    fp16: bool
    reason: str

    def describe(self) -> str:
        fp16 = " FP16" if self.fp16 and self.backend is Backend.TORCH else ""
        return f"backend {self.backend.value}{fp16} ({self.reason})"


def choose_backend(
    config: InferConfig, kind: ModelKind, *, cuda_available: bool | None = None
) -> BackendChoice:
    """The backend ``config.backend`` means for a model of ``kind`` on this machine.

    ``AUTO``: an ``.onnx`` runs in ONNX Runtime and an engine in TensorRT; a checkpoint (or
    no model) runs in torch with FP16 autocast on a CUDA GPU, and on a CPU through ONNX Runtime
    on an export made once and cached (1.4-2x torch's speed on a CPU, bench/RESULTS.md).

    Raises:
        ValueError: the backend cannot run that kind of file, or ``cuda`` without a GPU.
    """
    _check_backend_takes(config.backend, kind)
    if config.backend is not Backend.AUTO:
        return BackendChoice(config.backend, config.fp16, "as asked")
    if kind is ModelKind.ONNX:
        return BackendChoice(Backend.ONNXRUNTIME, False, "auto: an .onnx file runs in ONNX Runtime")
    if kind is ModelKind.ENGINE:
        return BackendChoice(Backend.TENSORRT, False, "auto: an engine runs in TensorRT")
    what = "a checkpoint" if kind is ModelKind.CHECKPOINT else "the untrained model"
    if resolve_device(config.device, cuda_available=cuda_available).type == "cuda":
        return BackendChoice(
            Backend.TORCH,
            True,
            f"auto: {what} on a CUDA GPU runs fastest in torch with FP16 autocast",
        )
    return BackendChoice(
        Backend.ONNXRUNTIME,
        False,
        f"auto: {what} on a CPU runs faster in ONNX Runtime than in torch (bench/RESULTS.md); "
        "exported once and cached; --backend torch forces torch",
    )


def resolve_backend(config: InferConfig, *, cuda_available: bool | None = None) -> Backend:
    """The backend ``config`` runs on here (:func:`choose_backend`, the kind from the suffix)."""
    return choose_backend(config, model_kind(config.model), cuda_available=cuda_available).backend


@dataclass(frozen=True)
class PreparedModel:
    """What the check phase learnt: the config with every ``None`` and ``auto`` settled, the
    model file's facts and the backend choice. ``make_backend(prepared.config, prepared.info)``
    loads it."""

    config: InferConfig
    info: ModelInfo
    choice: BackendChoice


def prepare_model(config: InferConfig, *, cuda_available: bool | None = None) -> PreparedModel:
    """Check the model file against ``config`` and settle what ``config`` leaves open, without
    building or loading the network (the check phase, in the main thread).

    Raises:
        dfine.CheckpointError: the file is missing, unreadable, truncated, not a D-FINE model,
            or of another size or class count than ``config`` asks.
        ValueError: the backend cannot run it, ``imgsz`` does not match the file, ``classes``
            names a class the model lacks, ``cuda`` without a GPU.
        TensorRTUnavailableError: an engine, and TensorRT is not installed.
    """
    from dfine.checkpoint import CheckpointError

    info = read_model_info(
        config.model, size=config.size or "n", num_classes=config.num_classes or 80
    )
    choice = choose_backend(config, info.kind, cuda_available=cuda_available)
    name = info.path.name if info.path is not None else "the model"
    if config.size is not None and info.size is not None and info.size != config.size:
        raise CheckpointError(
            f"{name} is D-FINE-{info.size.upper()} with {info.num_classes} classes, but model.size "
            f"is {config.size!r}; drop --size (the file says it) or give a D-FINE-{config.size.upper()} file"
        )
    if (
        config.num_classes is not None
        and info.kind is not ModelKind.UNTRAINED
        and (info.num_classes != config.num_classes)
    ):
        raise CheckpointError(
            f"{name} has {info.num_classes} classes, but model.num_classes is {config.num_classes}; "
            "drop num_classes (the file says it) or give the model it means"
        )
    if info.input_size_hw is not None:
        h, w = info.input_size_hw
        if h != w:
            raise ValueError(f"{name} takes {h}x{w} images; only square inputs are supported")
        if config.imgsz is not None and config.imgsz != h:
            raise ValueError(
                f"{name} takes {h}x{w} images but model.imgsz is {config.imgsz}; drop --imgsz "
                "(the size is read from the file)"
            )
        imgsz = h
    else:  # a checkpoint runs at the side it was trained at unless told otherwise
        imgsz = config.imgsz or info.trained_side or 640
    if config.classes is not None and max(config.classes) >= info.num_classes:
        raise ValueError(
            f"model.classes {list(config.classes)} names a class {name} lacks "
            f"(it has {info.num_classes}: 0..{info.num_classes - 1})"
        )
    if choice.backend is Backend.TORCH:
        resolve_device(config.device, cuda_available=cuda_available)  # cuda without a GPU
    if choice.backend is Backend.TENSORRT:
        if config.device is Device.CPU:
            raise ValueError("backend tensorrt runs on a CUDA GPU; model.device cannot be 'cpu'")
        from dfine.backends.tensorrt_backend import require_tensorrt

        require_tensorrt()  # TensorRTUnavailableError: said before anything starts
    if info.kind is ModelKind.UNTRAINED:
        _warn_untrained(info.size or "n")
    settled = dataclasses.replace(
        config,
        backend=choice.backend,
        size=info.size or config.size or "n",
        num_classes=info.num_classes,
        imgsz=imgsz,
        fp16=choice.fp16,
    )
    return PreparedModel(settled, info, choice)


def _ort_providers(device: Device) -> list[str] | None:
    if device is Device.CPU:
        return ["CPUExecutionProvider"]
    if device is Device.CUDA:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None  # the backend's default: CUDA when this onnxruntime has it, else CPU


def untrained_model(size: str, num_classes: int) -> torch.nn.Module:
    """D-FINE with random weights (seed ``RANDOM_SEED``), in eval mode. The loud warning is
    :func:`prepare_model`'s, said once per run in the check phase."""
    from dfine.checkpoint import build_and_load

    return build_and_load(size, num_classes, None, seed=RANDOM_SEED)


def _warn_untrained(size: str) -> None:
    logger.warning(
        "NO MODEL GIVEN: running D-FINE-%s with UNTRAINED random weights (seed %d); its boxes and "
        "labels are MEANINGLESS. Download a trained checkpoint from the D-FINE GitHub releases, "
        "e.g. %s, and pass it with --model.",
        size.upper(),
        RANDOM_SEED,
        OFFICIAL_CHECKPOINTS.format(size=size),
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_onnx_export(config: InferConfig, class_names: Sequence[str] | None = None) -> Path:
    """The ONNX export of ``config.model`` (a checkpoint, or ``None`` for untrained weights),
    made once and kept under ``config.onnx_cache_dir`` keyed by the checkpoint's content hash,
    size, class count, input size and opset. ``config`` must be settled (``prepare_model``).

    Raises:
        dfine.CheckpointError: the checkpoint is not one for ``size``/``num_classes``.
    """
    import dfine
    from dfine.checkpoint import build_and_load
    from dfine.export import export_onnx

    assert config.size is not None and config.num_classes is not None and config.imgsz is not None
    cache_dir = (config.onnx_cache_dir or DEFAULT_ONNX_CACHE).expanduser()
    source = "random" if config.model is None else _file_digest(config.model)
    key_text = "|".join(
        [
            _EXPORT_VERSION,
            source,
            config.size,
            str(config.num_classes),
            str(config.imgsz),
            str(config.opset),
            *(class_names or ()),
        ]
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
        model = build_and_load(config.size, config.num_classes, config.model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Export beside the final name and rename: a crash never leaves a half-written cache entry,
    # and two processes exporting at once each write their own file.
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.onnx")
    try:
        export_onnx(
            model,
            dfine.PostProcessor(num_classes=config.num_classes),
            partial,
            imgsz=config.imgsz,
            opset=config.opset,
            class_names=class_names,
            edge_std=True,
        )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("exported %s to %s (cached)", config.model or "untrained model", path)
    return path


def make_backend(config: InferConfig, info: ModelInfo | None = None) -> DetectorBackend:
    """The backend ``config`` asks for, loaded and ready; its class names are ``info``'s.

    Args:
        config: the inference settings; settled by :func:`prepare_model` here when ``info`` is
            not given.
        info: the model file's facts from the check phase (``PreparedModel.info``).

    Raises:
        dfine.CheckpointError: the model file is missing, unreadable or of another size/classes.
        ValueError: the backend cannot run that file, or the device is unavailable.
        TensorRTUnavailableError: TensorRT asked for but not installed.
    """
    if info is None:
        prepared = prepare_model(config)
        config, info = prepared.config, prepared.info
    backend = choose_backend(config, info.kind).backend
    assert config.size is not None and config.num_classes is not None and config.imgsz is not None
    imgsz_hw = (config.imgsz, config.imgsz)
    names = list(info.class_names)
    if backend is Backend.TORCH:
        import dfine
        from dfine.backends.torch_backend import TorchBackend
        from dfine.checkpoint import build_and_load

        if config.model is None:
            model = untrained_model(config.size, config.num_classes)
        else:
            model = build_and_load(config.size, config.num_classes, config.model)
        model.deploy()  # the fused inference form (dfine.fuse); weights are loaded by now
        return TorchBackend(
            model,
            dfine.PostProcessor(num_classes=config.num_classes),
            input_size_hw=imgsz_hw,
            device=resolve_device(config.device),
            fp16=config.fp16,
            cuda_graphs=config.cuda_graphs,
            class_names=names,
            intra_op_threads=config.intra_op_threads,
        )

    if backend is Backend.ONNXRUNTIME:
        from dfine.backends.onnx_backend import OnnxRuntimeBackend

        path = config.model
        if info.kind is not ModelKind.ONNX:
            path = cached_onnx_export(config, names)
        assert path is not None
        return OnnxRuntimeBackend(
            path,
            providers=_ort_providers(config.device),
            intra_op_threads=config.intra_op_threads,
            class_names=names,
            input_size_hw=imgsz_hw if info.input_size_hw is None else None,
        )

    from dfine.backends.tensorrt_backend import TensorRTBackend

    if config.device is Device.CPU:
        raise ValueError("backend tensorrt runs on a CUDA GPU; model.device cannot be 'cpu'")
    assert config.model is not None  # TensorRT takes engines only
    return TensorRTBackend(config.model, class_names=names)


class InferenceStage(StageBase[FramePacket]):
    """Processor[FramePacket, FramePacket]: sets ``packet.detections``, clears ``model_input``.

    Also a ``BatchProcessor``: ``process_batch`` runs several packets in one backend call.

    Args:
        config: threshold, class filter and input size (the rest is the factory's business).
        backend_factory: makes the backend; called once, in ``setup()``, in the stage thread.
        preprocessor: makes ``model_input`` here for packets that come without one (live
            runs: only the frames taken are preprocessed); set up in this stage's thread.
        max_batch: the most packets a batch brings (the ``batching`` config), for the start-up
            line that says when the model cannot take them in one call.
    """

    def __init__(
        self,
        config: InferConfig,
        backend_factory: Callable[[], DetectorBackend],
        *,
        preprocessor: Preprocessor | None = None,
        max_batch: int = 1,
    ) -> None:
        self.config = config
        self.name = "infer"
        self._factory = backend_factory
        self._backend: DetectorBackend | None = None
        self._batch = BatchLimit()
        self._preprocessor = preprocessor
        self._max_batch = max_batch
        self._lock = threading.Lock()  # stats() reads the counts from another thread
        self._frames_by_stream: dict[str, int] = {}
        self._preprocess_s = 0.0
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
        if self.config.imgsz is not None and tuple(backend.input_size_hw) != expected:
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
        self._batch = backend_batch_limit(backend)
        largest = self._batch.largest
        if self._preprocessor is not None:
            self._preprocessor.setup()
        if self._max_batch > 1 and largest is not None and largest < self._max_batch:
            # Said at start-up: a batch of cameras then costs several calls, not one.
            logger.warning(
                "batching: the model takes %s %d image%s per call, so a batch of up to %d "
                "frames runs %s (an export with a dynamic batch, e.g. `finestream export`, "
                "runs it in one call)",
                "exactly" if self._batch.fixed else "at most",
                largest,
                "" if largest == 1 else "s",
                self._max_batch,
                "one frame after another" if largest == 1 else f"{largest} at a time",
            )
        if self.config.tiling.enabled and largest is not None:
            # Said at start-up: the crops of a frame then cost several calls, not one.
            logger.warning(
                "tiling: the model takes %s %d image%s per call, so the tiles of a frame run %s "
                "(an export with a dynamic batch, e.g. `finestream export`, runs them in one call)",
                "exactly" if self._batch.fixed else "at most",
                largest,
                "" if largest == 1 else "s",
                "one after another" if largest == 1 else f"{largest} at a time",
            )
        logger.info(
            "inference on %s, %d classes, score >= %.2f%s",
            backend.device,
            len(backend.class_names),
            self.config.score_threshold,
            f", classes {list(self.config.classes)}" if self.config.classes else "",
        )

    def stats(self) -> dict[str, int | float]:
        """Frames inferred (``frames``, and ``frames[<stream id>]`` per stream); with a
        preprocessor here also the frames it preprocessed (``preprocessed``,
        ``preprocessed[<stream id>]``) and its CPU time per frame (``preprocess_cpu_ms``)."""
        with self._lock:
            by_stream = dict(self._frames_by_stream)
            preprocess_s = self._preprocess_s
        frames = sum(by_stream.values())
        out: dict[str, int | float] = {"frames": frames}
        out |= {f"frames[{k}]": n for k, n in sorted(by_stream.items())}
        if self._preprocessor is not None:
            done = self._preprocessor.stats()
            out |= {f"preprocessed{k.removeprefix('frames')}": n for k, n in done.items()}
            if done["frames"]:
                out["preprocess_cpu_ms"] = round(1000.0 * preprocess_s / done["frames"], 3)
        return out

    def process_batch(self, items: Sequence[FramePacket]) -> list[FramePacket]:
        """Detections for each packet, the plain ones in one backend call (see the module
        docstring); the packets come back in the order given."""
        for item in items:
            self._prepare(item)
        plain = [item for item in items if isinstance(item.model_input, torch.Tensor)]
        if len(plain) > 1:
            self._batched(plain)
        for item in items:
            if item.model_input is not None:  # tiled (a batch of its own), or a lone frame
                self.process(item)
        return list(items)

    def process(self, item: FramePacket) -> FramePacket:
        self._prepare(item)
        self._count(item)
        backend = self.backend
        images = item.model_input
        if isinstance(images, TiledInput):
            item.model_input = None
            item.detections = self._tiled(images, item.width, item.height)
            return item
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
        out = backend.detect(images, orig_wh)
        spread = None if out.edge_std_px is None else out.edge_std_px[0]
        item.detections = self._detections(
            out.labels[0], out.boxes_xyxy[0], out.scores[0], item.width, item.height, spread
        )
        return item

    def _prepare(self, item: FramePacket) -> None:
        """The model input for a packet that has none, when this stage preprocesses."""
        if item.model_input is not None or self._preprocessor is None:
            return
        start = time.process_time()
        self._preprocessor.process(item)
        took = time.process_time() - start
        with self._lock:
            self._preprocess_s += took

    def _count(self, item: FramePacket) -> None:
        with self._lock:
            count = self._frames_by_stream.get(item.stream_id, 0)
            self._frames_by_stream[item.stream_id] = count + 1

    def _batched(self, items: Sequence[FramePacket]) -> None:
        """One backend call (or the model's limit's worth of calls) for packets each holding a
        ``(1, 3, S, S)`` tensor; each packet gets its row's detections."""
        backend = self.backend
        images = torch.cat([item.model_input for item in items])
        if images.device != backend.device:
            images = images.to(backend.device)
        sizes_wh = torch.tensor([[item.width, item.height] for item in items], dtype=torch.int64)
        for item in items:
            item.model_input = None  # freed once the batch is done
            self._count(item)
        row = 0
        for out in _detect_in_batches(backend, images, sizes_wh, self._batch):
            for i in range(len(out.scores)):
                item, row = items[row], row + 1
                spread = None if out.edge_std_px is None else out.edge_std_px[i]
                item.detections = self._detections(
                    out.labels[i], out.boxes_xyxy[i], out.scores[i], item.width, item.height, spread
                )

    def _tiled(self, tiled: TiledInput, width: int, height: int) -> Detections:
        backend = self.backend
        images = tiled.images
        if images.device != backend.device:
            images = images.to(backend.device)
        sizes_wh = torch.tensor([[c.width, c.height] for c in tiled.crops], dtype=torch.int64)
        results: list[CropResult] = []
        for labels, boxes, scores in _run_in_batches(backend, images, sizes_wh, self._batch):
            for i in range(len(scores)):
                keep = self._keep(labels[i], scores[i])
                results.append((labels[i][keep], boxes[i][keep], scores[i][keep]))
        tiling = self.config.tiling
        labels, boxes, scores = merge_crops(
            results, tiled.crops, (width, height), tiling.merge, tiling.merge_threshold
        )
        return self._detections(labels, boxes, scores, width, height)

    def _keep(self, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        keep: np.ndarray = scores >= self.config.score_threshold
        if self._keep_classes is not None:
            keep &= np.isin(labels, self._keep_classes)
        return keep

    def _detections(
        self,
        labels: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        width: int,
        height: int,
        edge_std_px: np.ndarray | None = None,
    ) -> Detections:
        # edge_std_px is not clipped with the boxes: a spread says how sure the model is of
        # the edge, wherever it lies. Tiled frames carry none (the merge joins boxes).
        keep = self._keep(labels, scores)
        boxes_xyxy = boxes[keep].astype(np.float32, copy=True)
        # Clip to the frame: boxes may reach past the border (the model does not clip).
        np.clip(boxes_xyxy[:, 0::2], 0.0, float(width), out=boxes_xyxy[:, 0::2])
        np.clip(boxes_xyxy[:, 1::2], 0.0, float(height), out=boxes_xyxy[:, 1::2])
        return Detections(
            boxes_xyxy=boxes_xyxy,
            scores=scores[keep].astype(np.float32, copy=True),
            class_ids=labels[keep].astype(np.int64, copy=True),
            edge_std_px=None if edge_std_px is None else edge_std_px[keep].astype(np.float32),
        )


@dataclass(frozen=True)
class BatchLimit:
    """How many images one backend call takes: ``largest`` (``None``: any number); ``fixed``:
    exactly that many (a fixed-batch export), so a short batch is padded."""

    largest: int | None = None
    fixed: bool = False


def backend_batch_limit(backend: DetectorBackend) -> BatchLimit:
    """The batch a backend's model takes.

    Not part of ``DetectorBackend`` (torch takes any batch): a TensorRT engine says its range
    (``batch_range``); for ONNX Runtime the graph's ``images`` input says it (a number when
    fixed, a name when dynamic).
    """
    batch_range = getattr(backend, "batch_range", None)
    if batch_range is not None:
        low, high = int(batch_range[0]), int(batch_range[1])
        return BatchLimit(high, fixed=low == high)
    session = getattr(backend, "_session", None)
    if session is not None:
        for graph_input in session.get_inputs():
            if graph_input.name == "images":
                dim = graph_input.shape[0]
                if isinstance(dim, int) and dim > 0:
                    return BatchLimit(dim, fixed=True)
    return BatchLimit()


def _chunks(
    images: torch.Tensor, sizes_wh: torch.Tensor, limit: BatchLimit
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(images, sizes, n)`` per backend call for ``images`` ``(B, 3, S, S)``: all at once, or
    chunks of ``limit.largest`` (a fixed batch pads the last with copies of its last row; only
    the first ``n`` rows of a call's outputs are real)."""
    total = int(images.shape[0])
    max_batch = limit.largest
    if max_batch is None or (total <= max_batch and not (limit.fixed and total < max_batch)):
        yield images, sizes_wh, total
        return
    for start in range(0, total, max_batch):
        chunk, sizes = images[start : start + max_batch], sizes_wh[start : start + max_batch]
        n = int(chunk.shape[0])
        if limit.fixed and n < max_batch:
            pad = max_batch - n
            chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            sizes = torch.cat([sizes, sizes[-1:].expand(pad, 2)])
        yield chunk, sizes, n


def _run_in_batches(
    backend: DetectorBackend, images: torch.Tensor, sizes_wh: torch.Tensor, limit: BatchLimit
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``backend`` on ``images`` ``(B, 3, S, S)`` in as many calls as ``limit`` asks."""
    out = []
    for chunk, sizes, n in _chunks(images, sizes_wh, limit):
        labels, boxes, scores = backend(chunk, sizes)
        out.append((labels[:n], boxes[:n], scores[:n]))
    return out


def _detect_in_batches(
    backend: DetectorBackend, images: torch.Tensor, sizes_wh: torch.Tensor, limit: BatchLimit
) -> list[BackendOutput]:
    """``backend.detect`` on ``images`` ``(B, 3, S, S)`` in as many calls as ``limit`` asks;
    each output holds only its call's real rows."""
    out = []
    for chunk, sizes, n in _chunks(images, sizes_wh, limit):
        got = backend.detect(chunk, sizes)
        spread = None if got.edge_std_px is None else got.edge_std_px[:n]
        out.append(BackendOutput(got.labels[:n], got.boxes_xyxy[:n], got.scores[:n], spread))
    return out
