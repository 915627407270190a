"""Several COCO datasets merged into one: categories matched by name after each dataset's aliases,
image and annotation ids made unique, the originals kept in a ``source`` field of each record."""

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from d2retrain.core.errors import CategoryError, D2RetrainError
from d2retrain.data.coco import AnnotationTable, Category, CocoDocument, read_coco, write_coco
from d2retrain.data.masks import copy_images, resolve_image_path

logger = logging.getLogger(__name__)

__all__ = ["MergeSource", "merge_documents", "merge_files"]


@dataclasses.dataclass(frozen=True)
class MergeSource:
    """One dataset to merge.

    Attributes:
        name: The dataset's name: merged ``file_name`` values are ``<name>/<file_name>``.
        annotations: Its COCO file.
        images: The folder its ``file_name`` values are relative to (None: no image check).
        aliases: Its category names renamed for the merge (``{"ball": "sports ball"}``).
    """

    name: str
    annotations: str
    images: str | None = None
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)


def _renamed(source: MergeSource, document: CocoDocument) -> list[str]:
    """The dataset's category names after its aliases.

    Raises:
        CategoryError: An alias names no category of the dataset, or two categories end up
            with one name.
    """
    names = [category.name for category in document.categories]
    unknown = sorted(set(source.aliases) - set(names))
    if unknown:
        raise CategoryError(
            f"{source.annotations}: aliases of dataset {source.name} name no category of it: "
            f"{', '.join(unknown)} (its categories: {', '.join(names)})"
        )
    renamed = [source.aliases.get(name, name) for name in names]
    twice = sorted({name for name in renamed if renamed.count(name) > 1})
    if twice:
        raise CategoryError(
            f"{source.annotations}: after the aliases of dataset {source.name}, several of its "
            f"categories are named {', '.join(twice)}"
        )
    return renamed


def _with_fields(raw: msgspec.Raw, fields: dict) -> msgspec.Raw:
    """A record's raw JSON with ``fields`` set; every other byte of its values kept."""
    record = msgspec.json.decode(bytes(raw), type=dict[str, msgspec.Raw])
    record.update({key: msgspec.Raw(msgspec.json.encode(value)) for key, value in fields.items()})
    return msgspec.Raw(msgspec.json.encode(record))


def _check_distinct_files(
    parts: Sequence[tuple[MergeSource, CocoDocument]],
    other_split: Sequence[tuple[MergeSource, CocoDocument]] = (),
) -> None:
    """Refuse two datasets naming the same image file: in one split it would train twice, across
    the splits (``other_split``: the same datasets' other split) it would leak into val."""
    seen: dict[str, str] = {}
    for source, document in parts:
        for path in _image_files(source, document):
            other = seen.setdefault(path, source.name)
            if other != source.name:
                raise D2RetrainError(
                    f"datasets {other} and {source.name} both name the image file {path}; "
                    "an image may belong to one dataset only"
                )
    for source, document in other_split:
        for path in _image_files(source, document):
            if seen.get(path, source.name) != source.name:
                raise D2RetrainError(
                    f"dataset {seen[path]} names the image file {path}, which dataset {source.name} "
                    f"puts in its other split ({source.annotations}): it would be in train and val"
                )


def _image_files(source: MergeSource, document: CocoDocument) -> list[str]:
    if source.images is None:
        return []
    return [os.path.realpath(resolve_image_path(source.images, name)) for name in document.file_names]


def merge_documents(
    parts: Sequence[tuple[MergeSource, CocoDocument]],
    other_split: Sequence[tuple[MergeSource, CocoDocument]] = (),
) -> CocoDocument:
    """Merge datasets in order.

    Categories are matched by name after each dataset's aliases and numbered 1..K in order of
    first appearance. Images and annotations are numbered 1..M and 1..A in dataset order; each
    record keeps every field, gains ``source`` (``{"dataset", "id"}``, and the original
    ``file_name`` for an image), and an image's ``file_name`` becomes ``<dataset>/<file_name>``.
    The top-level keys other than the records (``info``, ``licenses``, ...) are the first
    dataset's.

    Args:
        parts: The datasets, in order.
        other_split: The same datasets' other split, to refuse an image that another dataset
            would put on the other side.

    Raises:
        D2RetrainError: No dataset, names that are not unique, an alias to a name the dataset
            does not have, or an image file named by two datasets.
    """
    names = [source.name for source, _ in parts]
    if not parts or len(set(names)) < len(names):
        raise D2RetrainError(f"merging needs datasets named once each; got {', '.join(names) or 'none'}")
    _check_distinct_files(parts, other_split)
    categories: dict[str, Category] = {}
    images: list[msgspec.Raw] = []
    annotations: list[msgspec.Raw] = []
    columns: dict[str, list[np.ndarray]] = {"image_ids": [], "category_ids": [], "iscrowd": [], "area": []}
    file_names: list[str] = []
    for source, document in parts:
        category_of = {}
        for category, name in zip(document.categories, _renamed(source, document), strict=True):
            merged = categories.setdefault(name, Category(len(categories) + 1, name, category.supercategory))
            category_of[category.id] = merged.id
        image_of = {}
        for raw, image_id, file_name in zip(
            document.images, document.image_ids.tolist(), document.file_names, strict=True
        ):
            new_id = len(images) + 1
            image_of[image_id] = new_id
            file_names.append(f"{source.name}/{file_name}")
            origin = {"dataset": source.name, "id": image_id, "file_name": file_name}
            images.append(_with_fields(raw, {"id": new_id, "file_name": file_names[-1], "source": origin}))
        table = document.table
        for raw, annotation_id, image_id, category_id in zip(
            document.annotations,
            table.ids.tolist(),
            table.image_ids.tolist(),
            table.category_ids.tolist(),
            strict=True,
        ):
            fields = {
                "id": len(annotations) + 1,
                "image_id": image_of[image_id],
                "category_id": category_of[category_id],
                "source": {"dataset": source.name, "id": annotation_id},
            }
            annotations.append(_with_fields(raw, fields))
        columns["image_ids"].append(np.array([image_of[i] for i in table.image_ids.tolist()], np.int64))
        columns["category_ids"].append(
            np.array([category_of[c] for c in table.category_ids.tolist()], np.int64)
        )
        columns["iscrowd"].append(table.iscrowd)
        columns["area"].append(table.area)
    first = parts[0][1]
    return dataclasses.replace(
        first,
        source=" + ".join(source.annotations for source, _ in parts),
        images=images,
        image_ids=np.arange(1, len(images) + 1, dtype=np.int64),
        file_names=file_names,
        image_sizes=np.concatenate([document.image_sizes for _, document in parts]),
        annotations=annotations,
        table=AnnotationTable(
            np.arange(1, len(annotations) + 1, dtype=np.int64),
            *(np.concatenate(columns[key]) for key in ("image_ids", "category_ids", "iscrowd", "area")),
        ),
        categories=list(categories.values()),
    )


def merge_files(
    sources: Sequence[MergeSource],
    output_json: str,
    images_out: str | None = None,
    threads: int = 1,
    other_split: Sequence[MergeSource] = (),
) -> CocoDocument:
    """Merge COCO files (see :func:`merge_documents`), write the result and, when ``images_out``
    is given, fill it with ``<dataset>/<file_name>`` hard links (else copies) of every image, so
    that the merged file's names are relative to it. ``other_split``: the same datasets' other
    split (see :func:`merge_documents`).

    Raises:
        D2RetrainError: Unusable inputs, or what :func:`merge_documents` refuses.
    """
    parts = [(source, read_coco(source.annotations)) for source in sources]
    merged = merge_documents(parts, [(source, read_coco(source.annotations)) for source in other_split])
    if images_out is not None:
        for source, _ in parts:
            if source.images is None:
                raise D2RetrainError(f"dataset {source.name}: give its image folder to link its images")
            copy_images(source.annotations, source.images, str(Path(images_out) / source.name), threads)
    write_coco(output_json, merged)
    logger.info(
        "merged %s: %d images, %d annotations, categories %s",
        ", ".join(f"{source.name} ({len(document.images)} images)" for source, document in parts),
        len(merged.images),
        len(merged.annotations),
        ", ".join(category.name for category in merged.categories),
    )
    return merged
