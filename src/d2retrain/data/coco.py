"""Read, validate and write COCO instance files fast, keeping every field as raw bytes.

Only the fields the workflow decides on are parsed (ids, references, area, crowd flag,
file names); everything else, segmentations included, stays as the raw JSON bytes of the
input and is copied to the output untouched.
"""

import dataclasses
import logging
import mmap
import os
import re
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np

from d2retrain.core.errors import AnnotationError, InputFileError
from d2retrain.core.fileio import write_bytes_atomic
from d2retrain.core.forked import in_two_halves
from d2retrain.data.fields import (
    MAX_IMAGE_PIXELS,
    NESTED_TOO_DEEP,
    Id,
    ImageSide,
    check_file_names,
    check_image_size,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Category",
    "AnnotationTable",
    "CocoDocument",
    "read_coco",
    "parse_coco",
    "encode_coco",
    "write_coco",
    "renumber_category",
    "take_images",
]

_REQUIRED_KEYS = ("images", "annotations", "categories")


class Category(msgspec.Struct, frozen=True):
    """One COCO category: id, name and supercategory."""

    id: Id
    name: str
    supercategory: str = ""


_ABSENT = msgspec.Raw(b"")


class _Records(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """The top level: one scan finds every record's bytes."""

    images: list[msgspec.Raw]
    annotations: list[msgspec.Raw]
    categories: list[Category]
    info: msgspec.Raw = _ABSENT
    licenses: msgspec.Raw = _ABSENT


class _LooseRecords(_Records, forbid_unknown_fields=False):
    """The top level of a file with keys beyond the COCO ones."""


class _ImageKeys(msgspec.Struct, gc=False):
    id: Id
    file_name: str
    height: ImageSide
    width: ImageSide


class _AnnotationKeys(msgspec.Struct, gc=False):
    id: Id
    image_id: Id
    category_id: Id
    iscrowd: Id | bool = 0
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
        top: Every top-level key in output order (``info``, ``licenses``, the record
            lists, then any other key); the record lists are None here and rebuilt on
            write from the attributes below, every other value is kept raw.
        images: Raw JSON of each image record.
        image_ids: Id of each image, in the order of ``images``.
        file_names: File name of each image, in the order of ``images``.
        image_sizes: ``(height, width)`` of each image, in the order of ``images``.
        annotations: Raw JSON of each annotation record.
        table: Parsed fields of each annotation, in the order of ``annotations``.
        categories: The categories.
    """

    source: str
    top: dict[str, msgspec.Raw | None]
    images: list[msgspec.Raw]
    image_ids: np.ndarray
    file_names: list[str]
    image_sizes: np.ndarray
    annotations: list[msgspec.Raw]
    table: AnnotationTable
    categories: list[Category]


def take_images(document: CocoDocument, index: np.ndarray) -> CocoDocument:
    """The document with the images at ``index`` (positions, in that order); annotations as they were."""
    return dataclasses.replace(
        document,
        images=[document.images[i] for i in index],
        image_ids=document.image_ids[index],
        file_names=[document.file_names[i] for i in index],
        image_sizes=document.image_sizes[index],
    )


def read_coco(path: str | os.PathLike[str], processes: int = 1) -> CocoDocument:
    """Read and validate a COCO instances file.

    Args:
        path: The JSON file.
        processes: Decode the annotations in two processes when this is 2 or more.

    Returns:
        The parsed document.

    Raises:
        InputFileError: The file is missing, unreadable or not JSON.
        AnnotationError: The document breaks a COCO rule.
        UnsafePathError: An image ``file_name`` escapes its image folder.
    """
    try:
        data = _map(path)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file; check the path in the config") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder, expected a COCO JSON file") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read ({error.strerror})") from None
    return parse_coco(data, source=str(path), processes=processes)


def _map(path: str | os.PathLike[str]) -> bytes | mmap.mmap:
    """Map the file (no copy; records keep views into it), or read it when empty."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)


def parse_coco(data: bytes | mmap.mmap, source: str = "<memory>", processes: int = 1) -> CocoDocument:
    """Parse and validate COCO instances JSON held in memory.

    Args:
        data: The JSON bytes.
        source: Name used in error messages.
        processes: Decode the annotations in two processes when this is 2 or more.

    Returns:
        The parsed document.

    Raises:
        InputFileError: The bytes are not JSON.
        AnnotationError: The document breaks a COCO rule.
        UnsafePathError: An image ``file_name`` escapes its image folder.
    """
    records, top = _decode_top(data, source)
    image_keys = _decode_each(records.images, _ImageKeys, source, "images")
    document = CocoDocument(
        source=source,
        top=top,
        images=records.images,
        image_ids=_column(image_keys, "id", np.int64),
        file_names=list(map(attrgetter("file_name"), image_keys)),
        image_sizes=np.stack(
            [_column(image_keys, "height", np.int64), _column(image_keys, "width", np.int64)], axis=1
        ),
        annotations=records.annotations,
        table=_annotation_table(records.annotations, source, processes),
        categories=records.categories,
    )
    _validate(document)
    return document


def _decode_top(data: bytes | mmap.mmap, source: str) -> tuple[_Records, dict[str, msgspec.Raw | None]]:
    """Split the top level into record lists, and every key in output order."""
    try:
        records = _decode(data, _Records, source)
    except _UnknownTopLevelKeyError:
        top = _decode(data, dict[str, msgspec.Raw], source)
        return _decode(data, _LooseRecords, source), {
            k: None if k in _REQUIRED_KEYS else v for k, v in top.items()
        }
    top = {key: getattr(records, key) for key in ("info", "licenses") if getattr(records, key) is not _ABSENT}
    return records, top | dict.fromkeys(_REQUIRED_KEYS)


class _UnknownTopLevelKeyError(Exception):
    pass


def _decode(data: bytes | mmap.mmap, kind: type, source: str):
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as error:  # a subclass of DecodeError: first
        message = str(error)
    except msgspec.DecodeError as error:
        raise InputFileError(f"{source}: not valid JSON ({error})") from None
    except RecursionError:
        raise InputFileError(f"{source}: {NESTED_TOO_DEEP}") from None
    if message.startswith("Object contains unknown field"):
        raise _UnknownTopLevelKeyError
    missing = re.match(r"Object missing required field `(\w+)`$", message)
    if missing:
        raise AnnotationError(
            f"{source}: missing key(s) {missing.group(1)}; a COCO instances file needs "
            "'images', 'annotations' and 'categories'"
        )
    if "- at `$" not in message:
        raise AnnotationError(f"{source}: the top level must be a JSON object ({message})")
    raise AnnotationError(f"{source}: {message.replace('`$.', '`', 1)}")


def _decode_each(records: list[msgspec.Raw], kind: type, source: str, where: str) -> list:
    decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(kind)
    try:
        return [decoder.decode(record) for record in records]
    except msgspec.ValidationError:
        pass
    for index, record in enumerate(records):
        try:
            decoder.decode(record)
        except msgspec.ValidationError as error:
            message = str(error).replace("`$", f"`{where}[{index}]", 1)
            raise AnnotationError(f"{source}: {where}[{index}]: {message}") from None
    raise AssertionError("unreachable")


def _annotation_table(records: list[msgspec.Raw], source: str, processes: int) -> AnnotationTable:
    parts = in_two_halves(_table_or_none, records, processes)
    if any(part is None for part in parts):
        _decode_each(records, _AnnotationKeys, source, "annotations")  # raises, naming the record
    fields = [field.name for field in dataclasses.fields(AnnotationTable)]
    return AnnotationTable(*(np.concatenate([getattr(part, name) for part in parts]) for name in fields))


def _table_or_none(records: Sequence[msgspec.Raw]) -> AnnotationTable | None:
    decode = msgspec.json.Decoder(_AnnotationKeys).decode
    try:
        return _table([decode(record) for record in records])
    except msgspec.ValidationError:
        return None


def _column(keys: list, field: str, dtype: type) -> np.ndarray:
    return np.fromiter(map(attrgetter(field), keys), dtype=dtype, count=len(keys))


def _table(keys: list[_AnnotationKeys]) -> AnnotationTable:
    return AnnotationTable(
        ids=_column(keys, "id", np.int64),
        image_ids=_column(keys, "image_id", np.int64),
        category_ids=_column(keys, "category_id", np.int64),
        iscrowd=_column(keys, "iscrowd", np.int64).astype(bool),
        area=np.array(list(map(attrgetter("area"), keys)), dtype=np.float64),  # None -> nan
    )


def _first_duplicate(ids: np.ndarray) -> int | None:
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
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
    _check_unique(source, "categories", "name", [category.name for category in document.categories])
    _check_unique(source, "images", "file_name", document.file_names)
    check_file_names(document.file_names, source)
    pixels = document.image_sizes.prod(axis=1)
    if np.any(pixels > MAX_IMAGE_PIXELS):
        index = int(np.argmax(pixels > MAX_IMAGE_PIXELS))
        height, width = document.image_sizes[index].tolist()
        check_image_size(height, width, where=f"{source}: images[{index}]")


def _check_unique(source: str, section: str, key: str, values: list[str]) -> None:
    if len(set(values)) == len(values):
        return
    first: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in first:
            raise AnnotationError(
                f"{source}: {section}[{first[value]}] and {section}[{index}] have the same {key} "
                f"{value!r}; each must be unique, rename or remove one"
            )
        first[value] = index


def _check_references(source: str, field: str, values: np.ndarray, known: np.ndarray) -> None:
    dangling = ~np.isin(values, known)
    if dangling.any():
        index = int(np.argmax(dangling))
        raise AnnotationError(
            f"{source}: annotations[{index}].{field} is {int(values[index])}, which no "
            f"{field.removesuffix('_id')} in the file has ({int(dangling.sum())} such annotations)"
        )


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
