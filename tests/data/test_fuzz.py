"""Fuzzed COCO documents: every one ends in the project's own error or in valid outputs, never a half file."""

import contextlib
import copy
import io
import json
import logging
import math
import re
import shutil
import tempfile
import unittest.mock
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import make_coco, square
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from d2retrain.core.errors import (
    AnnotationError,
    CategoryError,
    D2RetrainError,
    InputFileError,
    UnsafePathError,
)
from d2retrain.data import geometry
from d2retrain.data.coco import parse_coco
from d2retrain.data.filtering import FilterOptions
from d2retrain.data.geometry import usable_segmentation
from d2retrain.data.masks import IGNORE, copy_images_and_masks, rasterize
from d2retrain.data.prepare import balance_file, filter_file
from d2retrain.data.records import load_records
from d2retrain.train.samples import TrainSamples

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SIZES = {1: (64, 64), 2: (40, 64), 3: (64, 48)}  # image id -> (height, width); not square: catches swaps


def _rle(height: int, width: int, rows: slice, columns: slice, compressed: bool) -> dict:
    array = np.zeros((height, width), dtype=np.uint8, order="F")
    array[rows, columns] = 1
    if compressed:
        return {"size": [height, width], "counts": mask_utils.encode(array)["counts"].decode("ascii")}
    flat = array.ravel(order="F").astype(np.int64)
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
    return {"size": [height, width], "counts": ([0] if flat[0] else []) + runs}


def base_document() -> dict:
    """Three images of different sizes, five polygons, an uncompressed crowd RLE and a compressed RLE."""
    document = copy.deepcopy(make_coco([[1, 37], [3, 1], [37]]))  # its categories are a shared list
    for image in document["images"]:
        image["height"], image["width"] = SIZES[image["id"]]
    crowd = _rle(64, 64, slice(30, 40), slice(0, 20), compressed=False)
    compressed = _rle(64, 48, slice(40, 50), slice(5, 25), compressed=True)
    for number, (image_id, category_id, segmentation, iscrowd) in enumerate(
        [(1, 1, crowd, 1), (3, 1, compressed, 0)], start=len(document["annotations"]) + 1
    ):
        document["annotations"].append(
            {
                "id": number,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": segmentation,
                "area": 200.0,
                "bbox": [0, 30, 20, 10] if iscrowd else [5, 40, 20, 10],
                "iscrowd": iscrowd,
            }
        )
    return document


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """The base document's images, written once: real files of the sizes the document gives."""
    folder = tmp_path_factory.mktemp("images")
    for image_id, (height, width) in SIZES.items():
        cv2.imwrite(str(folder / f"img_{image_id}.jpg"), np.full((height, width, 3), 90, np.uint8))
    return folder


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- strategies

HUGE = [2**31, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)]
ODD_VALUES = [None, True, False, 0, -1, 1, 0.5, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308]
ODD_VALUES += [*HUGE, "", "7", "é ☃ 名前", [], [[]], [1, 2], {}, {"a": 1}, [None], {"size": None}]
VALUES = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-3, 100), max_size=5),
)
KEYS = {
    "images": ["id", "file_name", "height", "width", "flickr_url"],
    "annotations": ["id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd", "note"],
    "categories": ["id", "name", "supercategory"],
}
FILE_NAMES = ["", ".", "..", "a/..", "../x.jpg", "/abs.jpg", "C:\\x.jpg", "a/b.jpg", "img_2.jpg", "é ☃.jpg"]
FILE_NAMES += ["img_1.png", "x\0.jpg", "dir/", ".jpg", "img_1"]
CATEGORY_NAMES = ["", "person", "car", "Person", "名前", "a" * 300, "sports ball ", "\n"]

COORDINATE = st.one_of(
    st.floats(min_value=-5, max_value=70, allow_nan=False),
    st.sampled_from([0, -0.0, 64, 64.0001, -1e30, 1e30, 1e8, -1e8, 2**63, 1e308]),
)
POLYGONS = st.one_of(
    st.lists(st.lists(COORDINATE, min_size=0, max_size=9), min_size=0, max_size=3),
    st.lists(st.lists(COORDINATE, min_size=0, max_size=5), min_size=1, max_size=2),  # < 3 points
    st.sampled_from(
        [
            [[5, 5, 5, 5, 5, 5]],  # one point three times: zero area
            [[0, 0, 10, 10, 20, 20]],  # collinear: zero area
            [[0, 0, 10, 0, 10, 10, 0]],  # odd length
            [[0, 0, 10, 0, 10, 10], [1, 2]],  # a good polygon and a short one
            [[1, 2, 3, 4], [0, 0, 10, 0, 10, 10]],  # a short one first (pycocotools reads a bbox)
            [[0, 0, 10, 0, 10, 10], []],
            square(-70, -70, 20),  # wholly outside the image
        ]
    ),
)
RLE_SIZES = st.sampled_from([[64, 64], [40, 64], [64, 48], [64, 40], [0, 0], [-1, 64], [2**63, 1], [64], []])
COMPRESSED = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=111), max_size=12),
    st.sampled_from(
        [
            _rle(64, 64, slice(0, 9), slice(0, 9), compressed=True)["counts"],
            _rle(64, 64, slice(0, 9), slice(0, 9), compressed=True)["counts"][:-1],
            _rle(40, 64, slice(0, 9), slice(0, 9), compressed=True)["counts"],
            "P",  # a continuation bit on the last character
            "0000ooo1",
        ]
    ),
)
RLE = st.fixed_dictionaries(
    {},
    optional={
        "size": st.one_of(RLE_SIZES, VALUES),
        "counts": st.one_of(
            COMPRESSED,
            st.lists(st.one_of(st.integers(-3, 5000), st.sampled_from(HUGE)), max_size=6),
            st.just([0, 4096]),
            st.just([4096]),
            st.just([4000, 96]),
            VALUES,
        ),
    },
)
BOXES = st.one_of(
    st.lists(st.one_of(COORDINATE, st.sampled_from([-5, 0, -0.0])), min_size=0, max_size=6),
    st.sampled_from([[0, 0, 0, 10], [0, 0, 10, 0], [0, 0, -3, 10], [0, 0, 10, -3], [1, 1, 1e30, 1]]),
)


@st.composite
def field_mutation(draw) -> tuple:
    """One change to one record: a key deleted or given an odd value, a record copied or removed."""
    section = draw(st.sampled_from(sorted(KEYS)))
    index = draw(st.integers(0, 7))
    action = draw(
        st.sampled_from(["set", "set", "set", "delete", "copy record", "remove record", "steal id"])
    )
    key = draw(st.sampled_from(KEYS[section] + ["unknown key"]))
    value = None
    if action == "set":
        special = {
            "file_name": st.sampled_from(FILE_NAMES),
            "name": st.sampled_from(CATEGORY_NAMES),
            "segmentation": st.one_of(POLYGONS, RLE),
            "bbox": BOXES,
            "image_id": st.sampled_from([0, 2, 4, 99]),
            "category_id": st.sampled_from([0, 1, 3, 37, 99]),
        }.get(key, st.nothing())
        value = draw(st.one_of(VALUES, special))
    return (section, index, key, action, value)


@st.composite
def geometry_mutation(draw) -> tuple:
    """A new segmentation or box for one annotation."""
    key = draw(st.sampled_from(["segmentation", "segmentation", "bbox"]))
    value = draw(st.one_of(POLYGONS, RLE) if key == "segmentation" else BOXES)
    return ("annotations", draw(st.integers(0, 6)), key, "set", value)


def apply(document: dict, mutation: tuple) -> None:
    section, index, key, action, value = mutation
    records = document[section]
    if not records:
        return
    record = records[index % len(records)]
    if action == "set":
        record[key] = value
    elif action == "delete":
        record.pop(key, None)
    elif action == "copy record":
        records.append(copy.deepcopy(record))
    elif action == "remove record":
        records.remove(record)
    elif action == "steal id":
        record["id"] = records[(index + 1) % len(records)].get("id")


TOP_LEVEL = st.one_of(
    st.sampled_from([b"", b"[1, 2]", b"null", b'"coco"', b"{}", b'{"images": []}', b"\xff\xfe{", b"{" * 100]),
    st.binary(max_size=24),
    st.builds(
        lambda key, value: {key: value},
        st.sampled_from(["images", "annotations", "categories", "info", "licenses", "extra"]),
        st.one_of(VALUES, st.just([{}]), st.just([[]]), st.just([None])),
    ),
    st.sampled_from(["images", "annotations", "categories"]).map(lambda key: {key: "delete"}),
    st.integers(0, 2000).map(lambda cut: ("truncate", cut)),
    st.sampled_from([10, 999, 1000, 5000]).map(lambda depth: ("nest", depth)),
)


def whole_document(change) -> bytes:
    """Bytes of the base document after a top-level change (or the change itself when it is bytes)."""
    if isinstance(change, bytes):
        return change
    if isinstance(change, tuple) and change[0] == "nest":  # a field nested deeper than parsers recurse
        document = base_document()
        document["annotations"][0]["note"] = "NEST"
        return json.dumps(document).encode().replace(b'"NEST"', b"[" * change[1] + b"]" * change[1])
    data = json.dumps(base_document()).encode()
    if isinstance(change, tuple):
        return data[: change[1] % len(data)]
    document = base_document()
    for key, value in change.items():
        if value == "delete":
            document.pop(key)
        else:
            document[key] = value
    return json.dumps(document).encode()


NAMES = st.sampled_from(["first", "first two", "last", "absent"])
OPTIONS = st.builds(
    FilterOptions,
    min_area=st.sampled_from([0.0, 0.0, 150.0]),
    drop_crowd=st.booleans(),
    keep_empty_images=st.booleans(),
)
MODES = st.sampled_from(["none", "all"])


# ---------------------------------------------------------------- the pipeline as a user runs it


def choose_names(data: bytes, choice: str) -> list[str]:
    """Category names a user would pick from the document (or an absent one)."""
    try:
        names = [c["name"] for c in json.loads(data)["categories"] if isinstance(c["name"], str)]
    except Exception:
        names = []
    names = list(dict.fromkeys(names)) or ["person"]
    return {"first": names[:1], "first two": names[:2], "last": names[-1:], "absent": ["no such thing"]}[
        choice
    ]


def listing(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir()}


def run_step(work: Path, source: Path, step, expected: set[str]) -> D2RetrainError | None:
    """Run one step; on a project error nothing new is there, else exactly the expected files."""
    before = listing(work)
    try:
        step()
    except D2RetrainError as error:
        assert listing(work) == before, f"{error} but it left {listing(work) - before}"
        message = str(error)
        assert str(source) in message, f"the message does not name the file: {message}"
        if isinstance(error, AnnotationError):
            assert re.search(
                r"(images|annotations|categories)\[\d+\]|image \d+|annotation \d+|missing key|top level"
                r"| id -?\d+ appears|named|at `\w",
                message,
            ), f"the message does not name the record or key: {message}"
        return error
    assert listing(work) == before | expected, f"unexpected files {listing(work) ^ (before | expected)}"
    return None


def check_coco_output(path: Path) -> COCO:
    """pycocotools reads the file and turns every annotation into a mask of its image's size."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(path))
    category_ids = sorted(coco.getCatIds())
    assert category_ids == list(range(1, len(category_ids) + 1))
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        mask = mask_utils.decode(coco.annToRLE(annotation))
        assert mask.shape == (image["height"], image["width"])
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and all(map(math.isfinite, (x, y, w, h)))
        assert annotation["category_id"] in category_ids
    return coco


def check_masks(coco: COCO, folder: Path) -> None:
    for image in coco.dataset["images"]:
        stem = str(Path(image["file_name"]).with_suffix(""))
        semantic = cv2.imread(str(folder / f"{stem}_semantic.png"), cv2.IMREAD_UNCHANGED)
        instances = cv2.imread(str(folder / f"{stem}_instances.png"), cv2.IMREAD_UNCHANGED)
        assert semantic.shape == instances.shape == (image["height"], image["width"])
        assert set(np.unique(semantic).tolist()) <= {0, IGNORE, *coco.getCatIds()}


def mask_files(path: Path) -> set[str]:
    document = json.loads(path.read_bytes())
    stems = [str(Path(image["file_name"]).with_suffix("")) for image in document["images"]]
    return {f"masks/{stem}_{kind}.png" for stem in stems for kind in ("semantic", "instances")} | {
        f"images/{image['file_name']}" for image in document["images"]
    }


def run_pipeline(data: bytes, folder: Path, image_dir: Path, choice: str, options, mode: str) -> str:
    """filter -> balance -> images and masks -> training records; returns how it ended."""
    work = Path(tempfile.mkdtemp(dir=folder))
    try:
        source = work.parent / f"{work.name}_in.json"
        source.write_bytes(data)
        filtered, balanced = work / "filtered.json", work / "balanced.json"
        names = choose_names(data, choice)
        steps = [
            (source, lambda: filter_file(str(source), str(filtered), names, options), {"filtered.json"}),
            (filtered, lambda: balance_file(str(filtered), str(balanced), mode), {"balanced.json"}),
        ]
        for input_path, step, expected in steps:
            error = run_step(work, input_path, step, expected)
            if error is not None:
                return outcome(error)
        check_coco_output(filtered)
        coco = check_coco_output(balanced)
        dropped: list[int] = []
        error = run_step(
            work,
            balanced,
            lambda: dropped.append(
                copy_images_and_masks(
                    str(balanced), str(image_dir), str(work / "images"), str(work / "masks")
                )
            ),
            mask_files(balanced),
        )
        if error is not None:
            return outcome(error)
        assert dropped == [0], "the filter kept geometry the mask renderer cannot draw"
        check_masks(coco, work / "masks")
        records = load_records(str(balanced), str(image_dir))
        assert [record.image_id for record in records] == coco.getImgIds()
        try:
            samples = TrainSamples(records, seed=0, flip=False)
        except D2RetrainError as error:  # e.g. every kept annotation is box-only: nothing to train on
            return outcome(error)
        for position in range(len(samples)):
            samples[position]  # rasterises every kept annotation, as training does
        assert source.read_bytes() == data, "the input was modified"
        return "valid"
    finally:
        shutil.rmtree(work)
        for leftover in folder.glob(f"{work.name}_*"):
            leftover.unlink()


def outcome(error: D2RetrainError) -> str:
    """The error's kind and message without the file path, for ``--hypothesis-show-statistics``."""
    return f"{type(error).__name__}: {str(error).split(': ', 1)[-1][:80]}"


def _run(data, scratch, image_dir, choice, options, mode):
    event(run_pipeline(data, scratch, image_dir, choice, options, mode))


# ---------------------------------------------------------------- the fuzz tests


@FUZZ
@given(st.lists(field_mutation(), min_size=1, max_size=3), NAMES, OPTIONS, MODES)
def test_fuzzed_record_fields_end_in_a_clear_error_or_valid_outputs(
    scratch, image_dir, mutations, choice, options, mode
):
    document = base_document()
    for mutation in mutations:
        apply(document, mutation)
    _run(json.dumps(document).encode(), scratch, image_dir, choice, options, mode)


@FUZZ
@given(st.lists(geometry_mutation(), min_size=1, max_size=3), NAMES, OPTIONS, MODES)
def test_fuzzed_geometry_ends_in_a_clear_error_or_valid_outputs(
    scratch, image_dir, mutations, choice, options, mode
):
    document = base_document()
    for mutation in mutations:
        apply(document, mutation)
    _run(json.dumps(document).encode(), scratch, image_dir, choice, options, mode)


# the base document's images are at most 64 pixels a side: coordinates must lie in [-64, 128]
INSIDE = st.floats(-64, 128)
NEAR = st.one_of(
    INSIDE, INSIDE, INSIDE, INSIDE, st.sampled_from([-64, 128]), st.sampled_from([-64.01, 128.01])
)
POINTS = st.tuples(st.lists(st.tuples(NEAR, NEAR), min_size=3, max_size=5), st.lists(INSIDE, max_size=1)).map(
    lambda drawn: [*sum(drawn[0], ()), *drawn[1]]  # sometimes one coordinate more: odd
)


@st.composite
def near_the_bounds(draw) -> tuple:
    """A well-formed segmentation or box for one annotation, often valid, often at the bounds."""
    if draw(st.booleans()):
        value = draw(st.lists(POINTS, min_size=1, max_size=2))
        return ("annotations", draw(st.integers(0, 6)), "segmentation", "set", value)
    size = st.one_of(st.floats(0.5, 70), st.sampled_from([0, -1]))
    value = [draw(NEAR), draw(NEAR), draw(size), draw(size)]
    return ("annotations", draw(st.integers(0, 6)), "bbox", "set", value)


@settings(FUZZ, max_examples=600)
@given(
    st.lists(
        st.one_of(near_the_bounds(), near_the_bounds(), near_the_bounds(), geometry_mutation()), max_size=2
    )
)
def test_the_fast_geometry_check_says_clean_exactly_when_the_full_pass_finds_nothing(mutations):
    document = base_document()
    for mutation in mutations:
        apply(document, mutation)
    try:
        parsed = parse_coco(json.dumps(document).encode())
    except D2RetrainError:  # NaN written as JSON, and the like: the parser's business
        reject()
    selected = np.ones(len(parsed.annotations), dtype=bool)
    sizes = parsed.image_sizes[np.searchsorted(parsed.image_ids, parsed.table.image_ids)]
    fast = geometry._all_clean(parsed.annotations, np.column_stack([np.flatnonzero(selected), sizes]))
    with unittest.mock.patch.object(geometry, "_all_clean", return_value=False):
        try:
            keep, rewritten = geometry.apply_geometry_rule(parsed, selected)
            full = bool(keep.all()) and not rewritten
        except AnnotationError:
            full = False  # malformed: the fast check must not pass it either
    event(f"clean: {full}")
    assert fast == full


@settings(FUZZ, max_examples=150)
@given(TOP_LEVEL, NAMES, OPTIONS, MODES)
def test_fuzzed_whole_documents_end_in_a_clear_error_or_valid_outputs(
    scratch, image_dir, change, choice, options, mode
):
    _run(whole_document(change), scratch, image_dir, choice, options, mode)


# ---------------------------------------------------------------- one row per class of bad input


def _set(section: str, index: int, **values):
    def change(document: dict) -> None:
        document[section][index].update(values)

    return change


def _delete(section: str, index: int, key: str):
    def change(document: dict) -> None:
        del document[section][index][key]

    return change


def _top(**values):
    def change(document: dict) -> None:
        for key, value in values.items():
            if value is None:
                document.pop(key)
            else:
                document[key] = value

    return change


REFUSED = [
    ("not JSON", b'{"images": [', InputFileError, "not valid JSON"),
    ("NaN literal", _set("annotations", 0, area=math.nan), InputFileError, "not valid JSON"),
    ("top level a list", b"[1, 2]", AnnotationError, "top level must be a JSON object"),
    ("nested too deep", whole_document(("nest", 5000)), InputFileError, "nested"),
    ("record list missing", _top(images=None), AnnotationError, "missing key(s) images"),
    ("record list of wrong type", _top(categories={}), AnnotationError, "at `categories`"),
    ("id of wrong type", _set("annotations", 0, id="7"), AnnotationError, "annotations[0].id"),
    ("id beyond 64 bits", _set("annotations", 1, id=2**63), AnnotationError, "annotations[1].id"),
    ("category id beyond 64 bits", _set("categories", 0, id=-(10**30)), AnnotationError, "categories[0].id"),
    (
        "iscrowd beyond 64 bits",
        _set("annotations", 0, iscrowd=10**30),
        AnnotationError,
        "annotations[0].iscrowd",
    ),
    ("image height zero", _set("images", 0, height=0), AnnotationError, "images[0].height"),
    (
        "image width missing",
        _delete("images", 2, "width"),
        AnnotationError,
        "images[2]: Object missing required field `width`",
    ),
    ("image too large", _set("images", 0, height=2**20, width=2**20), AnnotationError, "images[0]: 1048576x"),
    ("duplicate id", _set("images", 1, id=1), AnnotationError, "image id 1 appears more than once"),
    ("dangling reference", _set("annotations", 2, image_id=99), AnnotationError, "annotations[2].image_id"),
    ("duplicate category name", _set("categories", 2, name="person"), AnnotationError, "same name 'person'"),
    ("duplicate file name", _set("images", 1, file_name="img_1.jpg"), AnnotationError, "same file_name"),
    ("file name leaving the folder", _set("images", 0, file_name="../x.jpg"), UnsafePathError, "climbs out"),
    ("file name naming a folder", _set("images", 0, file_name="."), UnsafePathError, "names a folder"),
    (
        "segmentation null",
        _set("annotations", 0, segmentation=None),
        AnnotationError,
        "annotations[0] (id 1)",
    ),
    ("segmentation missing", _delete("annotations", 3, "segmentation"), AnnotationError, "`segmentation`"),
    (
        "polygon of strings",
        _set("annotations", 0, segmentation=[["1"]]),
        AnnotationError,
        "segmentation[0][0]",
    ),
    ("box of 3 numbers", _set("annotations", 0, bbox=[1, 2, 3]), AnnotationError, "annotations[0].bbox"),
    (
        "RLE without counts",
        _set("annotations", 6, segmentation={"size": [64, 48]}),
        AnnotationError,
        "'counts'",
    ),
    ("unknown category", "名前", CategoryError, "no category named '名前'"),
]


@pytest.mark.parametrize(("change", "error", "words"), [pytest.param(*row[1:], id=row[0]) for row in REFUSED])
def test_malformed_input_is_refused_naming_file_and_place_and_writes_nothing(tmp_path, change, error, words):
    document, names = base_document(), ["person"]
    if isinstance(change, str):
        names = [change]
    if callable(change):
        change(document)
    data = change if isinstance(change, bytes) else json.dumps(document).encode()
    (tmp_path / "in.json").write_bytes(data)
    with pytest.raises(error) as caught:
        filter_file(str(tmp_path / "in.json"), str(tmp_path / "out.json"), names, FilterOptions())
    assert words in str(caught.value) and str(tmp_path / "in.json") in str(caught.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.json"]


COMPRESSED_64x48 = base_document()["annotations"][6]["segmentation"]["counts"]
GOOD_TRIANGLE = [0, 0, 10, 0, 10, 10]
KEPT_OR_DROPPED = [
    (
        "polygon of 2 points",
        _set("annotations", 0, segmentation=[[1, 2, 3, 4]]),
        [4, 6, 7],
        "1 polygon with fewer",
    ),
    (
        "polygon of odd length",
        _set("annotations", 0, segmentation=[[*GOOD_TRIANGLE, 0]]),
        [4, 6, 7],
        "odd number",
    ),
    ("empty polygon list", _set("annotations", 3, segmentation=[]), [1, 6, 7], "1 empty polygon list"),
    (
        "polygon far outside",
        _set("annotations", 0, segmentation=[[0, 0, 1e30, 0, 0, 9]]),
        [4, 6, 7],
        "far outside",
    ),
    (
        "short polygon beside a good one",
        _set("annotations", 0, segmentation=[GOOD_TRIANGLE, [1, 2]]),
        [1, 4, 6, 7],
        "from 1 more",
    ),
    (
        "box of zero width",
        _set("annotations", 0, bbox=[0, 0, 0, 10]),
        [4, 6, 7],
        "1 box with a width or height <= 0",
    ),
    (
        "box of negative height",
        _set("annotations", 3, bbox=[0, 0, 10, -3]),
        [1, 6, 7],
        "1 box with a width or height",
    ),
    (
        "box far outside",
        _set("annotations", 0, bbox=[1, 1, 1e30, 1]),
        [4, 6, 7],
        "1 geometry far outside its image",
    ),
    (
        "RLE of another size",
        _set("annotations", 6, segmentation={"size": [64, 64], "counts": COMPRESSED_64x48}),
        [1, 4, 6],
        "1 RLE of size",
    ),
    (
        "RLE counts not adding up",
        _set("annotations", 5, segmentation={"size": [64, 64], "counts": [1, 1]}),
        [1, 4, 7],
        "1 RLE counts",
    ),
    (
        "garbled compressed RLE",
        _set("annotations", 6, segmentation={"size": [64, 48], "counts": "zz~"}),
        [1, 4, 6],
        "1 RLE counts",
    ),
    (
        "compressed RLE cut short",
        _set("annotations", 6, segmentation={"size": [64, 48], "counts": COMPRESSED_64x48[:-2]}),
        [1, 4, 6],
        "1 RLE counts",
    ),
    ("polygon of zero area", _set("annotations", 0, segmentation=[[5, 5, 5, 5, 5, 5]]), [1, 4, 6, 7], None),
    ("unicode category name", _set("categories", 0, name="人 ☃"), [1, 4, 6, 7], None),
    ("empty category name", _set("categories", 0, name=""), [1, 4, 6, 7], None),
]


@pytest.mark.parametrize(
    ("change", "kept", "logged"), [pytest.param(*row[1:], id=row[0]) for row in KEPT_OR_DROPPED]
)
def test_degenerate_geometry_is_dropped_by_the_documented_rule_with_a_count_in_the_log(
    tmp_path, caplog, change, kept, logged
):
    document = base_document()
    change(document)
    names = [document["categories"][0]["name"]]
    (tmp_path / "in.json").write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="d2retrain.data.filtering"):
        filter_file(str(tmp_path / "in.json"), str(tmp_path / "out.json"), names, FilterOptions())
    out = check_coco_output(tmp_path / "out.json").dataset
    assert [annotation["id"] for annotation in out["annotations"]] == kept
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    if logged is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and logged in warnings[0] and "degenerate geometry" in warnings[0]


def test_a_short_polygon_is_cut_from_its_annotation_and_the_rest_kept(tmp_path):
    document = base_document()
    document["annotations"][0]["segmentation"] = [[1, 2], GOOD_TRIANGLE, []]
    (tmp_path / "in.json").write_text(json.dumps(document))
    filter_file(str(tmp_path / "in.json"), str(tmp_path / "out.json"), ["person"], FilterOptions())
    first = json.loads((tmp_path / "out.json").read_text())["annotations"][0]
    assert first["id"] == 1 and first["segmentation"] == [GOOD_TRIANGLE]
    assert first["note"] == document["annotations"][0]["note"]


def test_a_category_left_without_annotations_by_the_geometry_rule_is_named(tmp_path):
    document = base_document()
    for annotation in document["annotations"]:
        if annotation["category_id"] == 37:
            annotation["bbox"] = [0, 0, 0, 0]
    (tmp_path / "in.json").write_text(json.dumps(document))
    with pytest.raises(
        CategoryError, match=r"'sports ball' has no annotations left after the degenerate-geometry rule"
    ):
        filter_file(
            str(tmp_path / "in.json"), str(tmp_path / "out.json"), ["person", "sports ball"], FilterOptions()
        )
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        pytest.param(
            _set("images", 1, file_name="img_1.png"), "would write the same mask files", id="same stem"
        ),
        pytest.param(_set("annotations", 0, category_id=300), "not a class id 1..254", id="class id > 254"),
        pytest.param(_set("images", 0, height=0), "images[0].height", id="image height zero"),
    ],
)
def test_mask_rendering_refuses_before_writing_anything(tmp_path, image_dir, change, words):
    document = base_document()
    document["categories"].append({"id": 300, "name": "many"})
    change(document)
    source = tmp_path / "in.json"
    source.write_text(json.dumps(document))
    with pytest.raises(AnnotationError, match=re.escape(words)):
        copy_images_and_masks(str(source), str(image_dir), str(tmp_path / "images"), str(tmp_path / "masks"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.json"]


def test_training_records_leave_out_degenerate_geometry_with_a_warning(tmp_path, image_dir, caplog):
    document = base_document()  # not the filter's output: the reader applies the same rule
    document["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    document["annotations"][2]["bbox"] = [0, 0, -1, 5]
    (tmp_path / "in.json").write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="d2retrain.data.records"):
        records = load_records(str(tmp_path / "in.json"), str(image_dir))
    kept = {record.image_id: len(record.annotations) for record in records}
    assert kept == {1: 1, 2: 1, 3: 2}  # crowd annotation 6 is left out as always
    assert "2 annotations with degenerate geometry left out" in caplog.text


@settings(FUZZ, max_examples=100)
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.lists(st.tuples(*[st.floats(0, 1)] * 4), max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_the_rule_keeps_every_rle_pycocotools_encodes(height, width, rectangles, seed):
    array = np.zeros((height, width), np.uint8, order="F")
    for top, left, bottom, right in rectangles:  # long runs: several characters per count
        array[int(top * height) : int(bottom * height) + 1, int(left * width) : int(right * width) + 1] = 1
    array[np.random.default_rng(seed).random((height, width)) < 0.01] ^= 1  # short runs
    counts = mask_utils.encode(array)["counts"].decode("ascii")
    kept, problem = usable_segmentation({"size": [height, width], "counts": counts}, height, width)
    assert problem is None
    assert np.array_equal(rasterize(kept, height, width), array.astype(bool))
