"""Training samples: a filtered COCO file's records as tensors, in a deterministic, resumable order."""

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

    Position ``p`` is image ``permutation(seed + epoch)[p % n]`` of epoch ``p // n``,
    flipped when a generator seeded by ``(seed, p)`` says so, then augmented (``train.augment``)
    with draws seeded by ``(seed, p)`` too.
    """

    def __init__(
        self, records: list[ImageRecord], seed: int, flip: bool, augment: TorchvisionAugment | None = None
    ) -> None:
        """Args:
        records: The training file's images (:func:`training_images` picks those that train).
        seed: Seed of the order, the flips and the augmentations.
        flip: Random horizontal flips.
        augment: ``train.augment`` (None: none).
        """
        self.records = training_images(records)
        self.seed = seed
        self.flip = flip
        self.augment = augment

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.records)

    def index_at(self, position: int) -> int:
        """Record index served at a global position."""
        epoch, offset = divmod(position, len(self.records))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.records))[offset])

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


def _xyxy(bbox: tuple[float, float, float, float] | None) -> list[float]:
    assert bbox is not None  # load_records keeps annotations with a box only
    x, y, w, h = bbox
    return [x, y, x + w, y + h]
