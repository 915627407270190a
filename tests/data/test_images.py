"""One image reader, EXIF orientation applied, for training, evaluation, the report's grid and inference."""

import json

import numpy as np
import pytest
from PIL import Image

from d2retrain import report
from d2retrain.core.errors import InputFileError
from d2retrain.data import images
from d2retrain.data.images import read_image
from d2retrain.data.records import load_records
from d2retrain.infer.pipeline import load_image
from d2retrain.model import evaluation
from d2retrain.model.evaluation import predict_split
from d2retrain.model.instances import Instances
from d2retrain.train import samples
from d2retrain.train.samples import TrainSamples

STORED = (60, 30)  # width, height as the file stores the pixels
UPRIGHT = (30, 60)  # as displayed with EXIF orientation 6 (rotate 90 degrees clockwise)


@pytest.fixture
def rotated_photo(tmp_path):
    """A sideways phone photo: red left third, blue elsewhere, tagged to be shown rotated; and a
    COCO file of its upright size with one box around the top of the upright picture."""
    pixels = np.zeros((STORED[1], STORED[0], 3), np.uint8)
    pixels[:, :] = (0, 0, 255)
    pixels[:, :20] = (255, 0, 0)
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6
    picture.save(tmp_path / "photo.png", exif=exif)
    document = {
        "images": [{"id": 1, "file_name": "photo.png", "width": UPRIGHT[0], "height": UPRIGHT[1]}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 30, 20],
                "segmentation": [[0, 0, 30, 0, 30, 20, 0, 20]],
                "area": 600,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "photo.json").write_text(json.dumps(document))
    return tmp_path


def test_a_sideways_photo_is_read_upright_with_its_stored_left_edge_on_top(rotated_photo):
    image = read_image(rotated_photo / "photo.png")
    assert image.shape == (UPRIGHT[1], UPRIGHT[0], 3)
    # rotated clockwise: the stored left third (red) is now the top third; BGR order
    assert (image[:20, :, 2] > 200).all() and (image[:20, :, 0] < 50).all()
    assert (image[20:, :, 0] > 200).all()


def test_training_sees_the_upright_photo_and_its_mask_on_the_red_band(rotated_photo):
    (sample,) = [
        TrainSamples(load_records(str(rotated_photo / "photo.json"), str(rotated_photo)), 0, False)[0]
    ]
    tensor, target = sample
    assert tuple(tensor.shape) == (3, UPRIGHT[1], UPRIGHT[0])
    mask = target["masks"][0].numpy().astype(bool)
    red = tensor[0].numpy() > 0.8
    assert mask.sum() > 0 and red[mask].all()


def test_evaluation_predicts_on_the_upright_photo(rotated_photo):
    seen = []

    def predictor(image):
        seen.append(image.shape)
        return Instances(
            np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, *image.shape[:2]), bool)
        )

    predict_split(predictor, str(rotated_photo / "photo.json"), str(rotated_photo), ["thing"])
    assert seen == [(UPRIGHT[1], UPRIGHT[0], 3)]


def test_inference_reads_the_same_pixels_as_training(rotated_photo):
    assert np.array_equal(load_image(rotated_photo / "photo.png"), read_image(rotated_photo / "photo.png"))


def test_every_reader_of_images_is_the_one_reader():
    assert evaluation.read_image is report.read_image is samples.read_image is images.read_image


@pytest.mark.parametrize("content", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_unreadable_files_are_named_in_the_error(tmp_path, content):
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(InputFileError, match=r"bad\.jpg"):
        read_image(tmp_path / "bad.jpg")
