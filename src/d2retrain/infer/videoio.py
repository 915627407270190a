"""Video in and out with PyAV: frames decoded ahead in a thread, H.264 yuv420p that browsers play.
A folder of frames (image files in name order) reads as a video too."""

import configparser
import dataclasses
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import cv2
import numpy as np

from d2retrain.core.errors import InputFileError
from d2retrain.core.fileio import temporary_beside
from d2retrain.data.images import read_image
from d2retrain.infer.inputs import frame_files

logger = logging.getLogger(__name__)

__all__ = [
    "VideoInfo",
    "probe",
    "read_frames",
    "sequence_info",
    "VideoWriter",
    "ahead",
    "yield_to_the_model",
]

T = TypeVar("T")
_DONE = object()


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream.

    Attributes:
        width: Frame width.
        height: Frame height.
        rate: Frames per second (average rate, else the guessed rate).
        frames: Frame count from the container (0 when it does not say).
    """

    width: int
    height: int
    rate: Fraction
    frames: int


def probe(path: str | Path, folder_rate: float = 25) -> VideoInfo:
    """Open a video and read its stream's size, rate and frame count. A folder of frames: the size
    of its first frame, the rate its MOTChallenge ``seqinfo.ini`` gives (in the folder or the one
    above, ``frameRate``), else ``folder_rate``.

    Raises:
        InputFileError: Empty, not a video, or without a video stream; a folder without frames.
    """
    if Path(path).is_dir():
        return _probe_frames(Path(path), folder_rate)
    if Path(path).stat().st_size == 0:
        raise InputFileError(f"{path}: empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputFileError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise InputFileError(f"{path}: the video stream has no frame rate")
            return VideoInfo(stream.width, stream.height, Fraction(rate), stream.frames or 0)
    except av.FFmpegError as error:
        raise InputFileError(f"{path}: not a readable video ({error})") from None


def _probe_frames(folder: Path, rate: float) -> VideoInfo:
    files = frame_files(folder)
    if not files:
        raise InputFileError(f"{folder}: a folder without image files")
    height, width = read_image(files[0]).shape[:2]
    ini = sequence_info(folder)
    if ini is not None:
        parser = configparser.ConfigParser()
        try:
            parser.read(ini)
            rate = float(parser.get("Sequence", "frameRate", fallback=str(rate)))
        except (configparser.Error, ValueError) as error:
            raise InputFileError(f"{ini}: unreadable ({error})") from None
        if not 0 < rate <= 1000:
            raise InputFileError(f"{ini}: frameRate {rate} is not a frame rate (above 0, at most 1000)")
    return VideoInfo(width, height, Fraction(rate).limit_denominator(1001), len(files))


def sequence_info(folder: str | Path) -> Path | None:
    """The MOTChallenge ``seqinfo.ini`` of a folder of frames (in it, or the one above), if any."""
    for ini in (Path(folder) / "seqinfo.ini", Path(folder).parent / "seqinfo.ini"):
        if ini.is_file():
            return ini
    return None


def _read_folder(folder: Path, max_frames: int) -> Iterator[np.ndarray]:
    size = None
    for index, path in enumerate(frame_files(folder)):
        if max_frames and index >= max_frames:
            return
        frame = read_image(path)
        if size is None:
            size = frame.shape[:2]
        elif frame.shape[:2] != size:
            raise InputFileError(
                f"{path}: {frame.shape[1]}x{frame.shape[0]}, but the first frame is {size[1]}x{size[0]}"
            )
        yield frame


def read_frames(path: str | Path, max_frames: int = 0) -> Iterator[np.ndarray]:
    """Decode a video's frames (or read a folder's) as BGR uint8 arrays, one at a time.

    Args:
        path: The video.
        max_frames: Stop after this many frames (0: all).

    Yields:
        Frames in order.

    Raises:
        InputFileError: The stream breaks off (the frames before it were yielded); a frame of a
            folder is unreadable or of another size than the first.
    """
    if Path(path).is_dir():
        yield from _read_folder(Path(path), max_frames)
        return
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if max_frames and index >= max_frames:
                    return
                yield frame.to_ndarray(format="bgr24")
    except av.FFmpegError as error:
        raise InputFileError(f"{path}: decoding stopped ({error})") from None


def yield_to_the_model() -> None:
    """Lower the calling thread's scheduling priority to the lowest (nice 19), on Linux.

    Decoding, drawing and encoding threads then run on what the model's threads leave free
    instead of pre-empting them in the middle of a parallel operator, where the other threads of
    that operator would wait: on 2 busy cores this took the workflow's images from 0.97x to
    1.03x of a plain predict loop, and video from 0.95x to 0.99x of the bare model. The
    bounded queues between the threads keep the model from running ahead for long, and the
    threads that codecs start from such a thread inherit its priority. Elsewhere, nothing.
    """
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as error:  # a sandbox that forbids it: run at the normal priority
            logger.debug("thread priority unchanged: %s", error)


def ahead(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Iterate ``items`` in a background thread of low priority (:func:`yield_to_the_model`),
    up to ``depth`` items ahead of the consumer.

    An exception raised by ``items`` is raised again here, after the items before it.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        yield_to_the_model()
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
        except BaseException as error:  # handed to the consumer
            slots.put((None, error))
        slots.put((_DONE, None))

    thread = threading.Thread(target=produce, name="ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class VideoWriter:
    """H.264 (libx264, yuv420p, ``+faststart``) MP4 written to a temporary file, renamed into place
    by :meth:`close` so an interrupted encode never leaves a half video under the final name."""

    def __init__(self, path: str | Path, rate: Fraction, width: int, height: int, crf: int = 23) -> None:
        """Args:
        path: The MP4 to write.
        rate: Frames per second (kept exactly).
        width: Frame width; an odd size is padded by one pixel (yuv420p needs even sizes).
        height: Frame height (same).
        crf: x264 quality (lower is better and larger).
        """
        self.path = Path(path)
        self._temporary = temporary_beside(self.path)
        try:
            self._container = av.open(
                str(self._temporary), mode="w", format="mp4", options={"movflags": "+faststart"}
            )
        except BaseException:
            self._temporary.unlink(missing_ok=True)
            raise
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._time_base = 1 / Fraction(rate)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        # a fixed thread count: x264's output depends on it (by default, the machine's cores), and a
        # drawn video is then the same on a laptop, a GPU box and a SLURM node
        self._stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "4"}
        self.frames = 0

    def write(self, frame_bgr: np.ndarray) -> None:
        """Encode one BGR uint8 frame."""
        height, width = frame_bgr.shape[:2]
        if (width, height) != (self._stream.width, self._stream.height):
            frame_bgr = cv2.copyMakeBorder(
                frame_bgr,
                0,
                self._stream.height - height,
                0,
                self._stream.width - width,
                cv2.BORDER_REPLICATE,
            )
        frame = av.VideoFrame.from_ndarray(frame_bgr, format="bgr24")
        frame.pts = self.frames
        frame.time_base = self._time_base
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and move the file into place."""
        self._container.mux(self._stream.encode())
        self._container.close()
        os.replace(self._temporary, self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        try:
            self._container.close()
        finally:
            self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        """Open for writing."""
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        """Close on success, drop the temporary file on an exception."""
        if kind is None:
            self.close()
        else:
            self.abort()
