"""Atomic writes: a crash never leaves a half file that looks complete."""

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from d2retrain.core.errors import D2RetrainError

if TYPE_CHECKING:  # matplotlib costs ~0.3 s to import: only commands that plot pay it
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "file_digest",
    "NoSpaceError",
    "atomic_open",
    "link_or_copy",
    "copy_files",
    "remove_leftovers",
    "temporary_beside",
    "write_through_temporary",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_figure",
]

# Write errors that mean "no room": a full disk, a file-size limit (ulimit -f), a quota.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# A temporary beside ``name``: ``.<name>.<8 characters of mkstemp>.tmp``.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


class NoSpaceError(D2RetrainError):
    """A write failed for lack of space; nothing partial was left behind."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], durable: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` on success.

    A killed process never leaves a partial ``path``; ``durable`` also flushes the data
    to the disk before the rename, so it survives a power loss (for checkpoints).

    Args:
        path: Final destination. Its parent folder is created when missing.
        durable: fsync before renaming.

    Yields:
        A binary file object. On an exception the temporary file is removed and
        ``path`` is left as it was.

    Raises:
        NoSpaceError: The disk, a quota or the file-size limit ran out while writing.
    """
    target = Path(path)
    fd, tmp_name = _make_temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            raise NoSpaceError(
                f"{target}: no space left to write it ({error.strerror or error}); nothing was written. "
                "Free disk space (or raise the quota or file-size limit) and rerun"
            ) from None
        raise


def _make_temporary(target: Path) -> tuple[int, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o644)  # readable by all once renamed, not mkstemp's 0600
    return fd, name


def temporary_beside(path: str | os.PathLike[str]) -> Path:
    """Create an empty hidden temporary file beside ``path`` for a writer that renames it onto
    ``path`` when done (named as :func:`atomic_open` names its own, so that
    :func:`remove_leftovers` finds both)."""
    fd, name = _make_temporary(Path(path))
    os.close(fd)
    return Path(name)


def write_through_temporary(path: str | os.PathLike[str], write: Callable[[Path], T]) -> T:
    """Atomically write a file through a writer that takes a path (``torch.onnx.export``,
    ``torch.jit.save``...): ``write(temporary)``, then the temporary renamed onto ``path``.

    Args:
        path: Destination file.
        write: Writes the file at the path it is given.

    Returns:
        What ``write`` returned.
    """
    temporary = temporary_beside(path)
    try:
        result = write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return result


def remove_leftovers(folder: str | os.PathLike[str], of: Callable[[str], bool]) -> int:
    """Remove the temporaries that writes cut short by a kill left in ``folder``.

    Args:
        folder: Where the writes went (a missing folder has none).
        of: Whether a file name is one of the caller's: only temporaries of such files are
            removed, so writers of other files in the same folder are left alone.

    Returns:
        How many were removed.
    """
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match and of(match["name"]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    if removed:
        logger.info("removed %d temporary file(s) of writes cut short in %s", removed, folder)
    return removed


def link_or_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make ``target`` the file ``source``: a hard link where the file system allows, else a copy;
    either appears at once (through a temporary beside ``target``), never half written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(target)
    try:
        temporary.unlink()
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copy2(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def copy_files(sources: Mapping[str, str], targets: Mapping[str, str]) -> None:
    """Copy each of ``sources`` to the target of the same name, each appearing at once.

    Copies, not hard links, where Snakemake touches the targets after the job: a touch of a hard
    link is a touch of its source, which would make the source's own consumers look outdated.

    Raises:
        KeyError: A target without a source.
    """
    for name, target in targets.items():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        write_through_temporary(target, functools.partial(shutil.copyfile, sources[name]))
        logger.info("%s -> %s", sources[name], target)


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: Destination file.
        data: Bytes to write.
    """
    with atomic_open(path) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically.

    Args:
        path: Destination file.
        text: Text to write.
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def write_figure(path: str | os.PathLike[str], figure: "Figure", title: str) -> None:
    """Title, lay out and save a matplotlib figure as PNG atomically, then close it.

    Args:
        path: PNG destination.
        figure: The figure.
        title: Its title.
    """
    import io

    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
