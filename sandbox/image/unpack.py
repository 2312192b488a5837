"""Safe application of image layers (tar streams, possibly compressed) to a root filesystem.

Layer tarballs are hostile input. Nothing here ever writes, links or changes anything outside
the root directory an :class:`Unpacker` was given, whatever the tar contains:

- Every path is handled relative to a directory file descriptor (``*at`` system calls). Member
  names lose a leading ``/`` (an absolute name means the image's own root, as GNU tar and every
  container runtime read it); a ``..`` component is refused outright.
- Parent directories are walked one component at a time with ``O_NOFOLLOW``. A symlink met on
  the way is resolved *inside* the root, as if the root were ``/`` (chroot semantics, the way
  containerd applies layers): ``a -> /etc`` followed by ``a/passwd`` writes ``<root>/etc/passwd``,
  and ``..`` never climbs above the root. Usrmerge images (``lib -> usr/lib``) therefore work.
- The last component is never followed: an existing entry is unlinked (or removed as a tree
  without following symlinks) and the new one created with ``O_CREAT|O_EXCL|O_NOFOLLOW``, so a
  symlink or a hardlink planted by an earlier member is replaced, never written through.
- Hardlink targets are looked up the same way (inside the root, never creating anything) and
  linked with ``linkat`` without ``AT_SYMLINK_FOLLOW``; a missing target is an error.
- Character and block devices are skipped (the guest provides ``/dev``) and reported in
  :attr:`Unpacker.notes`; FIFOs are created. Extended attributes (PAX ``SCHILY.xattr.*``) are
  kept for the names a container may use over virtio-fs -- ``user.*``, file capabilities
  (``security.capability``, set after the owner: chown clears it) and POSIX ACLs, as
  ``hypervisor.virtiofsd.CONTAINER_XATTR_MAP`` passes them; others (``trusted.*``, SELinux
  labels) and those on links are counted in :attr:`Unpacker.notes`.
- Owners are numeric ids from the tar (user and group *names* are ignored, never looked up on
  the host) and are applied only when running as root and only for ids in ``0..2**32-2``.
  Modes keep setuid/setgid/sticky bits: the store that holds unpacked images must therefore be
  private to root (``sandbox.image.store`` creates it 0700).

Nothing recurses on the archive's depth (a layer may hold a path thousands of directories
deep): walking, resolving and removing trees are loops that hold a few file descriptors
whatever the depth (:func:`remove_tree`, :meth:`Unpacker.finish`). Member and link names
longer than PATH_MAX are refused, which bounds what one member can make the unpacker hold.

Whiteouts follow the OCI image spec: ``.wh.NAME`` deletes ``NAME`` of lower layers,
``.wh..wh..opq`` empties its directory of everything lower layers put there; neither touches
what the same layer created. Directory modes, owners and times are applied by
:meth:`Unpacker.finish` once every layer is in, deepest first, so that a read-only directory
of a lower layer does not stop a later layer from adding to it.

``tarfile.extractall`` and ``tarfile.data_filter`` are not used: the data filter refuses the
absolute symlinks every distribution image contains, and whiteouts need custom handling anyway.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import importlib
import io
import lzma
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sandbox.errors import ImageError, StreamError

CHUNK = 1 << 20
MAX_SYMLINKS = 40
#: Longest member or link name accepted, in bytes (the kernel's PATH_MAX).
PATH_MAX = 4096
MAX_CACHED_DIRS = 256
MAX_ID = 2**32 - 2
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
#: Extended attribute names kept from layers (prefixes): what a container sees over virtio-fs.
KEPT_XATTRS = (
    "user.",
    "security.capability",
    "system.posix_acl_access",
    "system.posix_acl_default",
)
#: Largest attribute value set (the kernel's XATTR_SIZE_MAX).
MAX_XATTR_BYTES = 65536
_PAX_XATTR = "SCHILY.xattr."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class Readable(Protocol):
    """A binary stream that can be read in chunks."""

    def read(self, size: int = -1, /) -> bytes: ...


def short(digest: str) -> str:
    """``sha256:0123456789ab…`` for messages."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}…" if len(hexpart) > 12 else digest


def mismatch(what: str, expected: str, actual: str) -> ImageError:
    """The error for a blob whose content does not hash to the digest that names it."""
    return ImageError(
        f"{what} digest mismatch: expected {short(expected)}, content is {short(actual)}; "
        "the image is corrupt or was modified, export it again"
    )


# --- streams -------------------------------------------------------------------------------


class HashingReader:
    """Reads ``inner``, hashing (sha256) and counting every byte handed out.

    ``on_read(total)`` is called after each read. Errors raised by ``inner`` other than
    :class:`ImageError` become ``StreamError(f"{what}: {error}")`` so that decompression
    failures are reported as corrupt data rather than as host I/O errors.
    """

    def __init__(
        self, inner: Readable, what: str, on_read: Callable[[int], None] | None = None
    ) -> None:
        self._inner = inner
        self._what = what
        self._on_read = on_read
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._inner.read(size)
        except ImageError:
            raise
        except Exception as exc:  # any decompressor's or file's failure: the data is bad
            raise StreamError(f"{self._what}: {_describe(exc)}") from None
        self.sha.update(data)
        self.count += len(data)
        if self._on_read is not None:
            self._on_read(self.count)
        return data

    def write(self, data: bytes, /) -> int:
        raise OSError("read-only stream")

    def tell(self) -> int:
        return self.count

    def seek(self, pos: int, whence: int = 0, /) -> int:
        raise OSError("stream is not seekable")

    def close(self) -> None:
        """The inner stream belongs to the caller."""

    def digest(self) -> str:
        """``sha256:<hex>`` of everything read so far."""
        return f"sha256:{self.sha.hexdigest()}"

    def drain(self) -> None:
        """Read (and hash) to the end of the stream."""
        while self.read(CHUNK):
            pass


class _Replay(io.RawIOBase):
    """``head`` followed by the rest of ``inner`` (to sniff magic bytes of a pipe-like stream)."""

    def __init__(self, head: bytes, inner: Readable) -> None:
        super().__init__()
        self._head = head
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            data, self._head = self._head[: len(view)], self._head[len(view) :]
        else:
            data = self._inner.read(len(view))
        view[: len(data)] = data
        return len(data)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc) or type(exc).__name__
    return text[0].lower() + text[1:]


def _zstd_reader(raw: Readable) -> Readable:
    for module_name in ("compression.zstd", "zstandard"):
        try:
            module: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        if module_name == "zstandard":
            reader: Readable = module.ZstdDecompressor().stream_reader(raw)
        else:
            reader = module.ZstdFile(raw)
        return reader
    raise ImageError(
        "is zstd-compressed and this python has no zstd support: "
        "pip install zstandard into pysandbox's environment, or export the image with gzip layers"
    )


def decompressed(raw: Readable, what: str) -> Readable:
    """``raw`` decompressed according to its magic bytes (gzip, zstd, bzip2, xz, or none)."""
    head = b""
    while len(head) < 6:
        more = raw.read(6 - len(head))
        if not more:
            break
        head += more
    stream = io.BufferedReader(_Replay(head, raw), CHUNK)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(_ZSTD_MAGIC):
        try:
            return _zstd_reader(stream)
        except ImageError as exc:
            raise ImageError(f"{what} {exc}") from None
    if head.startswith(_BZIP2_MAGIC):
        return bz2.BZ2File(stream)
    if head.startswith(_XZ_MAGIC):
        return lzma.LZMAFile(stream)
    return stream


def hash_blob(
    blob: Readable,
    what: str,
    *,
    decompress: bool = False,
    on_read: Callable[[int], None] | None = None,
) -> tuple[str, str | None]:
    """Read ``blob`` to the end; return (sha256 of its bytes, sha256 of them decompressed).

    The second digest is computed only when ``decompress`` is true (it costs a
    decompression), else it is None.
    """
    raw = HashingReader(blob, f"cannot read {what}", on_read)
    if not decompress:
        raw.drain()
        return raw.digest(), None
    plain = HashingReader(decompressed(raw, what), f"{what} is corrupt")
    plain.drain()
    raw.drain()
    return raw.digest(), plain.digest()


def apply_blob(
    unpacker: Unpacker,
    blob: Readable,
    what: str,
    *,
    expect_digest: str | None,
    expect_diff_id: str | None,
    on_read: Callable[[int], None] | None = None,
) -> None:
    """Decompress ``blob``, apply it as a layer, and check both digests at its end.

    ``expect_digest`` is the sha256 of the blob as stored, ``expect_diff_id`` that of the
    uncompressed tar; either may be None. Callers verify the blob before calling this (see
    ``sandbox.image.store``); the digests are checked again here over the very bytes that were
    applied, so a file changed in between cannot slip through. On any error the root is in
    an undefined state and must be discarded.
    """
    raw = HashingReader(blob, f"cannot read {what}", on_read)
    plain = HashingReader(decompressed(raw, what), f"{what} is corrupt")
    try:
        with tarfile.open(fileobj=plain, mode="r|") as tar:
            unpacker.apply(tar, what)
    except tarfile.TarError as exc:
        raise ImageError(f"{what} is a corrupt tarball: {_describe(exc)}") from None
    plain.drain()
    raw.drain()
    if expect_diff_id is not None and plain.digest() != expect_diff_id:
        raise mismatch(f"{what} (uncompressed)", expect_diff_id, plain.digest())
    if expect_digest is not None and raw.digest() != expect_digest:
        raise mismatch(what, expect_digest, raw.digest())


# --- walking inside a root -----------------------------------------------------------------


def shown(name: str) -> str:
    """``name`` quoted for a message, shortened when long (names can be 4 KiB)."""
    return repr(name) if len(name) <= 80 else repr(f"{name[:40]}…{name[-20:]}")


def split_path(name: str) -> list[str]:
    """Components of an archive path relative to the root; ``/``, ``.`` and empty dropped.

    Raises ImageError for a ``..`` component or a name longer than :data:`PATH_MAX` bytes.
    """
    size = len(name.encode(errors="surrogateescape"))
    if size > PATH_MAX:
        raise ImageError(f"member name {shown(name)} is {size} bytes, longer than PATH_MAX")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"unsafe member {shown(name)}: '..' would leave the root")
    return parts


def _open_real(root_fd: int, parts: list[str]) -> int:
    """Open the directory ``parts`` below ``root_fd`` following no symlink at all."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    try:
        for part in parts:
            fd = _swap(fd, os.open(part, _DIR_FLAGS, dir_fd=fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolve_dir(
    root_fd: int,
    parts: list[str],
    *,
    create: bool,
    on_mkdir: Callable[[list[str], int], None] | None = None,
    start: tuple[int, list[str]] | None = None,
) -> tuple[int, list[str]] | None:
    """Open the directory ``parts`` names, resolving symlinks as if ``root_fd`` were ``/``.

    Returns (fd, its real path components below the root); the caller closes fd. ``..``
    never climbs above the root. ``start`` (a directory fd and its real components, as
    returned earlier) resolves ``parts`` relative to it instead of the root. A missing
    component is created (0700, reported to ``on_mkdir(real components, inode)``) when
    ``create``, else None is returned. A component that is neither a directory nor a symlink
    is an ImageError when ``create`` (nothing can be put below it), else None. More than
    :data:`MAX_SYMLINKS` symlinks is an ImageError.
    """
    pending = list(reversed(parts))
    real: list[str] = [] if start is None else list(start[1])
    fd = _open_real(root_fd, []) if start is None else os.dup(start[0])
    links = 0
    try:
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if real:
                    real.pop()
                    fd = _swap(fd, _open_real(root_fd, real))
                continue
            try:
                st = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                os.mkdir(part, 0o700, dir_fd=fd)
                st = os.lstat(part, dir_fd=fd)
                if on_mkdir is not None:
                    on_mkdir([*real, part], st.st_ino)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise ImageError(f"too many levels of symbolic links in {'/'.join(parts)!r}")
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    real = []
                    fd = _swap(fd, _open_real(root_fd, real))
                pending.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                if not create:
                    os.close(fd)
                    return None
                raise ImageError(f"{'/'.join([*real, part])!r} is not a directory")
            fd = _swap(fd, os.open(part, _DIR_FLAGS, dir_fd=fd))
            real.append(part)
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def _swap(old: int, new: int) -> int:
    os.close(old)
    return new


def _make_writable(fd: int) -> None:
    """Give the owner rwx on directory ``fd`` (an image may have left it read-only)."""
    mode = os.fstat(fd).st_mode
    if mode & 0o700 != 0o700:
        os.fchmod(fd, stat.S_IMODE(mode) | 0o700)


def _entries(fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory -- not following symlinks) of each entry of directory ``fd``."""
    with os.scandir(fd) as scan:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` of directory ``parent_fd`` and everything below it.

    No recursion and no symlink followed, whatever the depth, with at most three descriptors
    open: each directory met below the top one has its files unlinked and its subdirectories
    moved up into the top one (``renameat`` stays within the tree), then is removed; the top
    directory is listed again until it is empty. Every entry is moved at most once. Read-only
    directories are made writable first (the tree is ours to remove). A ``name`` that is not
    a directory is unlinked. Raises OSError when something cannot be removed.
    """
    try:
        top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=parent_fd)  # a file or a symlink: never followed
        return
    try:
        _make_writable(top)
        hoisted = 0
        while entries := _entries(top):
            for entry, is_dir in entries:
                if not is_dir:
                    os.unlink(entry, dir_fd=top)
                    continue
                sub = os.open(entry, _DIR_FLAGS, dir_fd=top)
                try:
                    _make_writable(sub)
                    for child, child_is_dir in _entries(sub):
                        if not child_is_dir:
                            os.unlink(child, dir_fd=sub)
                            continue
                        while True:  # a free name in the top directory
                            hoisted += 1
                            try:
                                os.rename(child, f".rm{hoisted}", src_dir_fd=sub, dst_dir_fd=top)
                                break
                            except OSError as exc:
                                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                                    raise
                finally:
                    os.close(sub)
                os.rmdir(entry, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=parent_fd)


def read_in_root(root: Path, path: str, limit: int) -> bytes | None:
    """Contents of the regular file ``path`` inside ``root``, or None when there is none.

    Symlinks (in the parents and the file itself) resolve inside ``root`` as if it were
    ``/``; nothing outside it is ever opened. A file over ``limit`` bytes is an ImageError.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # root: trusted path
    try:
        parts = split_path(path)
        for _ in range(MAX_SYMLINKS):
            if not parts or parts[-1] == "..":
                return None
            found = resolve_dir(root_fd, parts[:-1], create=False)
            if found is None:
                return None
            dir_fd, real = found
            try:
                name = parts[-1]
                st = _lstat(dir_fd, name)
                if st is None:
                    return None
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=dir_fd)
                    base = [] if target.startswith("/") else real
                    parts = [p for p in [*base, *target.split("/")] if p not in ("", ".")]
                    continue
                if not stat.S_ISREG(st.st_mode):
                    return None
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(name, flags, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as file:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        return None
                    data = file.read(limit + 1)
                if len(data) > limit:
                    raise ImageError(f"{path} is larger than {limit} bytes")
                return data
            finally:
                os.close(dir_fd)
        raise ImageError(f"too many levels of symbolic links at {path!r}")
    finally:
        os.close(root_fd)


# --- the unpacker --------------------------------------------------------------------------


@dataclass
class _DirMeta:
    ino: int
    mode: int
    owner: tuple[int, int] | None
    mtime: float | None


class Unpacker:
    """Applies layers, in order, to one directory (normally empty, private to this process).

    Use as a context manager; call :meth:`apply` per layer then :meth:`finish`. ``notes``
    collects one line per kind of thing that was skipped (device nodes, ids out of range,
    extended attributes). Errors are :class:`ImageError` naming the member; after one, the
    directory is in an undefined state and must be discarded.
    """

    def __init__(self, root: Path, *, keep_owners: bool | None = None) -> None:
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._keep_owners = os.geteuid() == 0 if keep_owners is None else keep_owners
        self._dirs: dict[str, _DirMeta] = {}
        self._created: set[str] = set()
        self._skipped: set[str] = set()
        self._cache: dict[tuple[str, ...], tuple[int, list[str]]] = {}
        self._stale = False
        self._devices: list[str] = []
        self._unsupported: list[str] = []
        self._bad_ids = 0
        self._chown_failures = 0
        self._xattrs = 0

    def __enter__(self) -> Unpacker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file descriptors (idempotent)."""
        self._drop_cache()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @property
    def notes(self) -> list[str]:
        """Human-readable lines about members that were skipped or changed."""
        notes = []
        if self._devices:
            notes.append(
                f"skipped {len(self._devices)} device node(s) ({_sample(self._devices)}); "
                "the guest provides /dev"
            )
        if self._unsupported:
            notes.append(
                f"skipped {len(self._unsupported)} member(s) of unsupported type "
                f"({_sample(self._unsupported)})"
            )
        if self._bad_ids:
            notes.append(f"{self._bad_ids} file(s) had owner ids out of range; kept as root")
        if self._chown_failures:
            notes.append(
                f"could not keep the owner of {self._chown_failures} file(s) "
                "(the image store's filesystem refused chown); kept as root"
            )
        if self._xattrs:
            notes.append(
                f"{self._xattrs} extended attribute(s) not kept (only user.*, file "
                "capabilities and POSIX ACLs are, on files and directories)"
            )
        return notes

    def apply(self, tar: tarfile.TarFile, what: str) -> None:
        """Apply every member of ``tar`` (read in order, stream mode is fine)."""
        self._created = set()
        for member in tar:
            try:
                self._member(tar, member)
            except StreamError:
                raise
            except ImageError as exc:
                raise ImageError(f"{what}: {exc}") from None
            except OSError as exc:
                raise ImageError(
                    f"{what}: cannot extract {shown(member.name)}: {_describe(exc)}"
                ) from None

    def finish(self) -> None:
        """Apply directory owners, modes and times, children before parents; the root ends
        up 0755 unless a layer said otherwise.

        The tree is walked depth first in a loop, not by recursion (a layer may nest
        directories thousands deep), holding at most two descriptors besides the root's:
        down by opening a subdirectory (``O_NOFOLLOW``), up through ``..``, which must be the
        inode seen on the way down (the tree is private to this process; anything else is an
        ImageError). A directory gets the metadata recorded for its path only if it is still
        the same inode, and only once its subdirectories are done and its parent is open, so
        a mode without search permission stops nothing.
        """
        self._drop_cache()
        self._dirs.setdefault("", _DirMeta(os.fstat(self._root_fd).st_ino, 0o755, None, None))
        fd = os.dup(self._root_fd)
        # (path below the root, inode, subdirectories not visited yet) from the root down.
        path: list[tuple[str, int, list[str]]] = [("", os.fstat(fd).st_ino, self._subdirs(fd))]
        try:
            while path:
                key, _, pending = path[-1]
                if pending:
                    name = pending.pop()
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    fd = _swap(fd, child)
                    below = f"{key}/{name}" if key else name
                    path.append((below, os.fstat(fd).st_ino, self._subdirs(fd)))
                    continue
                path.pop()
                parent = None
                if path:
                    parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                    if os.fstat(parent).st_ino != path[-1][1]:
                        os.close(parent)
                        raise ImageError(f"directory {shown(key)} moved while it was unpacked")
                meta = self._dirs.get(key)
                if meta is not None and os.fstat(fd).st_ino == meta.ino:
                    self._apply_meta(fd, meta)
                os.close(fd)
                fd = -1 if parent is None else parent
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _subdirs(fd: int) -> list[str]:
        return [name for name, is_dir in _entries(fd) if is_dir]

    def _apply_meta(self, fd: int, meta: _DirMeta) -> None:
        if meta.owner is not None:
            self._chown(fd, meta.owner)
        os.fchmod(fd, meta.mode)
        if meta.mtime is not None:
            _set_times(fd, meta.mtime)

    # -- members --

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = split_path(member.name)
        if not parts:
            if not member.isdir():
                raise ImageError(f"member {shown(member.name)} would replace the root directory")
            self._dirs[""] = _DirMeta(
                os.fstat(self._root_fd).st_ino,
                member.mode & 0o7777,
                self._owner(member),
                member.mtime,
            )
            return
        *parent, name = parts
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, name, member.name)
            return
        if member.ischr() or member.isblk():
            self._devices.append(member.name)
            self._skipped.add("/".join(parts))
            return
        if not (
            member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()
        ):
            self._unsupported.append(member.name)
            return
        xattrs = _xattrs_of(member)
        if member.issym() or member.islnk() or member.isfifo():
            self._xattrs += len(xattrs)  # a link has its target's; user.* is not for links
            xattrs = {}
        dir_fd, real = self._parent(parent)
        key = "/".join([*real, name])
        existing = _lstat(dir_fd, name)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self._remove(dir_fd, name, key, existing)
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                existing = os.lstat(name, dir_fd=dir_fd)
            self._dirs[key] = _DirMeta(
                existing.st_ino, member.mode & 0o7777, self._owner(member), member.mtime
            )
            if xattrs:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._set_xattrs(fd, xattrs)
                finally:
                    os.close(fd)
        elif member.islnk():
            self._hardlink(dir_fd, name, key, member, existing)
        else:
            if existing is not None:
                self._remove(dir_fd, name, key, existing)
            if member.isreg():
                self._regular(tar, member, dir_fd, name, xattrs)
            elif member.issym():
                os.symlink(member.linkname, name, dir_fd=dir_fd)
                self._chown_at(dir_fd, name, member)
                _set_times(name, member.mtime, dir_fd)
            else:
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
                self._chown_at(dir_fd, name, member)
                # just created by us in a private directory: not a symlink
                os.chmod(name, member.mode & 0o7777, dir_fd=dir_fd)
                _set_times(name, member.mtime, dir_fd)
        self._created.add(key)

    def _regular(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        dir_fd: int,
        name: str,
        xattrs: dict[str, bytes],
    ) -> None:
        source = tar.extractfile(member)
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            if source is not None:
                while chunk := source.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            owner = self._owner(member)
            if owner is not None:
                self._chown(fd, owner)
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(fd, xattrs)  # after chown, which clears security.capability
            _set_times(fd, member.mtime)
        finally:
            os.close(fd)

    def _set_xattrs(self, fd: int, xattrs: dict[str, bytes]) -> None:
        """Set the extended attributes a container may see (:data:`KEPT_XATTRS`); the others,
        and those the store's filesystem or our privileges refuse, are counted in ``notes``."""
        for name, value in xattrs.items():
            if not name.startswith(KEPT_XATTRS) or len(value) > MAX_XATTR_BYTES:
                self._xattrs += 1
                continue
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EINVAL, errno.E2BIG):
                    raise
                self._xattrs += 1

    def _hardlink(
        self,
        dir_fd: int,
        name: str,
        key: str,
        member: tarfile.TarInfo,
        existing: os.stat_result | None,
    ) -> None:
        target = split_path(member.linkname)
        if not target:
            raise ImageError(f"hardlink {shown(member.name)} points to the root directory")
        if "/".join(target) in self._skipped:
            self._devices.append(member.name)
            return
        missing = ImageError(
            f"hardlink {shown(member.name)} points to {shown(member.linkname)}, "
            "which is not in the image (links may only point inside the image)"
        )
        found = resolve_dir(self._root_fd, target[:-1], create=False)
        if found is None:
            raise missing
        target_fd, _real = found
        try:
            target_st = _lstat(target_fd, target[-1])
            if target_st is None:
                raise missing
            if stat.S_ISDIR(target_st.st_mode):
                raise ImageError(f"hardlink {shown(member.name)} points to a directory")
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (target_st.st_dev, target_st.st_ino):
                    return
                self._remove(dir_fd, name, key, existing)
            os.link(
                target[-1], name, src_dir_fd=target_fd, dst_dir_fd=dir_fd, follow_symlinks=False
            )
        finally:
            os.close(target_fd)

    def _whiteout(self, parent: list[str], name: str, member_name: str) -> None:
        if name == OPAQUE_WHITEOUT:
            dir_fd, real = self._parent(parent)
            for child in os.listdir(dir_fd):
                key = "/".join([*real, child])
                if key in self._created:
                    continue
                st = _lstat(dir_fd, child)
                if st is not None:
                    self._remove(dir_fd, child, key, st)
            return
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other aufs metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to apply
        victim = name[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            raise ImageError(f"malformed whiteout {shown(member_name)}")
        found = resolve_dir(self._root_fd, parent, create=False)
        if found is None:
            return
        dir_fd, real = found
        try:
            key = "/".join([*real, victim])
            st = _lstat(dir_fd, victim)
            if st is not None and key not in self._created:
                self._remove(dir_fd, victim, key, st)
        finally:
            os.close(dir_fd)

    # -- helpers --

    def _parent(self, parts: list[str]) -> tuple[int, list[str]]:
        """The directory fd for ``parts``, created as needed; owned by the unpacker.

        Resolved directories are kept in an LRU cache of :data:`MAX_CACHED_DIRS` fds and a new
        path is resolved from its longest cached prefix. Any removal marks the cache stale (a
        removed symlink or directory may change how a path resolves); stale fds are closed at
        the next call, so the member being applied keeps using the one it got.
        """
        if self._stale:
            self._drop_cache()
        wanted = tuple(parts)
        hit = self._cache.pop(wanted, None)
        if hit is not None:
            self._cache[wanted] = hit  # most recently used last
            return hit
        start, rest = None, parts
        for cut in range(len(wanted) - 1, 0, -1):
            start = self._cache.get(wanted[:cut])
            if start is not None:
                rest = parts[cut:]
                break
        found = resolve_dir(
            self._root_fd, rest, create=True, on_mkdir=self._implicit_dir, start=start
        )
        assert found is not None  # create=True never returns None
        self._cache[wanted] = found
        while len(self._cache) > MAX_CACHED_DIRS:
            oldest = next(iter(self._cache))
            os.close(self._cache.pop(oldest)[0])
        return found

    def _implicit_dir(self, real: list[str], ino: int) -> None:
        key = "/".join(real)
        self._created.add(key)
        self._dirs.setdefault(key, _DirMeta(ino, 0o755, None, None))

    def _drop_cache(self) -> None:
        for fd, _real in self._cache.values():
            os.close(fd)
        self._cache = {}
        self._stale = False

    def _remove(self, dir_fd: int, name: str, key: str, st: os.stat_result) -> None:
        """Remove an entry without following symlinks; forget what was recorded below it."""
        self._stale = True
        if stat.S_ISDIR(st.st_mode):
            remove_tree(dir_fd, name)
            prefix = key + "/"
            for gone in [k for k in self._dirs if k == key or k.startswith(prefix)]:
                del self._dirs[gone]
        else:
            os.unlink(name, dir_fd=dir_fd)

    def _owner(self, member: tarfile.TarInfo) -> tuple[int, int] | None:
        if not self._keep_owners:
            return None
        if not (0 <= member.uid <= MAX_ID and 0 <= member.gid <= MAX_ID):
            self._bad_ids += 1
            return None
        return member.uid, member.gid

    def _chown_at(self, dir_fd: int, name: str, member: tarfile.TarInfo) -> None:
        owner = self._owner(member)
        if owner is not None:
            self._chown(name, owner, dir_fd)

    def _chown(self, target: int | str, owner: tuple[int, int], dir_fd: int | None = None) -> None:
        """chown an fd (or ``target`` in ``dir_fd`` without following a symlink); a
        filesystem that refuses (EPERM, EINVAL: unmapped id) leaves the file root-owned."""
        try:
            if isinstance(target, int):
                os.fchown(target, *owner)
            else:
                os.chown(target, *owner, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                raise
            self._chown_failures += 1


def _xattrs_of(member: tarfile.TarInfo) -> dict[str, bytes]:
    """A member's extended attributes: its ``SCHILY.xattr.NAME`` PAX records (the form
    docker, buildah and containerd write), values as the bytes of the archive."""
    return {
        key[len(_PAX_XATTR) :]: value.encode("utf-8", "surrogateescape")
        for key, value in (member.pax_headers or {}).items()
        if key.startswith(_PAX_XATTR) and len(key) > len(_PAX_XATTR)
    }


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _set_times(target: int | str, mtime: float, dir_fd: int | None = None) -> None:
    """Set atime and mtime of an fd (or of ``target`` in ``dir_fd``, not following a
    symlink) to ``mtime``; an unrepresentable time is left as it is."""
    try:
        ns = int(mtime * 1_000_000_000)
        if isinstance(target, int):
            os.utime(target, ns=(ns, ns))
        else:
            os.utime(target, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)
    except (OverflowError, ValueError, OSError):
        pass


def _sample(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (", …" if len(names) > 3 else "")
