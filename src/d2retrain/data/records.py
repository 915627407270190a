"""Detection records from a filtered COCO file: image paths, boxes, classes and masks."""

import dataclasses
import logging
from pathlib import Path

from d2retrain.core.errors import AnnotationError, D2RetrainError, InputFileError
from d2retrain.data.fields import check_image_size
from d2retrain.data.geometry import box_problem, usable_segmentation
from d2retrain.data.instances import InstanceEntry, InstancesDocument, read_instances
from d2retrain.data.masks import resolve_image_path

logger = logging.getLogger(__name__)

__all__ = ["ImageRecord", "load_records"]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image and its non-crowd instances (class ids 1..N as in the filtered file).

    ``negative``: the file holds no annotation at all for the image (``keep_empty_images``
    writes such images): it trains as background. An image whose annotations are all crowd or
    unusable is not negative, since objects are there: it does not train.
    """

    image_id: int
    path: Path
    height: int
    width: int
    annotations: tuple[InstanceEntry, ...]
    negative: bool = False

    @property
    def trains(self) -> bool:
        """Whether training uses the image: it has instances, or it is a negative."""
        return bool(self.annotations) or self.negative


def load_records(
    annotations_json: str, image_dir: str, require_annotations: bool = True
) -> list[ImageRecord]:
    """Read a filtered COCO file into per-image records, checking every image exists.

    Args:
        annotations_json: The COCO file.
        image_dir: Folder the ``file_name`` values are relative to.
        require_annotations: Refuse an empty split.

    Returns:
        One record per image, in file order; crowd annotations are left out, and so are
        annotations with degenerate geometry (the rule of :mod:`d2retrain.data.geometry`, which
        the filter has applied already), with a count in the log.

    Raises:
        InputFileError: Images are missing (the first few are listed) or the file is unusable.
        AnnotationError: An image size or an RLE is malformed.
        D2RetrainError: The split holds no image.
    """
    document = read_instances(annotations_json)
    if require_annotations and not document.annotations:
        raise D2RetrainError(f"{annotations_json}: the training split is empty; check the filter's output")
    by_image = _usable_instances(document, annotations_json)
    annotated = {annotation.image_id for annotation in document.annotations}
    records = [
        ImageRecord(
            image.id,
            resolve_image_path(image_dir, image.file_name),
            image.height,
            image.width,
            tuple(by_image.get(image.id, ())),
            negative=image.id not in annotated,
        )
        for image in document.images
    ]
    missing = [str(record.path) for record in records if not record.path.is_file()]
    if missing:
        raise InputFileError(
            f"{len(missing)} of {len(records)} images of {annotations_json} are missing in {image_dir}, "
            f"e.g. {', '.join(missing[:3])}"
        )
    return records


def _usable_instances(document: InstancesDocument, source: str) -> dict[int, list[InstanceEntry]]:
    """Non-crowd annotations by image id, less those with degenerate geometry."""
    sizes = {}
    for image in document.images:
        check_image_size(image.height, image.width, where=f"{source}: image {image.id}")
        sizes[image.id] = (image.height, image.width)
    by_image: dict[int, list[InstanceEntry]] = {}
    dropped = 0
    for index, annotation in enumerate(document.annotations):
        if annotation.iscrowd or annotation.image_id not in sizes:
            continue
        size = sizes[annotation.image_id]
        if annotation.bbox is None:
            raise AnnotationError(
                f"{source}: annotations[{index}]: no bbox; a training file needs one per annotation"
            )
        try:
            usable = box_problem(annotation.bbox, *size) is None
            usable = usable and usable_segmentation(annotation.segmentation, *size)[0] is not None
        except AnnotationError as error:
            raise AnnotationError(f"{source}: annotations[{index}].segmentation: {error}") from None
        if usable:
            by_image.setdefault(annotation.image_id, []).append(annotation)
        else:
            dropped += 1
    if dropped:
        logger.warning(
            "%s: %d annotations with degenerate geometry left out (the rule is in "
            "d2retrain.data.geometry's docstring); the filter drops them, is this its output?",
            source,
            dropped,
        )
    return by_image
