"""The rules on a COCO record's fields that every reader applies: id and size types, safe file names.

Shared by the fast reader of whole documents (:mod:`~d2retrain.data.coco`) and the readers of images
and instance geometry (:mod:`~d2retrain.data.instances`, :mod:`~d2retrain.data.masks`).
"""

import logging
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated

import msgspec

from d2retrain.core.errors import AnnotationError, UnsafePathError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "Id",
    "ImageSide",
    "NESTED_TOO_DEEP",
    "check_file_name",
    "check_file_names",
    "check_image_size",
]

MAX_IMAGE_PIXELS = 2**30
"""Largest ``height * width`` accepted: OpenCV's default limit, so mask PNGs can be read back."""

Id = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""An id: any integer that fits the 64-bit columns the workflow keeps ids in."""

ImageSide = Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGE_PIXELS)]
"""An image ``height`` or ``width``: a positive integer."""

NESTED_TOO_DEEP = "JSON nested about 1000 levels deep, deeper than the JSON readers can follow; flatten it"
"""The message for a document that makes the JSON decoders recurse too deep."""


# A name without separators, drive colons or NUL that is not "." or "..": always safe.
_PLAIN_NAME = re.compile(r"(?!\.\.?$)[^/\\:\0]+")


def check_file_name(file_name: str, where: str) -> None:
    """Refuse a file name that would leave its image folder or names no file.

    Args:
        file_name: The ``file_name`` of an image record.
        where: Location used in the error message.

    Raises:
        UnsafePathError: The name is empty, absolute, has a ``..`` component, or names a
            folder (``.``, a trailing ``/``).
    """
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if not file_name or "\0" in file_name:
        raise UnsafePathError(f"{where} is empty or holds a NUL byte")
    if not posix.name or not windows.name or file_name.endswith(("/", "\\", "/.", "\\.")):
        raise UnsafePathError(f"{where} is {file_name!r}, which names a folder, not an image file")
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise UnsafePathError(
            f"{where} is the absolute path {file_name!r}; it must be relative to the image folder"
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(f"{where} is {file_name!r}, which climbs out of the image folder")


def check_file_names(file_names: list[str], source: str) -> None:
    """:func:`check_file_name` on each ``images[i].file_name`` of ``source`` (plain names skip it).

    Raises:
        UnsafePathError: The first unsafe name, with its index.
    """
    for index, file_name in enumerate(file_names):
        if not _PLAIN_NAME.fullmatch(file_name):
            check_file_name(file_name, where=f"{source}: images[{index}].file_name")


def check_image_size(height: int, width: int, where: str) -> None:
    """Refuse an image size that no mask can be drawn on.

    Args:
        height: The image's ``height``.
        width: The image's ``width``.
        where: Location used in the error message.

    Raises:
        AnnotationError: A side is not a positive integer, or the image has more than
            :data:`MAX_IMAGE_PIXELS` pixels.
    """
    if not all(type(side) is int and side >= 1 for side in (height, width)):
        raise AnnotationError(f"{where}: height {height!r} and width {width!r} must be positive integers")
    if height * width > MAX_IMAGE_PIXELS:
        raise AnnotationError(
            f"{where}: {height}x{width} is more than {MAX_IMAGE_PIXELS} pixels; check the height and "
            "width, or tile the image"
        )
