"""Filtering to chosen categories and balancing."""

import json

import pytest
from helpers import COCO_MINI, TWO_CPUS, make_coco

from d2retrain.core.errors import AnnotationError, CategoryError, EmptyResultError
from d2retrain.data.coco import encode_coco, parse_coco, read_coco
from d2retrain.data.filtering import FilterOptions, balance_document, filter_document


def document_of(images, **kwargs):
    return parse_coco(json.dumps(make_coco(images, **kwargs)).encode(), source="in.json")


def as_json(document) -> dict:
    return json.loads(encode_coco(document))


def test_filter_renumbers_categories_1_to_n_in_the_order_given():
    out = as_json(
        filter_document(document_of([[1, 37], [3, 37]]), ["sports ball", "person"], FilterOptions())
    )
    assert out["categories"] == [
        {"id": 1, "name": "sports ball", "supercategory": "sports"},
        {"id": 2, "name": "person", "supercategory": "person"},
    ]
    assert [(a["id"], a["category_id"]) for a in out["annotations"]] == [(1, 2), (2, 1), (4, 1)]


def test_filter_keeps_only_images_with_a_chosen_category():
    out = as_json(
        filter_document(document_of([[1], [3], [37, 3]]), ["person", "sports ball"], FilterOptions())
    )
    assert [image["id"] for image in out["images"]] == [1, 3]


def test_filter_keeps_every_other_field_of_images_and_annotations_exactly():
    source = make_coco([[1, 37], [3]])
    out = as_json(filter_document(document_of([[1, 37], [3]]), ["person", "sports ball"], FilterOptions()))
    assert out["info"] == source["info"] and out["licenses"] == source["licenses"]
    assert out["images"] == [source["images"][0]]
    expected = [dict(source["annotations"][0]), dict(source["annotations"][1], category_id=2)]
    assert out["annotations"] == expected


def test_filter_output_is_sorted_by_id_whatever_the_input_order():
    source = make_coco([[1], [1], [1, 1]])
    source["images"].reverse()
    source["annotations"].reverse()
    out = as_json(filter_document(parse_coco(json.dumps(source).encode()), ["person"], FilterOptions()))
    assert [image["id"] for image in out["images"]] == [1, 2, 3]
    assert [annotation["id"] for annotation in out["annotations"]] == [1, 2, 3, 4]


def test_filter_can_keep_images_without_annotations_as_negatives():
    out = filter_document(document_of([[1], [3]]), ["person"], FilterOptions(keep_empty_images=True))
    assert out.image_ids.tolist() == [1, 2]
    assert out.table.ids.tolist() == [1]


def test_filter_drops_small_and_crowd_annotations_when_asked():
    source = make_coco([[1, 1, 1]])
    source["annotations"][1]["iscrowd"] = 1
    document = parse_coco(json.dumps(source).encode())
    assert filter_document(document, ["person"], FilterOptions(drop_crowd=True)).table.ids.tolist() == [1, 3]
    # areas are 11^2, 12^2, 13^2
    assert filter_document(document, ["person"], FilterOptions(min_area=150)).table.ids.tolist() == [3]


def test_min_area_without_area_fields_is_an_error():
    source = make_coco([[1]])
    del source["annotations"][0]["area"]
    with pytest.raises(AnnotationError, match="no 'area'"):
        filter_document(parse_coco(json.dumps(source).encode()), ["person"], FilterOptions(min_area=5))


def test_unknown_category_suggests_close_names():
    with pytest.raises(CategoryError, match="did you mean 'sports ball'"):
        filter_document(document_of([[1]]), ["person", "sport ball"], FilterOptions())


def test_a_chosen_category_without_annotations_is_an_error():
    with pytest.raises(CategoryError, match="'car' has no annotations"):
        filter_document(document_of([[1], [37]]), ["person", "car"], FilterOptions())


@pytest.mark.parametrize("names", [[], ["person", "person"]])
def test_empty_or_repeated_category_lists_are_refused(names):
    with pytest.raises(CategoryError):
        filter_document(document_of([[1]]), names, FilterOptions())


def test_balance_all_keeps_images_holding_every_category_with_all_their_annotations():
    filtered = filter_document(
        document_of([[1, 1, 37], [1], [37], [37, 1, 3]]), ["person", "sports ball"], FilterOptions()
    )
    balanced = balance_document(filtered, "all")
    assert balanced.image_ids.tolist() == [1, 4]
    assert balanced.table.ids.tolist() == [1, 2, 3, 6, 7]
    assert balanced.categories == filtered.categories


def test_balance_none_is_the_identity():
    filtered = filter_document(document_of([[1], [37]]), ["person", "sports ball"], FilterOptions())
    assert balance_document(filtered, "none") is filtered


def test_balance_with_no_image_holding_every_category_is_an_error():
    filtered = filter_document(document_of([[1], [37]]), ["person", "sports ball"], FilterOptions())
    with pytest.raises(EmptyResultError, match="no image holds every category"):
        balance_document(filtered, "all")


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_filter_and_balance_on_coco_mini_agree_with_pycocotools(split):
    from pycocotools.coco import COCO

    path = COCO_MINI / "annotations" / f"instances_{split}.json"
    reference = COCO(str(path))
    names = ["person", "sports ball"]
    category_ids = reference.getCatIds(catNms=names)
    filtered = filter_document(read_coco(path), names, FilterOptions())
    union = set(reference.getImgIds(catIds=category_ids[:1])) | set(
        reference.getImgIds(catIds=category_ids[1:])
    )
    assert set(filtered.image_ids.tolist()) == union
    assert len(filtered.annotations) == len(reference.getAnnIds(catIds=category_ids))
    balanced = balance_document(filtered, "all")
    assert balanced.image_ids.tolist() == sorted(reference.getImgIds(catIds=category_ids))
    assert len(balanced.annotations) == len(
        reference.getAnnIds(imgIds=balanced.image_ids.tolist(), catIds=category_ids)
    )


@pytest.mark.parametrize(
    "bad", [[10, 45_000], [45_000], [10]], ids=["both halves", "second half", "first half"]
)
def test_the_geometry_of_a_large_file_checked_in_two_processes_drops_what_one_process_drops(bad, forks):
    source = make_coco([[1, 1]] * 30_000)  # 60,000 kept annotations: above the size worth a process
    for index in bad:
        source["annotations"][index]["bbox"][2] = 0  # flat box: dropped by the rule
    document = parse_coco(json.dumps(source).encode())
    one, two = (filter_document(document, ["person"], FilterOptions(), processes=n) for n in (1, 2))
    assert len(forks) == (1 if TWO_CPUS else 0)
    assert encode_coco(one) == encode_coco(two)
    assert len(two.annotations) == 60_000 - len(bad)


def test_balance_gives_the_same_images_whatever_the_size_of_the_image_ids():
    small = make_coco([[1, 37], [1], [37, 37, 1], [3, 37]])
    huge = json.loads(json.dumps(small))
    for record in huge["images"] + huge["annotations"]:
        key = "id" if "file_name" in record else "image_id"
        record[key] += 2**62  # past the packed (image, category) key: the other path
    kept = []
    for source in (small, huge):
        document = filter_document(
            parse_coco(json.dumps(source).encode()), ["person", "sports ball"], FilterOptions()
        )
        kept.append([image_id % 2**62 for image_id in balance_document(document, "all").image_ids.tolist()])
    assert kept[0] == kept[1] == [1, 3]
