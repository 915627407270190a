"""Images and instance geometry of a COCO file, read once for the mask renderer and the training reader.

One set of record structs and one mapping of read errors to the workflow's errors, where each reader
had its own before. Only the keys these readers use are decoded; the rest of each record is skipped.
"""

import logging
import os
from pathlib import Path

import msgspec

from d2retrain.core.errors import AnnotationError, InputFileError
from d2retrain.data.fields import NESTED_TOO_DEEP, Id, ImageSide

logger = logging.getLogger(__name__)

__all__ = ["ImageEntry", "InstanceEntry", "InstancesDocument", "read_instances"]


class ImageEntry(msgspec.Struct):
    """An image: its id, file name and size."""

    id: Id
    file_name: str
    height: ImageSide
    width: ImageSide


class InstanceEntry(msgspec.Struct):
    """An annotation's geometry: image, category, segmentation, box (None where absent), crowd flag."""

    image_id: Id
    category_id: Id
    segmentation: list[list[float]] | dict
    bbox: tuple[float, float, float, float] | None = None
    iscrowd: Id | bool = 0


class InstancesDocument(msgspec.Struct):
    """The images and annotations of a COCO file."""

    images: list[ImageEntry]
    annotations: list[InstanceEntry]


_DECODER = msgspec.json.Decoder(InstancesDocument)


def read_instances(path: str | os.PathLike[str]) -> InstancesDocument:
    """Read the images and instance geometry of a COCO file.

    Raises:
        InputFileError: The file cannot be read, is not JSON, or nests too deep.
        AnnotationError: A record lacks a key these readers need, or holds a value of the wrong type.
    """
    try:
        return _DECODER.decode(Path(path).read_bytes())
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read ({error.strerror})") from None
    except msgspec.ValidationError as error:  # a subclass of DecodeError: first
        raise AnnotationError(f"{path}: {error}") from None
    except msgspec.DecodeError as error:
        raise InputFileError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise InputFileError(f"{path}: {NESTED_TOO_DEEP}") from None
