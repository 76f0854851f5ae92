"""Turn a decoded frame into D-FINE's input tensor.

Input: ``FramePacket`` with ``image_rgb_u8`` (uint8 ``(H, W, 3)`` RGB, any size).
Output: the same packet with ``model_input`` set: a torch float32 ``(1, 3, S, S)`` tensor,
contiguous NCHW, RGB, values in [0, 1], on the configured device. The picture is stretched to
S×S (no letterbox, as D-FINE was trained), so boxes map back by scaling x by W/S and y by H/S;
the postprocessor takes the original size from ``packet.width``/``packet.height``.

What D-FINE expects (official ``tools/inference``): PIL ``resize((S, S))`` with bilinear
filtering, then ``ToTensor`` (÷255), no mean/std normalisation. PIL's bilinear *antialiases*
when it shrinks (its filter widens with the scale factor), so the torch equivalent is
``F.interpolate(mode="bilinear", antialias=True)``; ``antialias=False`` (and ``cv2.resize``
``INTER_LINEAR``) differ from PIL by up to 25/255 (960x540) and 51/255 (1920x1080) on edges.

Measured against PIL on first frames of the shared clips (S = 640, 2 CPU threads):

    path                                   mean |diff|   max |diff|   960x540   1920x1080
    uint8 interpolate, antialias (CPU)     0.000/255     1/255        2.0 ms    2.7 ms
    float interpolate, antialias, round    0.01-0.15/255 1/255        12 ms     20 ms
    float interpolate, no antialias        1.0/255       25/255       3.2 ms    16 ms
    cv2.resize INTER_LINEAR                0.9/255       25/255       2.2 ms    1.3 ms
    PIL resize (the reference itself)      -             -            5.0 ms    12 ms

So on CPU the resize runs in uint8 (torch's AVX kernel, same result as PIL, faster than cv2
with the antialiasing cv2 lacks); on CUDA, whose antialiased kernel takes floating point only,
it runs in float32 and is rounded to whole levels like PIL's uint8 output. Both are the same
torch function on the same (1, 3, H, W) tensor layout.

Thread: runs in the preprocessor stage's own thread. With CUDA, the tensor is made on that
thread's current stream.

Tiling (``model.tiling.enabled``, drone footage): the preprocessor, not the inference stage,
cuts the frame into crops (``stages.tiling.frame_crops``: the whole frame when ``full_frame``,
then the overlapping tiles) and makes ``model_input`` a ``stages.tiling.TiledInput``: one
``(B, 3, S, S)`` batch, each crop resized like a whole frame, with where each crop lies. Why
here: the crops are a resize of the picture like any other input, so the cost stays in this
stage's thread (off the inference thread, which is the bottleneck) and in its row of the stage
table, and the inference stage keeps one job — run the batch, map and merge what comes back.
With tiling off nothing changes: one ``(1, 3, S, S)`` tensor.

Live runs: the assembly gives the preprocessor to the inference stage instead of a thread of its
own (``InferenceStage(preprocessor=...)``), which calls ``process()`` only on the frames it takes
from its per-stream slots, so no frame is resized just to be dropped. ``stats()`` counts the
frames preprocessed, per stream, either way.

Ownership: ``model_input`` is a new tensor per packet (no reused buffers); the packet's image is
only read (crops are views of it, resized into new memory).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dfine.backends.device import Device, resolve_device
from pipeline.stage import StageBase
from stages.frame import FramePacket
from stages.tiling import TiledInput, TilingConfig, frame_crops

logger = logging.getLogger(__name__)


#: The app's one device enum (``dfine.backends.device``), under the name older callers use.
PreprocessDevice = Device


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of a ``Preprocessor``.

    Attributes:
        input_size: S, the side of D-FINE's square input (640 for the released models).
        device: where the tensor is made; the inference backend should use the same one.
        tiling: sliced inference (``model.tiling``); when enabled ``model_input`` is a
            ``TiledInput`` batch of crops.
    """

    input_size: int = 640
    device: Device = Device.AUTO
    tiling: TilingConfig = field(default_factory=TilingConfig)

    def __post_init__(self) -> None:
        if not 32 <= self.input_size <= 4096 or self.input_size % 32 != 0:
            raise ValueError(
                f"preprocess.input_size must be a multiple of 32 in [32, 4096], got {self.input_size}"
            )
        try:
            object.__setattr__(self, "device", Device(self.device))
        except ValueError:
            choices = ", ".join(d.value for d in Device)
            raise ValueError(
                f"preprocess.device must be one of {choices}, got {self.device!r}"
            ) from None


def image_to_model_input(
    image_rgb_u8: np.ndarray, size: int, device: torch.device, *, resize_in_uint8: bool
) -> torch.Tensor:
    """D-FINE's input for one picture.

    Args:
        image_rgb_u8: uint8 ``(H, W, 3)`` RGB.
        size: S, the square side.
        device: where to upload and resize.
        resize_in_uint8: resize the uint8 picture (CPU: exact PIL match, fastest) rather than a
            float32 copy rounded afterwards (CUDA, whose antialiased kernel is float-only).

    Returns:
        float32 ``(1, 3, S, S)`` contiguous NCHW RGB in [0, 1] on ``device``.
    """
    if image_rgb_u8.dtype != np.uint8 or image_rgb_u8.ndim != 3 or image_rgb_u8.shape[2] != 3:
        raise ValueError(
            f"image_rgb_u8 must be uint8 (H, W, 3), got {image_rgb_u8.dtype} {image_rgb_u8.shape}"
        )
    # torch.from_numpy refuses negative strides (e.g. a flipped view).
    image = np.ascontiguousarray(image_rgb_u8)
    # HWC memory seen as NCHW (channels-last strides): the layout torch's uint8 kernel is fast on.
    chw = torch.from_numpy(image).to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0)
    if resize_in_uint8:
        resized = F.interpolate(chw, size=(size, size), mode="bilinear", antialias=True)
        out = resized.float()
    else:
        resized = F.interpolate(chw.float(), size=(size, size), mode="bilinear", antialias=True)
        out = resized.round_().clamp_(0.0, 255.0)
    return out.div_(255.0).contiguous()


class Preprocessor(StageBase[FramePacket]):
    """Processor[FramePacket, FramePacket]: sets ``packet.model_input``."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.name = "preprocess"
        self._device: torch.device | None = None
        self._lock = threading.Lock()  # stats() reads the counts from another thread
        self._frames_by_stream: dict[str, int] = {}

    def stats(self) -> dict[str, int]:
        """Frames preprocessed: ``frames`` in all, ``frames[<stream id>]`` per stream."""
        with self._lock:
            by_stream = dict(self._frames_by_stream)
        return {"frames": sum(by_stream.values())} | {
            f"frames[{k}]": n for k, n in sorted(by_stream.items())
        }

    @property
    def device(self) -> torch.device:
        """The device tensors are made on (resolved in ``setup()``)."""
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    def setup(self) -> None:
        device = self.device
        if device.type == "cuda":
            # Make the CUDA context current in this (the stage's) thread before the first frame.
            torch.empty(1, device=device)
        side = self.config.input_size
        tiling = self.config.tiling
        tiles = ""
        if tiling.enabled:
            tile = tiling.tile_px or side
            tiles = (
                f", tiled: {tile} px tiles, overlap {tiling.overlap:g}"
                f"{' + the whole frame' if tiling.full_frame else ''}"
            )
        logger.info("preprocess on %s to %dx%d%s", device, side, side, tiles)

    def process(self, item: FramePacket) -> FramePacket:
        with self._lock:
            count = self._frames_by_stream.get(item.stream_id, 0)
            self._frames_by_stream[item.stream_id] = count + 1
        device = self.device
        side = self.config.input_size
        uint8 = device.type == "cpu"
        if not self.config.tiling.enabled:
            item.model_input = image_to_model_input(
                item.image_rgb_u8, side, device, resize_in_uint8=uint8
            )
            return item
        crops = frame_crops(item.width, item.height, self.config.tiling, side)
        image = item.image_rgb_u8
        images = torch.cat(
            [
                image_to_model_input(
                    image[c.y0 : c.y1, c.x0 : c.x1], side, device, resize_in_uint8=uint8
                )
                for c in crops
            ]
        )
        item.model_input = TiledInput(images=images, crops=tuple(crops))
        return item
