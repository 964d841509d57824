"""Whole files written atomically: a reader, or a crash, sees the old file or the new one.

The new content goes to a temporary file beside the target (a rename is atomic only within one
file system), which is fsynced and then renamed over the target; the folder is fsynced too, so
that the rename itself survives a power loss. The temporary file is removed if writing fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` for the block to write; renames it over `path` if
    the block succeeds. The block may open the path as it likes (a library writing to a path
    name, say) but must have closed it when the block ends."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    make_dirs(folder)
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    # Created here, with the permissions any new file gets (umask), so that the name is taken.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temp
        fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    fsync_path(folder)


def make_dirs(folder: str | os.PathLike) -> None:
    """os.makedirs, with each new folder's entry made durable in its parent."""
    folder = os.path.abspath(folder)
    if os.path.isdir(folder):
        return
    make_dirs(os.path.dirname(folder))
    try:
        os.mkdir(folder)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise
        return  # another process made it meanwhile, and fsyncs it
    fsync_path(os.path.dirname(folder))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync of a file or folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (and FUSE mounts) cannot fsync a folder; its file was fsynced.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)
