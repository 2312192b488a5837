"""The size of the caller's terminal, for a container process's terminal to start with."""

from __future__ import annotations

import fcntl
import struct
import termios


def of_caller(fds: tuple[int, ...] = (0, 1, 2)) -> tuple[int, int] | None:
    """(rows, columns) of the first of ``fds`` that is a terminal (TIOCGWINSZ,
    tty_ioctl(4)); None when none is, or its size is not set (0 x 0)."""
    for fd in fds:
        try:
            packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
        except OSError:  # ENOTTY, EBADF
            continue
        rows, cols = struct.unpack("HHHH", packed)[:2]
        return (rows, cols) if rows and cols else None
    return None


def console_size(size: tuple[int, int] | None) -> dict[str, int] | None:
    """``size`` as an OCI ``process.consoleSize`` object (runtime-spec config.md)."""
    return None if size is None else {"height": size[0], "width": size[1]}
