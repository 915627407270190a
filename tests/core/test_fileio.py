"""Atomic writes: what a kill leaves, and its removal."""

import stat
import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest

from d2retrain.core.fileio import atomic_open, remove_leftovers
from d2retrain.infer.videoio import VideoWriter

# A child that starts a write of `a.json` and an MP4 encode of `v.mp4` in `folder`, then is killed
# (SIGKILL: no cleanup runs) while both are under way.
KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from fractions import Fraction
    from pathlib import Path
    import numpy as np
    from d2retrain.core.fileio import atomic_open
    from d2retrain.infer.videoio import VideoWriter

    folder = Path(sys.argv[1])
    video = VideoWriter(folder / "v.mp4", Fraction(10), 64, 48)
    video.write(np.zeros((48, 64, 3), np.uint8))
    with atomic_open(folder / "a.json") as handle:
        handle.write(b"[" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_write_leaves_hidden_temporaries_that_remove_leftovers_takes_and_no_other(tmp_path):
    others = [".a.json.json.abcdefgh.tmp", ".a.json.tmp", ".b.json.abcdefgh.tmp", "a.json.abcdefgh.tmp"]
    for name in others:  # another file's temporary, hidden files that are no temporaries
        (tmp_path / name).write_text("x")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], check=False)
    assert killed.returncode == -9
    new = sorted(p.name for p in tmp_path.iterdir() if p.name not in others)
    assert len(new) == 2 and not {"a.json", "v.mp4"} & set(new), new
    assert remove_leftovers(tmp_path, {"a.json", "v.mp4"}.__contains__) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert remove_leftovers(tmp_path / "missing", lambda name: True) == 0


def test_an_atomic_write_is_whole_and_readable_or_absent(tmp_path):
    target = tmp_path / "sub" / "a.json"
    with atomic_open(target) as handle:
        handle.write(b"{}")
    assert target.read_bytes() == b"{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    with pytest.raises(ValueError), atomic_open(target) as handle:
        handle.write(b"[")
        raise ValueError
    assert target.read_bytes() == b"{}" and [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_an_encoded_video_is_renamed_into_place_readable_by_all(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", Fraction(10), 64, 48) as video:
        for value in (0, 255):
            video.write(np.full((48, 64, 3), value, np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    assert stat.S_IMODE((tmp_path / "v.mp4").stat().st_mode) == 0o644
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2
