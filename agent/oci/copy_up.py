"""``tmpcopyup``: a tmpfs mounted over a directory of the image starts with that directory's
content, as runc and crun do for this extension option (podman asks for it on every
``--tmpfs``; docker's image VOLUMEs get it from ``pysandbox run``).

:func:`copy_tree` copies what a directory fd shows (the directory the tmpfs now hides,
opened before the mount) into the new tmpfs: directories, regular files, symlinks, device
nodes and fifos, with their modes, owners and times (sockets are left out, as a copy of one
would be a dead file). Everything is reached through directory fds with ``O_NOFOLLOW`` and
``dir_fd``: a symlink in the image is copied as a symlink, never followed. Written with
``os`` here because the guest image carries no copy library that works on fds
(shutil.copytree follows paths).
"""

from __future__ import annotations

import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


def copy_tree(source_fd: int, target: str) -> None:
    """Copy the content of directory ``source_fd`` into the empty directory ``target``, then
    give ``target`` the source's mode and owner. OSError as the first failing call raises
    it (ENOSPC when the tmpfs is too small)."""
    target_fd = os.open(target, _DIR_FLAGS)
    try:
        _copy_dir(source_fd, target_fd)
        st = os.fstat(source_fd)
        os.fchown(target_fd, st.st_uid, st.st_gid)
        os.fchmod(target_fd, stat.S_IMODE(st.st_mode))
    finally:
        os.close(target_fd)


def _copy_dir(source_fd: int, target_fd: int) -> None:
    for name in os.listdir(source_fd):
        st = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=target_fd)
            inner_source = os.open(name, _DIR_FLAGS, dir_fd=source_fd)
            try:
                inner_target = os.open(name, _DIR_FLAGS, dir_fd=target_fd)
                try:
                    _copy_dir(inner_source, inner_target)
                finally:
                    os.close(inner_target)
            finally:
                os.close(inner_source)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(name, source_fd, target_fd, st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=source_fd), name, dir_fd=target_fd)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=target_fd)
        else:
            continue  # a socket: nothing to copy
        os.chown(name, st.st_uid, st.st_gid, dir_fd=target_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, mode, dir_fd=target_fd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=target_fd, follow_symlinks=False)


def _copy_file(name: str, source_fd: int, target_fd: int, size: int) -> None:
    reader = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source_fd)
    try:
        writer = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=target_fd
        )
        try:
            left = size
            while left > 0:
                sent = os.sendfile(writer, reader, None, min(left, _CHUNK))
                if sent == 0:
                    break  # the file shrank meanwhile
                left -= sent
        finally:
            os.close(writer)
    finally:
        os.close(reader)
