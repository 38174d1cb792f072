"""atomic_write: the old file or the new one, never half; no temp file left; permissions as asked."""

import stat
from pathlib import Path

import pytest

from core.atomic_files import atomic_write


def test_a_clean_write_replaces_the_file_with_the_mode_asked(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.bin"
    with atomic_write(path, mode=0o644) as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o644
    with atomic_write(path) as fh:  # no mode: mkstemp's private one
        fh.write(b"newer")
    assert path.read_bytes() == b"newer" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(path, mode=0o644) as fh:
            fh.write(b"half")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
