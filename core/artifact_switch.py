"""The file-system steps that make a set current, each all or nothing: the publish lock, the move of a
validated set into ``versions/`` (a copy when it is staged on another file system), and the switch of
``current`` in one rename. ``ArtifactStore`` runs them in order; see ``core.artifacts`` for the layout."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.artifact_files import CURRENT, LOCK_FILE, VERSIONS, ArtifactError, fsync_dir, mkdir_shared, os_failure

log = logging.getLogger(__name__)


@contextmanager
def publish_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """One publish / rollback / prune at a time under ``root``, across processes and users."""
    path = root / LOCK_FILE
    try:
        mkdir_shared(root)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:  # another user's lock file: flock needs only a readable descriptor
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_failure(f"open the publish lock {path}", exc) from None
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o044 != 0o044:
            os.fchmod(fd, (st.st_mode | 0o444) & 0o7777)  # other users' publishers must be able to open it
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ArtifactError(f"another publisher has held {path} for {timeout_s:g} s") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def move_in(source: Path, target: Path) -> bool:
    """Move a validated staging folder to ``target`` in ``versions/``; True when it had to be copied (another
    file system), in which case the source is left for the caller to remove once the publish is done."""
    versions_dir = target.parent
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise os_failure(f"move {source} to {target}", exc) from None
        incoming = versions_dir / f".incoming-{target.name}-{secrets.token_hex(4)}"
        try:
            # File by file, not copytree: a validated set holds plain files only, and copytree would
            # collect a full disk's errors into one list instead of stopping with the first errno.
            incoming.mkdir()
            for path in source.iterdir():
                copied_file = Path(shutil.copy2(path, incoming / path.name))
                with copied_file.open("rb") as fh:
                    os.fsync(fh.fileno())
            shutil.copystat(source, incoming)  # the folder's mode too: searchable by the workers' user
            fsync_dir(incoming)
            os.rename(incoming, target)
        except OSError as copy_exc:
            shutil.rmtree(incoming, ignore_errors=True)
            raise os_failure(f"copy {source} to {target}", copy_exc) from None
        copied = True
    else:
        copied = False
    try:
        fsync_dir(versions_dir)
    except OSError as exc:
        log.warning("%s: fsync failed (%s)", versions_dir, exc)
    return copied


def move_back(target: Path, source: Path, copied: bool, current: str | None) -> None:
    """Undo ``move_in`` after a failed switch, so the staging folder can be published again. ``current``:
    the version ``current`` names now (None when missing or unusable)."""
    if current == target.name:
        return  # the switch did happen: the version is published and stays
    if copied:
        shutil.rmtree(target, ignore_errors=True)  # the staging original is still in place
        return
    try:
        os.rename(target, source)
    except OSError as exc:
        log.error("could not move %s back to %s (%s): it stays there, unpublished", target, source, exc)


def switch_current(root: Path, version: str) -> None:
    """Point ``current`` at ``version`` in one rename; readers see the old target or the new one."""
    link = root / CURRENT
    tmp = root / f".current-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(f"{VERSIONS}/{version}", tmp)
    try:
        if link.is_dir() and not link.is_symlink():
            _retire_plain_current(link)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fsync_dir(root)
    except OSError as exc:  # every reader already sees the new target; only durability is in doubt
        log.warning("%s -> %s switched, but fsync of %s failed: %s", link, version, root, exc)


def _retire_plain_current(link: Path) -> None:
    """Remove a plain ``current/`` directory made by hand, if it holds dotfiles only (``.gitkeep``)."""
    leftovers = [p.name for p in link.iterdir() if not p.name.startswith(".")]
    if leftovers:
        raise ArtifactError(f"{link} is a plain directory holding {leftovers}: move them into a staged "
                            "version and publish it; nothing is deleted")
    shutil.rmtree(link)
