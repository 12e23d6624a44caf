"""Checks on the files a user names, before anything heavy is imported: the command line reports
a missing, special or empty file in a blink, and loaders never open a FIFO (which blocks) or
/dev/zero (which never ends)."""
from __future__ import annotations

import os
import stat

from .errors import BadModelFile, first_line

__all__ = ["regular_file", "readable_file"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | os.PathLike, fd: int | None = None) -> os.stat_result:
    """The stat of `path` (symlinks followed; of the open `fd` when given) if it is a regular file,
    else BadModelFile ("PATH: is a FIFO, not a regular file"). Loaders call it before opening a
    file: opening a FIFO blocks until someone writes to it, and /dev/zero never ends."""
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError as e:
        why = "no such file" if isinstance(e, FileNotFoundError) else e.strerror or first_line(e)
        why = "a broken symbolic link" if isinstance(e, FileNotFoundError) and os.path.islink(path) else why
        raise BadModelFile(path, f"cannot read ({why})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise BadModelFile(path, f"is {kind}, not a regular file")
    return st


def readable_file(path: str | os.PathLike) -> None:
    """:func:`regular_file`, and not empty ("PATH: empty file (0 bytes)")."""
    if regular_file(path).st_size == 0:
        raise BadModelFile(path, "empty file (0 bytes)")
