"""Where the demo dataset's files live (no heavy import: the workflow plans with it first)."""

import dataclasses
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["DemoLayout"]


@dataclasses.dataclass(frozen=True)
class DemoLayout:
    """Where :func:`write_demo_dataset` puts its files, relative to its root."""

    root: Path

    def images(self, split: str) -> Path:
        """Folder of a split's JPEG images."""
        return self.root / split

    def annotations(self, split: str) -> Path:
        """COCO instances file of a split."""
        return self.root / "annotations" / f"instances_{split}.json"

    @staticmethod
    def image_names(split: str, count: int) -> list[str]:
        """File names of a split's ``count`` images, in order."""
        return [f"demo_{split}_{number:04d}.jpg" for number in range(count)]

    @property
    def video(self) -> Path:
        """The demo video."""
        return self.root / "video" / "demo.mp4"

    @property
    def video_ground_truth(self) -> Path:
        """The demo video's ground truth (MOTChallenge ``gt.txt`` lines)."""
        return self.root / "video" / "demo.gt.txt"
