"""User-facing errors: each says what was wrong, where, and what to do."""

import logging

logger = logging.getLogger(__name__)

__all__ = [
    "D2RetrainError",
    "InputFileError",
    "AnnotationError",
    "CategoryError",
    "EmptyResultError",
    "UnsafePathError",
    "WeightsError",
]


class D2RetrainError(Exception):
    """Base class of errors a user can cause; the CLI prints the message and exits 2."""


class InputFileError(D2RetrainError):
    """An input file is missing, unreadable, or not valid JSON."""


class AnnotationError(D2RetrainError):
    """A COCO document breaks a rule (missing keys, duplicate ids, dangling references)."""


class CategoryError(D2RetrainError):
    """A requested category is unknown or has no annotations."""


class EmptyResultError(D2RetrainError):
    """A step would write an empty dataset."""


class UnsafePathError(D2RetrainError):
    """A file name escapes the folder it must stay in."""


class WeightsError(D2RetrainError):
    """Base weights that cannot be found, fetched or trusted."""
