"""The one image reader: training, evaluation, the report's grid and inference all see the same pixels."""

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from d2retrain.core.errors import InputFileError

logger = logging.getLogger(__name__)

__all__ = ["read_image"]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as BGR uint8, turned upright by its EXIF orientation.

    detectron2's rule (``detectron2.data.detection_utils.read_image``): a phone photo stored
    sideways with an orientation tag is read as it is displayed, for training as for prediction,
    so its annotations (made on the displayed image) and its predictions line up.

    Raises:
        InputFileError: The file is missing, empty, truncated or not an image.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read ({error.strerror})") from None
    if not data:
        raise InputFileError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputFileError(f"{path}: not a readable image ({error})") from None
    return np.ascontiguousarray(np.asarray(upright)[:, :, ::-1])
