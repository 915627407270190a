"""Mask paste of exported models: equal to torchvision's and detectron2's own, box by box."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from d2retrain.model.paste import paste_masks

HEIGHT, WIDTH = 60, 80
# inside, past the top-left corner, past the bottom-right, under a pixel, the whole image, thin
BOXES = np.array(
    [
        [10.3, 5.7, 40.2, 50.9],
        [-5.5, -3.2, 20.1, 12.4],
        [70.4, 50.2, 95.0, 70.0],
        [30.0, 30.0, 30.6, 30.4],
        [0.2, 0.1, 79.9, 59.8],
        [12.5, 40.0, 13.9, 44.0],
    ],
    np.float32,
)


@pytest.fixture
def masks() -> np.ndarray:
    return np.random.default_rng(0).random((len(BOXES), 28, 28)).astype(np.float32)


def test_the_torchvision_paste_equals_torchvisions_paste_masks_in_image(masks):
    expected = paste_masks_in_image(
        torch.from_numpy(masks)[:, None], torch.from_numpy(BOXES), (HEIGHT, WIDTH)
    )
    pasted = paste_masks(masks, BOXES, HEIGHT, WIDTH, "torchvision_paste")
    np.testing.assert_allclose(pasted, expected[:, 0].numpy(), atol=1e-5)
    assert np.count_nonzero(pasted[2]) > 0 and np.count_nonzero(pasted[3]) > 0  # past the edge, under a pixel


@pytest.mark.detectron2
def test_the_detectron2_paste_equals_detectron2s_on_a_cpu(masks):
    from detectron2.layers.mask_ops import _do_paste_mask

    expected = np.zeros((len(BOXES), HEIGHT, WIDTH), np.float32)
    for index, (mask, box) in enumerate(zip(masks, BOXES, strict=True)):  # its CPU path: one box at a time
        region, where = _do_paste_mask(
            torch.from_numpy(mask)[None, None], torch.from_numpy(box)[None], HEIGHT, WIDTH
        )
        expected[index][where] = region[0].numpy()
    np.testing.assert_allclose(
        paste_masks(masks, BOXES, HEIGHT, WIDTH, "detectron2_paste"), expected, atol=1e-5
    )


@pytest.mark.parametrize("method", ["torchvision_paste", "detectron2_paste"])
def test_no_instance_gives_no_mask_and_a_box_outside_the_image_an_empty_one(method):
    assert paste_masks(
        np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), 5, 7, method
    ).shape == (0, 5, 7)
    outside = paste_masks(
        np.ones((1, 28, 28), np.float32), np.array([[90, 70, 99, 80]], np.float32), 60, 80, method
    )
    assert outside.shape == (1, 60, 80) and not outside.any()
