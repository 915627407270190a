"""COCO's 80 categories by name: the rows of a COCO model a class starts from, whatever its dataset's ids.

Head surgery and the baseline match a class to COCO by its name (after ``model.coco_names``
aliases), never by the category id of the user's annotation file: a dataset numbering ``person`` 7,
or naming its own ``widget`` 1, gets the right rows, or none.
"""

import logging
from collections.abc import Mapping, Sequence

from d2retrain.core.errors import D2RetrainError

logger = logging.getLogger(__name__)

__all__ = ["COCO_CATEGORIES", "coco_category_ids"]

# (id, name) of COCO 2014/2017 instances files, in their order.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)

_ID_OF_NAME = {name: category_id for category_id, name in COCO_CATEGORIES}


def coco_category_ids(classes: Sequence[str], aliases: Mapping[str, str]) -> tuple[int | None, ...]:
    """The COCO category id of each class (None: not a COCO category), in model order.

    Args:
        classes: Class names in model order.
        aliases: ``model.coco_names``: class name -> COCO name, for classes named otherwise.

    Raises:
        D2RetrainError: An alias names no COCO category.
    """
    unknown = {name: coco for name, coco in aliases.items() if coco not in _ID_OF_NAME}
    if unknown:
        raise D2RetrainError(
            f"model.coco_names maps {unknown} to names that are not COCO categories; use COCO's names "
            f"(e.g. {', '.join(name for _, name in COCO_CATEGORIES[:4])}, ...)"
        )
    return tuple(_ID_OF_NAME.get(aliases.get(name, name)) for name in classes)
