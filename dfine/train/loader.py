"""Samples to batches: the training dataset, the epoch sampler, the collate and the loader.

Determinism is the point of this module, because ``--resume`` must continue exactly and must not
depend on the number of workers:

- an epoch's sample order is a permutation drawn from ``(seed, epoch)`` only;
- a sample's augmentation draws from ``(seed, epoch, sample index)`` only (``augment.reseed``
  before each sample), whichever worker process runs it;
- the multi-scale size of a batch draws from ``(seed, epoch, the batch's image ids)``;
- ``make_loader`` builds a fresh DataLoader for each epoch with non-persistent workers, so the
  epoch set on the dataset reaches the workers (they get a copy of it when they start), and
  ``skip_batches=k`` starts the same epoch at batch ``k``: an interrupted epoch continues with
  the very batches it would have seen.

Images are read with Pillow (as the official loader: no EXIF rotation), augmented in uint8 and
converted to float32 ``[0, 1]`` at the end.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from PIL import Image

from dfine.train.augment import AugmentPolicy, build_transform, reseed
from dfine.train.datasets import DatasetError, Sample

logger = logging.getLogger(__name__)

# Stream tags keep the three kinds of draws of one (seed, epoch) independent of each other.
_ORDER_STREAM, _SAMPLE_STREAM, _SCALE_STREAM = 0, 1, 2


def _derived_seed(*entropy: int) -> int:
    """A 32-bit seed mixed from non-negative integers (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def read_rgb(path: Path) -> np.ndarray:
    """The picture at ``path`` as uint8 RGB ``(H, W, 3)``, pixels as stored (no EXIF rotation)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class DetectionDataset(torch.utils.data.Dataset):
    """Validated samples as model inputs, augmented by the official policy when ``augment``.

    ``dataset[i]`` is ``(image, target)``:

    - image: float32 ``(3, imgsz, imgsz)`` RGB in ``[0, 1]`` (plain resize, no letterbox, as the
      official ``Resize``);
    - target: ``labels`` int64 ``(n,)``, ``boxes`` float32 ``(n, 4)`` normalised cxcywh,
      ``image_id`` int64 ``()``, ``orig_size_wh`` int64 ``(2,)`` (source width, height).

    With ``augment``, epochs ``>= stop_epoch`` drop the photometric distortion, the zoom-out and
    the IoU crop (the official ``stop_epoch`` policy); ``stop_epoch=None`` never drops them.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        imgsz: int,
        augment: bool,
        seed: int = 0,
        stop_epoch: int | None = None,
    ) -> None:
        if imgsz < 32 or imgsz % 32:
            raise ValueError(
                f"imgsz={imgsz}: D-FINE needs a multiple of 32 pixels, e.g. 320 or 640"
            )
        if seed < 0:
            raise ValueError(f"seed={seed}: must be a non-negative integer")
        self.samples = tuple(samples)
        self.imgsz = imgsz
        self.augment = augment
        self.seed = seed
        self.stop_epoch = stop_epoch
        self.epoch = 0
        self._pipelines = {
            policy: build_transform(imgsz, policy)
            for policy in (
                (AugmentPolicy.FULL, AugmentPolicy.LATE) if augment else (AugmentPolicy.EVAL,)
            )
        }

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next samples belong to (their randomness and the stop_epoch policy)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        self.epoch = epoch

    @property
    def policy(self) -> AugmentPolicy:
        """The augmentation the current epoch gets."""
        if not self.augment:
            return AugmentPolicy.EVAL
        if self.stop_epoch is not None and self.epoch >= self.stop_epoch:
            return AugmentPolicy.LATE
        return AugmentPolicy.FULL

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.samples[i]
        image = read_rgb(sample.image_path)
        if image.shape[:2] != (sample.height, sample.width):
            raise DatasetError(
                f"{sample.image_path}: now {image.shape[1]}x{image.shape[0]}, validated as "
                f"{sample.width}x{sample.height}; the file changed during training, restart it"
            )
        pipeline = self._pipelines[self.policy]
        reseed(pipeline, _derived_seed(self.seed, self.epoch, _SAMPLE_STREAM, i))
        out = pipeline(image=image, bboxes=sample.boxes_xyxy, labels=sample.labels)
        size = float(self.imgsz)
        boxes_xyxy = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4) / size
        boxes_cxcywh = np.concatenate(
            [(boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2, boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]],
            axis=1,
        )
        # NumPy, not torch: torch's elementwise kernels use the intra-op thread pool, which in the
        # main process (workers=0) contends with the training step and was 20x slower here.
        picture = torch.from_numpy(
            np.ascontiguousarray(out["image"].transpose(2, 0, 1)).astype(np.float32)
            * np.float32(1.0 / 255.0)
        )
        target = {
            "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1)),
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes_cxcywh, dtype=np.float32)),
            "image_id": torch.tensor(sample.image_id, dtype=torch.int64),
            "orig_size_wh": torch.tensor([sample.width, sample.height], dtype=torch.int64),
        }
        return picture, target


def collate_batch(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack the images to float32 ``(B, 3, S, S)``; the targets stay a list of dicts."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def multiscale_sizes(imgsz: int) -> tuple[int, ...]:
    """The official multi-scale choices around ``imgsz``: multiples of 32 within +-25 %, plus
    ``imgsz`` three more times (for 640 exactly the official 480..800 list + [640] * 3)."""
    low = -(-3 * imgsz // 128) * 32  # ceil(0.75 * imgsz / 32) * 32
    high = 5 * imgsz // 128 * 32  # floor(1.25 * imgsz / 32) * 32
    others = [s for s in range(low, high + 1, 32) if s != imgsz]
    return (*others, imgsz, imgsz, imgsz)


class MultiScaleCollate:
    """:func:`collate_batch`, then one random size per batch (official ``BatchImageCollateFuncion``).

    The batch is resized with ``F.interpolate``'s default nearest mode as the official collate
    does; boxes are normalised, so they do not change. The size draws from
    ``(seed, epoch, image ids of the batch)``, the same in any worker.
    """

    def __init__(self, sizes: Sequence[int], seed: int, epoch: int) -> None:
        self.sizes = tuple(sizes)
        self.seed, self.epoch = seed, epoch

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        images, targets = collate_batch(batch)
        ids = [int(t["image_id"]) % (1 << 32) for t in targets]
        rng = np.random.default_rng(_derived_seed(self.seed, self.epoch, _SCALE_STREAM, *ids))
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        if size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size))
        return images, targets


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """The batches of one epoch: a permutation of ``range(num_samples)`` from ``(seed, epoch)``
    (or the plain order when not shuffling) cut into ``batch_size`` chunks, from batch
    ``skip_batches`` on."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        drop_last: bool,
        skip_batches: int = 0,
    ) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.drop_last, self.skip_batches = drop_last, skip_batches

    def batches_per_epoch(self) -> int:
        whole, rest = divmod(self.num_samples, self.batch_size)
        return whole if self.drop_last or rest == 0 else whole + 1

    def order(self) -> np.ndarray:
        """The epoch's sample indices, int64 ``(num_samples,)``."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = np.random.default_rng(_derived_seed(self.seed, self.epoch, _ORDER_STREAM))
        return rng.permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order().tolist()
        for b in range(self.skip_batches, self.batches_per_epoch()):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.skip_batches)


def _worker_init(worker_id: int) -> None:
    # Each worker is one process on one core: extra intra-op threads only contend with the
    # training step for the same cores. (Not cv2.setNumThreads: in a forked child whose parent
    # already ran OpenCV's thread pool it deadlocks.)
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the trainer finishes its step and saves, so the
    # workers must keep serving instead of dying under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: DetectionDataset,
    batch_size: int,
    workers: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    skip_batches: int = 0,
    drop_last: bool = True,
    multiscale: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader for one epoch of ``dataset``, starting at batch ``skip_batches``.

    Yields ``(images float32 (B, 3, S, S), targets list of B dicts)`` (see
    :class:`DetectionDataset`). ``multiscale`` resizes each batch to one of
    :func:`multiscale_sizes` while ``epoch < dataset.stop_epoch`` (as the official collate, which
    stops with the augmentation). The result is the same for any ``workers``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers}: must be >= 0 (0 loads in the main process)")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed}, epoch={epoch}: both must be >= 0")
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, shuffle, drop_last)
    if not 0 <= skip_batches <= sampler.batches_per_epoch():
        raise ValueError(
            f"skip_batches={skip_batches}: the epoch has {sampler.batches_per_epoch()} batches"
        )
    if drop_last and sampler.batches_per_epoch() == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(dataset)} samples, so drop_last leaves "
            "no batch; use a smaller batch"
        )
    sampler.skip_batches = skip_batches
    dataset.set_epoch(epoch)
    collate = collate_batch
    if multiscale and (dataset.stop_epoch is None or epoch < dataset.stop_epoch):
        collate = MultiScaleCollate(multiscale_sizes(dataset.imgsz), seed, epoch)
    logger.debug(
        "epoch %d: batches %d..%d of %d, %s, %d workers, %s",
        epoch,
        skip_batches,
        sampler.batches_per_epoch(),
        sampler.batches_per_epoch(),
        dataset.policy.value,
        workers,
        "multi-scale" if collate is not collate_batch else "one scale",
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )
