"""Reading and validating COCO files."""

import dataclasses
import json

import msgspec
import numpy as np
import pytest
from helpers import TWO_CPUS, make_coco

from d2retrain.core.errors import AnnotationError, InputFileError, UnsafePathError
from d2retrain.data.coco import encode_coco, parse_coco, renumber_category
from d2retrain.data.fields import check_file_name


def encoded(document: dict) -> bytes:
    return json.dumps(document).encode()


def test_parse_reads_ids_references_and_categories():
    document = parse_coco(encoded(make_coco([[1, 37], [3]])))
    assert document.image_ids.tolist() == [1, 2]
    assert document.table.ids.tolist() == [1, 2, 3]
    assert document.table.image_ids.tolist() == [1, 1, 2]
    assert document.table.category_ids.tolist() == [1, 37, 3]
    assert [c.name for c in document.categories] == ["person", "car", "sports ball"]


def test_encode_round_trips_every_field_and_key_order():
    source = make_coco([[1, 37], [3]])
    source["extra_top_level"] = {"kept": True}
    assert json.loads(encode_coco(parse_coco(encoded(source)))) == source
    assert list(json.loads(encode_coco(parse_coco(encoded(source))))) == list(source)


def test_a_large_file_decoded_in_two_processes_gives_the_same_table_and_names_a_bad_record_by_index(forks):
    source = make_coco([[1, 3]] * 30_000)  # 60,000 annotations: above the size worth a process
    one, two = (parse_coco(encoded(source), processes=n).table for n in (1, 2))
    assert len(forks) == (1 if TWO_CPUS else 0)
    for field in dataclasses.fields(one):
        np.testing.assert_array_equal(getattr(one, field.name), getattr(two, field.name))
    source["annotations"][45_000]["image_id"] = "x"
    with pytest.raises(AnnotationError, match=r"annotations\[45000\]"):
        parse_coco(encoded(source), processes=2)


def test_missing_area_reads_as_nan():
    source = make_coco([[1]])
    del source["annotations"][0]["area"]
    assert np.isnan(parse_coco(encoded(source)).table.area[0])


def _broken(change) -> bytes:
    document = make_coco([[1, 37], [3]])
    change(document)
    return encoded(document)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b'{"images": [', InputFileError, "not valid JSON"),
        (b"[1, 2]", AnnotationError, "top level must be a JSON object"),
        (_broken(lambda d: d.pop("annotations")), AnnotationError, "missing key(s) annotations"),
        (_broken(lambda d: d.pop("categories")), AnnotationError, "missing key(s) categories"),
        (
            _broken(lambda d: d["images"].append(dict(d["images"][0]))),
            AnnotationError,
            "image id 1 appears more",
        ),
        (
            _broken(lambda d: d["annotations"].append(dict(d["annotations"][0]))),
            AnnotationError,
            "annotation id 1 appears more",
        ),
        (
            _broken(lambda d: d["annotations"][1].update(image_id=99)),
            AnnotationError,
            "annotations[1].image_id is 99",
        ),
        (
            _broken(lambda d: d["annotations"][2].update(category_id=5)),
            AnnotationError,
            "annotations[2].category_id is 5",
        ),
        (_broken(lambda d: d["annotations"][0].update(id="7")), AnnotationError, "annotations[0].id"),
        (_broken(lambda d: d["images"][1].update(id=2.5)), AnnotationError, "images[1].id"),
        (_broken(lambda d: d["annotations"][0].update(id=0)), AnnotationError, "has id 0"),
        (_broken(lambda d: d["images"][0].update(file_name="/etc/passwd")), UnsafePathError, "absolute"),
        (_broken(lambda d: d["images"][0].update(file_name="../x.jpg")), UnsafePathError, "climbs out"),
    ],
)
def test_bad_documents_raise_a_clear_error(data, error, words):
    with pytest.raises(error) as caught:
        parse_coco(data, source="bad.json")
    assert words in str(caught.value)
    assert "bad.json" in str(caught.value)


@pytest.mark.parametrize("name", ["a/b.jpg", "b.jpg", "with space é.jpg"])
def test_relative_file_names_are_accepted(name):
    check_file_name(name, where="x")


@pytest.mark.parametrize("name", ["", "/abs.jpg", "C:\\x.jpg", "a/../../b.jpg", "..\\b.jpg"])
def test_escaping_file_names_are_refused(name):
    with pytest.raises(UnsafePathError):
        check_file_name(name, where="x")


def test_renumber_category_changes_only_that_value():
    raw = msgspec.Raw(b'{"id":5,"category_id":37,"segmentation":[[1.50,2,3,4,5,6]],"x":"y"}')
    assert (
        bytes(renumber_category(raw, 2))
        == b'{"id":5,"category_id":2,"segmentation":[[1.50,2,3,4,5,6]],"x":"y"}'
    )


def test_renumber_category_with_a_nested_key_of_the_same_name_rewrites_only_the_top_level():
    raw = msgspec.Raw(b'{"category_id":37,"meta":{"category_id":9}}')
    assert json.loads(bytes(renumber_category(raw, 1))) == {"category_id": 1, "meta": {"category_id": 9}}
