"""One way to replace a file atomically: a private temp file beside it, fsynced, then renamed over it.

A reader sees the old file or the new one, never half of one, even after a crash; each writer has its
own temp file, so two writers of one path leave one whole file, and a failed write leaves no temp file.
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces ``path``. ``mode``: the file's permissions
    (mkstemp makes it 0600, which hides it from processes of another user); None keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
