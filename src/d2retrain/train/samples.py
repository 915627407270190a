"""Training samples: a filtered COCO file's records as tensors, in a deterministic, resumable order."""

import bisect
import functools
import logging

import numpy as np
import torch

from d2retrain.core.errors import D2RetrainError
from d2retrain.data.images import read_image
from d2retrain.data.masks import rasterize
from d2retrain.data.records import ImageRecord
from d2retrain.train.augment import TorchvisionAugment

logger = logging.getLogger(__name__)

__all__ = ["TrainSamples", "training_images"]


def training_images(records: list[ImageRecord]) -> list[ImageRecord]:
    """The images both engines train on: those with instances and the negatives (images the file
    gives without any annotation, kept by ``keep_empty_images``: background only), counted in the log.

    Raises:
        D2RetrainError: None has an instance.
    """
    kept = [record for record in records if record.trains]
    negatives = sum(1 for record in kept if not record.annotations)
    if negatives == len(kept):
        raise D2RetrainError("no training image has an instance; check the filter's output")
    logger.info(
        "training on %d images: %d with instances, %d images without annotations (negatives)%s",
        len(kept),
        len(kept) - negatives,
        negatives,
        f"; {len(records) - len(kept)} with only crowd or unusable annotations left out"
        if len(kept) < len(records)
        else "",
    )
    return kept


class TrainSamples(torch.utils.data.Dataset):
    """Training samples addressed by global sample position, for a deterministic, resumable order.

    Epoch ``e`` is a permutation, drawn by a generator seeded by ``(seed, e)``, of the records, each
    once, or, with repeat factors, each ``floor(r)`` times plus once more with probability
    ``r - floor(r)`` (detectron2's stochastic rounding, drawn per epoch by the same generator).
    Position ``p`` is the sample at that place in the epochs laid end to end; it is flipped when a
    generator seeded by ``(seed, p)`` says so, then augmented (``train.augment``) with draws seeded
    by ``(seed, p)`` too. So iteration ``i`` reads the same images whatever the process count and
    after a resume. With ``group``, each epoch's order is grouped by orientation as detectron2's
    ``AspectRatioGroupedDataset`` groups it: landscape and portrait images fill batches of their
    own (a batch is padded to its largest image: a mixed pair pays for the width of one and the
    height of the other).
    """

    def __init__(
        self,
        records: list[ImageRecord],
        seed: int,
        flip: bool,
        augment: TorchvisionAugment | None = None,
        repeat: dict[int, float] | None = None,
        group: int = 0,
    ) -> None:
        """Args:
        records: The training file's images (:func:`training_images` picks those that train).
        seed: Seed of the order, the flips and the augmentations.
        flip: Random horizontal flips.
        augment: ``train.augment`` (None: none).
        repeat: Repeat factor by image id (``balance: repeat``); None: each image once per epoch.
        group: Images per batch to group by orientation (0 or 1: no grouping).
        """
        self.records = training_images(records)
        self.group = group
        self.landscape = np.array([record.width > record.height for record in self.records], bool)
        self.seed = seed
        self.flip = flip
        self.augment = augment
        self.repeat = None
        if repeat is not None:
            self.repeat = np.array([repeat.get(record.image_id, 1.0) for record in self.records])
            logger.info(
                "repeat factors: %.1f samples per epoch of %d images (largest factor %.2f)",
                self.repeat.sum(),
                len(self.records),
                self.repeat.max(),
            )
        self._ends: list[int] = []  # cumulative epoch lengths, computed as far as needed

    def __len__(self) -> int:
        """Images of the training set."""
        return len(self.records)

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a few epochs per dataset object, dropped with it)
    def epoch(self, number: int) -> np.ndarray:
        """Record indices of one epoch, in order."""
        rng = np.random.default_rng([self.seed, number])
        if self.repeat is None:
            order = rng.permutation(len(self.records))
        else:
            whole = np.floor(self.repeat)
            counts = (whole + (rng.random(len(self.repeat)) < self.repeat - whole)).astype(np.int64)
            indices = np.repeat(np.arange(len(self.records)), counts)
            order = indices[rng.permutation(len(indices))]
        return _grouped(order, self.landscape, self.group) if self.group > 1 else order

    def index_at(self, position: int) -> int:
        """Record index served at a global position."""
        if self.repeat is None:
            epoch, offset = divmod(position, len(self.records))
            return int(self.epoch(epoch)[offset])
        while not self._ends or self._ends[-1] <= position:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self.epoch(len(self._ends))))
        epoch = bisect.bisect_right(self._ends, position)
        return int(self.epoch(epoch)[position - (self._ends[epoch - 1] if epoch else 0)])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image (RGB float CHW in 0..1) and target (boxes xyxy, labels, uint8 masks; none for a
        negative)."""
        record = self.records[self.index_at(position)]
        image = read_image(record.path)[:, :, ::-1]
        masks = np.zeros((len(record.annotations), record.height, record.width), np.uint8)
        for index, annotation in enumerate(record.annotations):
            masks[index] = rasterize(annotation.segmentation, record.height, record.width)
        boxes = np.array([_xyxy(a.bbox) for a in record.annotations], np.float32).reshape(-1, 4)
        if self.flip and np.random.default_rng([self.seed, position, 1]).random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack(
                [record.width - boxes[:, 2], boxes[:, 1], record.width - boxes[:, 0], boxes[:, 3]], 1
            )
        keep = (boxes[:, 2] > boxes[:, 0] + 0.5) & (boxes[:, 3] > boxes[:, 1] + 0.5)
        labels = torch.tensor([a.category_id for a in record.annotations], dtype=torch.int64)
        if self.augment is not None and self.augment.pipeline is not None:
            picture, target = self.augment(
                image, boxes[keep], masks[keep], labels[keep], key=[self.seed, position, 2]
            )
            return picture.float().div_(255), target
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes[keep])),
            "labels": labels[keep],
            "masks": torch.from_numpy(np.ascontiguousarray(masks[keep])).to(torch.uint8),
        }
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        return tensor, target


def _grouped(order: np.ndarray, landscape: np.ndarray, size: int) -> np.ndarray:
    """``order`` as detectron2's ``AspectRatioGroupedDataset`` batches it: each image joins the
    bucket of its orientation, and a bucket that holds ``size`` images goes out as one batch; the
    epoch's leftovers end it."""
    buckets: dict[bool, list[int]] = {True: [], False: []}
    grouped: list[int] = []
    for index in order.tolist():
        bucket = buckets[bool(landscape[index])]
        bucket.append(index)
        if len(bucket) == size:
            grouped += bucket
            bucket.clear()
    return np.array(grouped + buckets[True] + buckets[False], dtype=order.dtype)


def _xyxy(bbox: tuple[float, float, float, float] | None) -> list[float]:
    assert bbox is not None  # load_records keeps annotations with a box only
    x, y, w, h = bbox
    return [x, y, x + w, y + h]
