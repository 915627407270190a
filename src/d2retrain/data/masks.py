"""Copy a dataset's images and render per-image semantic and instance mask PNGs."""

import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from d2retrain.core.errors import AnnotationError, InputFileError, UnsafePathError
from d2retrain.core.fileio import link_or_copy, write_bytes_atomic
from d2retrain.data.fields import check_file_name, check_image_size
from d2retrain.data.geometry import usable_segmentation
from d2retrain.data.instances import ImageEntry, InstanceEntry, InstancesDocument, read_instances

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE",
    "CROWD_INSTANCE",
    "rasterize",
    "render_masks",
    "copy_images",
    "copy_images_and_masks",
    "resolve_image_path",
]

IGNORE = 255
CROWD_INSTANCE = 65535


def resolve_image_path(image_dir: str | os.PathLike[str], file_name: str) -> Path:
    """Return the path of an image, refusing names or links that leave ``image_dir``.

    Args:
        image_dir: The image folder.
        file_name: The image's ``file_name``.

    Returns:
        The path inside ``image_dir``.

    Raises:
        UnsafePathError: The name is absolute, climbs with ``..``, or is a link that
            points out of the folder.
    """
    check_file_name(file_name, where=f"image file_name {file_name!r}")
    root = Path(image_dir).resolve()
    path = Path(image_dir) / file_name
    if not path.resolve().is_relative_to(root):
        raise UnsafePathError(f"{path}: is a link pointing out of the image folder {image_dir}")
    return path


def rasterize(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list or RLE into a boolean mask with pycocotools.

    Degenerate polygons are left out by the rule of :mod:`d2retrain.data.geometry`, which the
    filter has applied already to the files the workflow renders.

    Args:
        segmentation: Polygons (lists of x, y) or an RLE dict (compressed or not).
        height: Image height.
        width: Image width.

    Returns:
        A ``(height, width)`` boolean array.

    Raises:
        AnnotationError: The geometry cannot be rasterised (degenerate by that rule, e.g. no
            polygon of 3 points, an RLE of another size) or is malformed.
    """
    usable, problem = usable_segmentation(segmentation, height, width)
    if usable is None:
        raise AnnotationError(f"{problem} (image {height}x{width})")
    if isinstance(usable, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(usable, height, width))
    elif isinstance(usable["counts"], str):
        rle = {"size": [height, width], "counts": usable["counts"].encode("ascii")}
    else:
        rle = mask_utils.frPyObjects(usable, height, width)
    return mask_utils.decode(rle).astype(bool)


def _render_one(image: ImageEntry, annotations: list[InstanceEntry], out_dir: Path) -> int:
    semantic = np.zeros((image.height, image.width), dtype=np.uint8)
    instances = np.zeros((image.height, image.width), dtype=np.uint16)
    crowd = np.zeros((image.height, image.width), dtype=bool)
    dropped = 0
    for number, annotation in enumerate(annotations, start=1):
        try:
            mask = rasterize(annotation.segmentation, image.height, image.width)
        except AnnotationError as error:
            logger.warning("image %s: annotation %d dropped (%s)", image.file_name, number, error)
            dropped += 1
            continue
        if annotation.iscrowd:
            crowd |= mask
            continue
        semantic[mask] = annotation.category_id
        instances[mask] = number
    free = crowd & (instances == 0)
    semantic[free] = IGNORE
    instances[free] = CROWD_INSTANCE
    stem = str(Path(image.file_name).with_suffix(""))
    for suffix, array in (("semantic", semantic), ("instances", instances)):
        ok, encoded = cv2.imencode(".png", array)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {image.file_name}")
        write_bytes_atomic(out_dir / f"{stem}_{suffix}.png", encoded.tobytes())
    return dropped


def render_masks(annotations_path: str, out_dir: str, threads: int = 1) -> int:
    """Write ``<stem>_semantic.png`` (uint8 class ids, 0 background, 255 crowd) and
    ``<stem>_instances.png`` (uint16 instance numbers, 65535 crowd) per image.

    Every check is made before the first file is written: an error leaves ``out_dir`` as
    it was.

    Args:
        annotations_path: A filtered COCO file (category ids are class ids 1..N).
        out_dir: Destination folder.
        threads: Worker threads.

    Returns:
        The number of annotations whose geometry could not be rasterised (none in a file
        the filter wrote).

    Raises:
        InputFileError: The file cannot be read.
        AnnotationError: The file is malformed, two images would write the same mask file,
            or a class id is outside 1..254 (run the filter first).
        UnsafePathError: An image ``file_name`` leaves the output folder.
    """
    return _render(read_instances(annotations_path), annotations_path, out_dir, threads)


def _render(document: InstancesDocument, source: str, out_dir: str, threads: int) -> int:
    by_image: dict[int, list[InstanceEntry]] = defaultdict(list)
    for annotation in document.annotations:
        by_image[annotation.image_id].append(annotation)
    _check_renderable(document, source)
    root = Path(out_dir)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        jobs = pool.map(lambda image: _render_one(image, by_image[image.id], root), document.images)
        dropped = sum(tqdm(jobs, total=len(document.images), desc="masks", unit="img", disable=None))
    logger.info(
        "masks: %d images rendered to %s, %d annotations dropped as unrasterisable",
        len(document.images),
        out_dir,
        dropped,
    )
    return dropped


def _check_renderable(document: InstancesDocument, source: str) -> None:
    """Refuse what would fail half-way through rendering, before anything is written."""
    per_image = Counter(annotation.image_id for annotation in document.annotations)
    stems: dict[str, int] = {}
    for image in document.images:
        where = f"{source}: image {image.id}"
        check_file_name(image.file_name, where=where)
        check_image_size(image.height, image.width, where=where)
        stem = str(Path(image.file_name).with_suffix(""))
        if stem in stems:
            raise AnnotationError(
                f"{where} ({image.file_name!r}) and image {stems[stem]} would write the same mask "
                f"files {stem}_*.png; rename one"
            )
        stems[stem] = image.id
        if per_image[image.id] >= CROWD_INSTANCE:
            raise AnnotationError(f"{where} has more than {CROWD_INSTANCE - 1} annotations")
    for index, annotation in enumerate(document.annotations):
        if not 1 <= annotation.category_id < IGNORE:
            raise AnnotationError(
                f"{source}: annotations[{index}].category_id is {annotation.category_id}, not a class "
                f"id 1..{IGNORE - 1}; render masks from the filter's output"
            )


def copy_images(annotations_path: str, image_dir: str, out_dir: str, threads: int = 1) -> None:
    """Hard-link (or copy, across file systems) the images a COCO file names.

    Args:
        annotations_path: The COCO file whose images to copy.
        image_dir: Folder the ``file_name`` values are relative to.
        out_dir: Destination folder.
        threads: Worker threads.

    Raises:
        InputFileError: An image is missing (the first few are listed).
        UnsafePathError: A name or link leaves the image folder.
    """
    _copy(read_instances(annotations_path).images, annotations_path, image_dir, out_dir, threads)


def _copy(images: list[ImageEntry], source: str, image_dir: str, out_dir: str, threads: int) -> None:
    sources = [resolve_image_path(image_dir, image.file_name) for image in images]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise InputFileError(
            f"{len(missing)} image(s) named in {source} are missing, e.g. {', '.join(missing[:3])}"
        )

    def link(pair: tuple[Path, str]) -> None:
        source, file_name = pair
        link_or_copy(source, Path(out_dir) / file_name)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        pairs = zip(sources, (image.file_name for image in images), strict=True)
        for _ in tqdm(pool.map(link, pairs), total=len(images), desc="images", unit="img", disable=None):
            pass
    logger.info("images: %d files linked or copied to %s", len(images), out_dir)


def copy_images_and_masks(
    annotations_path: str, image_dir: str, images_out: str, masks_out: str, threads: int = 1
) -> int:
    """Link a split's images and render its masks, parsing the COCO file once.

    Args:
        annotations_path: A filtered COCO file.
        image_dir: Folder the ``file_name`` values are relative to.
        images_out: Destination of the images.
        masks_out: Destination of the mask PNGs.
        threads: Worker threads.

    Returns:
        The number of annotations whose geometry could not be rasterised.

    Raises:
        D2RetrainError: An image is missing, a path is unsafe or the file is unusable.
    """
    document = read_instances(annotations_path)
    _check_renderable(document, annotations_path)
    _copy(document.images, annotations_path, image_dir, images_out, threads)
    return _render(document, annotations_path, masks_out, threads)
