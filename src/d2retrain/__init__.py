"""d2retrain: retrain Mask R-CNN on chosen COCO categories."""

__all__ = ["__version__"]

__version__ = "0.1.0"
