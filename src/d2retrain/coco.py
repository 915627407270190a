"""Read, validate and write COCO instance files fast, keeping every field as raw bytes.

Only the fields the workflow decides on are parsed (ids, references, area, crowd flag,
file names); everything else, segmentations included, stays as the raw JSON bytes of the
input and is copied to the output untouched.
"""

import dataclasses
import logging
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import msgspec
import numpy as np

from d2retrain.errors import AnnotationError, InputFileError, UnsafePathError
from d2retrain.fileio import write_bytes_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "Category",
    "AnnotationTable",
    "CocoDocument",
    "read_coco",
    "parse_coco",
    "encode_coco",
    "write_coco",
    "check_file_name",
    "renumber_category",
]

_REQUIRED_KEYS = ("images", "annotations", "categories")


class Category(msgspec.Struct, frozen=True):
    """One COCO category: id, name and supercategory."""

    id: int
    name: str
    supercategory: str = ""


class _ImageKeys(msgspec.Struct):
    id: int
    file_name: str


class _AnnotationKeys(msgspec.Struct):
    id: int
    image_id: int
    category_id: int
    iscrowd: int | bool = 0
    area: float | None = None


@dataclasses.dataclass(frozen=True)
class AnnotationTable:
    """Columnar view of the annotation fields the workflow decides on.

    Attributes:
        ids: Annotation ids.
        image_ids: Image id of each annotation.
        category_ids: Category id of each annotation.
        iscrowd: Crowd flag of each annotation.
        area: Area of each annotation (NaN when the file gives none).
    """

    ids: np.ndarray
    image_ids: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    area: np.ndarray

    def take(self, index: np.ndarray) -> "AnnotationTable":
        """Return the rows selected by an index or boolean mask."""
        return AnnotationTable(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class CocoDocument:
    """A COCO instances document: parsed keys beside the raw bytes of every record.

    Attributes:
        source: Where the document came from, for messages.
        top: Every top-level key in file order; the three record lists are rebuilt on
            write from the attributes below, every other value is kept raw.
        images: Raw JSON of each image record.
        image_ids: Id of each image, in the order of ``images``.
        file_names: File name of each image, in the order of ``images``.
        annotations: Raw JSON of each annotation record.
        table: Parsed fields of each annotation, in the order of ``annotations``.
        categories: The categories.
    """

    source: str
    top: dict[str, msgspec.Raw]
    images: list[msgspec.Raw]
    image_ids: np.ndarray
    file_names: list[str]
    annotations: list[msgspec.Raw]
    table: AnnotationTable
    categories: list[Category]


def read_coco(path: str | os.PathLike[str]) -> CocoDocument:
    """Read and validate a COCO instances file.

    Args:
        path: The JSON file.

    Returns:
        The parsed document.

    Raises:
        InputFileError: The file is missing, unreadable or not JSON.
        AnnotationError: The document breaks a COCO rule.
        UnsafePathError: An image ``file_name`` escapes its image folder.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file; check the path in the config") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder, expected a COCO JSON file") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read ({error.strerror})") from None
    return parse_coco(data, source=str(path))


def parse_coco(data: bytes, source: str = "<memory>") -> CocoDocument:
    """Parse and validate COCO instances JSON held in memory.

    Args:
        data: The JSON bytes.
        source: Name used in error messages.

    Returns:
        The parsed document.

    Raises:
        InputFileError: The bytes are not JSON.
        AnnotationError: The document breaks a COCO rule.
        UnsafePathError: An image ``file_name`` escapes its image folder.
    """
    top = _decode(data, dict[str, msgspec.Raw], source, "the top level")
    missing = [key for key in _REQUIRED_KEYS if key not in top]
    if missing:
        raise AnnotationError(
            f"{source}: missing key(s) {', '.join(missing)}; a COCO instances file needs "
            "'images', 'annotations' and 'categories'"
        )
    images = _decode(top["images"], list[msgspec.Raw], source, "images")
    image_keys = _decode(top["images"], list[_ImageKeys], source, "images")
    annotations = _decode(top["annotations"], list[msgspec.Raw], source, "annotations")
    annotation_keys = _decode(top["annotations"], list[_AnnotationKeys], source, "annotations")
    categories = _decode(top["categories"], list[Category], source, "categories")
    document = CocoDocument(
        source=source,
        top=top,
        images=images,
        image_ids=np.fromiter((key.id for key in image_keys), dtype=np.int64, count=len(images)),
        file_names=[key.file_name for key in image_keys],
        annotations=annotations,
        table=_table(annotation_keys),
        categories=categories,
    )
    _validate(document)
    return document


def _decode(data: bytes | msgspec.Raw, kind: type, source: str, where: str):
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as error:
        if where == "the top level":
            raise AnnotationError(f"{source}: the top level must be a JSON object ({error})") from None
        raise AnnotationError(f"{source}: {str(error).replace('`$', f'`{where}', 1)}") from None
    except msgspec.DecodeError as error:
        raise InputFileError(f"{source}: not valid JSON in {where} ({error})") from None


def _table(keys: list[_AnnotationKeys]) -> AnnotationTable:
    count = len(keys)
    return AnnotationTable(
        ids=np.fromiter((k.id for k in keys), dtype=np.int64, count=count),
        image_ids=np.fromiter((k.image_id for k in keys), dtype=np.int64, count=count),
        category_ids=np.fromiter((k.category_id for k in keys), dtype=np.int64, count=count),
        iscrowd=np.fromiter((bool(k.iscrowd) for k in keys), dtype=bool, count=count),
        area=np.fromiter((np.nan if k.area is None else k.area for k in keys), dtype=np.float64, count=count),
    )


def _first_duplicate(ids: np.ndarray) -> int | None:
    values, counts = np.unique(ids, return_counts=True)
    repeated = values[counts > 1]
    return int(repeated[0]) if repeated.size else None


def _validate(document: CocoDocument) -> None:
    source, table = document.source, document.table
    for what, ids in (
        ("image", document.image_ids),
        ("annotation", table.ids),
        ("category", np.array([c.id for c in document.categories], dtype=np.int64)),
    ):
        duplicate = _first_duplicate(ids)
        if duplicate is not None:
            raise AnnotationError(f"{source}: {what} id {duplicate} appears more than once")
    if table.ids.size and table.ids.min() <= 0:
        index = int(np.argmax(table.ids <= 0))
        raise AnnotationError(
            f"{source}: annotations[{index}] has id {int(table.ids[index])}; COCO evaluation "
            "treats ids <= 0 as 'unmatched', renumber annotations from 1"
        )
    _check_references(source, "image_id", table.image_ids, document.image_ids)
    category_ids = np.array([c.id for c in document.categories], dtype=np.int64)
    _check_references(source, "category_id", table.category_ids, category_ids)
    for index, file_name in enumerate(document.file_names):
        check_file_name(file_name, where=f"{source}: images[{index}].file_name")


def _check_references(source: str, field: str, values: np.ndarray, known: np.ndarray) -> None:
    dangling = ~np.isin(values, known)
    if dangling.any():
        index = int(np.argmax(dangling))
        raise AnnotationError(
            f"{source}: annotations[{index}].{field} is {int(values[index])}, which no "
            f"{field.removesuffix('_id')} in the file has ({int(dangling.sum())} such annotations)"
        )


def check_file_name(file_name: str, where: str) -> None:
    """Refuse a file name that would leave its image folder.

    Args:
        file_name: The ``file_name`` of an image record.
        where: Location used in the error message.

    Raises:
        UnsafePathError: The name is empty, absolute, or has a ``..`` component.
    """
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if not file_name or "\0" in file_name:
        raise UnsafePathError(f"{where} is empty or holds a NUL byte")
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise UnsafePathError(
            f"{where} is the absolute path {file_name!r}; it must be relative to the image folder"
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(f"{where} is {file_name!r}, which climbs out of the image folder")


_CATEGORY_ID = re.compile(rb'("category_id"\s*:\s*)(-?\d+)')


def renumber_category(raw: msgspec.Raw, new_id: int) -> msgspec.Raw:
    """Return an annotation's raw JSON with its ``category_id`` set to ``new_id``.

    Every other byte is kept. When the key name occurs more than once in the record
    (a nested field of the same name), the record is decoded and re-encoded instead.
    """
    data = bytes(raw)
    if data.count(b'"category_id"') == 1:
        return msgspec.Raw(_CATEGORY_ID.sub(lambda m: m.group(1) + str(new_id).encode(), data))
    fields = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    fields["category_id"] = msgspec.Raw(str(new_id).encode())
    return msgspec.Raw(msgspec.json.encode(fields))


def encode_coco(document: CocoDocument) -> bytes:
    """Encode a document as compact JSON in the key order of its source.

    Args:
        document: The document to encode.

    Returns:
        The JSON bytes.
    """
    records = {
        "images": document.images,
        "annotations": document.annotations,
        "categories": document.categories,
    }
    out = {key: records.get(key, value) for key, value in document.top.items()}
    return msgspec.json.encode(out)


def write_coco(path: str | os.PathLike[str], document: CocoDocument) -> None:
    """Write a document atomically.

    Args:
        path: Destination file.
        document: The document to write.
    """
    write_bytes_atomic(path, encode_coco(document))
