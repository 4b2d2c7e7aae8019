"""Reading a file that a dataset names: regular files only, never a read that blocks or never ends.

A table row can point at anything: ``/dev/zero`` (hashed forever), a FIFO (``open`` blocks
until a writer appears), a folder, a socket. :func:`read_regular_file` opens without
blocking and checks the opened descriptor with ``fstat``, so what is checked is what is
read; anything but a regular file is an :class:`UnreadableFile` naming what it is.
"""
from __future__ import annotations

import os
import stat


class UnreadableFile(ValueError):
    """A file that cannot or must not be read; ``reason`` says why (for that item's failure)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular_reason(mode: int) -> str:
    return f"{file_kind(mode)}, not a regular file; only regular files are read"


def open_regular(path: str | os.PathLike) -> int:
    """A descriptor of ``path`` opened for reading (blocking reads), or :class:`UnreadableFile`."""
    source = os.fspath(path)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnreadableFile(source, "file not found") from None
    except IsADirectoryError:
        raise UnreadableFile(source, not_regular_reason(stat.S_IFDIR)) from None
    except OSError as exc:
        raise UnreadableFile(source, f"cannot read file ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(source, not_regular_reason(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """A regular file's bytes (at most ``max_bytes`` long, else :class:`UnreadableFile`)."""
    source = os.fspath(path)
    fd = open_regular(source)
    with os.fdopen(fd, "rb", closefd=True) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise UnreadableFile(source, f"the file is {size / 2**20:,.1f} MiB, over the memory budget of one image "
                                         f"({max_bytes / 2**20:,.0f} MiB)")
        try:
            return f.read()
        except OSError as exc:
            raise UnreadableFile(source, f"cannot read file ({exc.strerror or exc})") from None
