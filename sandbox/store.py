"""Persisted runtime state under ``--root``: validated ids, atomic JSON, per-object locks.

Layout (all directories 0700, files 0600)::

    <root>/<container-id>/state.json     one directory per container
    <root>/p/<digest>/pod.json           one directory per pod (digest: see pod_dir_name)
    <root>/locks/<name>.lock             flock(2) files, one per object
    <root>/logs/                         console logs kept after a failed boot

Pod directories are named by a short digest of the pod id, not the id itself, because they
hold unix sockets whose paths must stay under the kernel's 108-byte limit even below long
roots like /run/containerd/runc/k8s.io with 64-character ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox.errors import ConfigError

DEFAULT_ROOT = Path("/run/pysandbox")

#: Longest id, in characters (ASCII, so bytes). Ids name files and directories: on the host
#: ``<root>/<id>/``, ``<pod>/shared/<id>/`` and ``<root>/logs/<pod id>-console.log``, in the
#: guest ``/run/pysandbox/shared/<id>`` and the container's cgroup, each one path component,
#: which the kernel caps at NAME_MAX (255) bytes. The longest suffix added today is 12
#: characters (``-console.log``); 200 leaves room for more and is well above CRI's 64-hex ids
#: and containerd's 76-character limit. Unix sockets are not named by ids (pod directories
#: are digests, see :func:`pod_dir_name`), so the 108-byte socket path limit does not bind.
MAX_ID_LENGTH = 200
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
MAX_STATE_BYTES = 1024 * 1024


#: Names of the state directory's own entries (pods, locks, kept logs), which a container
#: (``<root>/<id>``) or a run cannot take; pod ids are hashed below ``p`` and may.
RESERVED_IDS = frozenset({"p", "locks", "logs"})


def validate_id(value: str, kind: str = "container") -> str:
    """Return ``value`` if it is a safe id (no '/', no '..', printable, at most
    :data:`MAX_ID_LENGTH` characters, not one of :data:`RESERVED_IDS` unless ``kind`` is
    ``pod``); else ConfigError."""
    if len(value) > MAX_ID_LENGTH:
        raise ConfigError(
            f"invalid {kind} id {value[:40]!r}... ({len(value)} characters): at most "
            f"{MAX_ID_LENGTH} characters (ids name files, whose names are limited)"
        )
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"invalid {kind} id {value[:80]!r}: use letters, digits, '_', '.', '+', '-' "
            f"(no '/', no '..', at most {MAX_ID_LENGTH} characters)"
        )
    if kind != "pod" and value in RESERVED_IDS:
        raise ConfigError(
            f"invalid {kind} id {value!r}: the state directory keeps its own "
            f"{'/'.join(sorted(RESERVED_IDS))} there; choose another"
        )
    return value


#: The longest name of a unix socket in a pod directory (the agent proxy's upstream).
LONGEST_POD_SOCKET = "agent-serial.sock"
#: A unix socket's path holds at most 107 bytes (``sun_path`` is 108, NUL included).
MAX_SOCKET_PATH = 107


def check_socket_room(root: Path) -> None:
    """ConfigError when the sockets of a pod below ``root`` would not fit in a unix socket
    path (:data:`MAX_SOCKET_PATH`): checked before anything starts, so that a long ``--root``
    is named as the cause rather than a daemon failing later."""
    longest = root.resolve() / "p" / ("0" * 16) / LONGEST_POD_SOCKET
    size = len(os.fsencode(str(longest)))
    if size > MAX_SOCKET_PATH:
        room = MAX_SOCKET_PATH - (size - len(os.fsencode(str(root.resolve()))))
        raise ConfigError(
            f"--root {str(root)[:60]}... is too long for the unix sockets of a pod below it "
            f"({size} bytes, the limit is {MAX_SOCKET_PATH}): give a state root of at most "
            f"{room} bytes"
        )


def pod_dir_name(pod_id: str) -> str:
    """Directory name of a pod: 16 hex digits of sha256(pod id)."""
    # CPython's own sha256 (3.11's _sha256), not hashlib's: hashlib loads OpenSSL, ~3 ms of
    # every verb that reaches a pod, exec's included. Imported here, not above: quick verbs
    # skip it.
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # another interpreter or version (3.12 calls it _sha2)
        from hashlib import sha256

    return str(sha256(pod_id.encode()).hexdigest())[:16]


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename), mode 0600."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a write: name the file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def read_json(path: Path) -> dict[str, Any]:
    """Read a state file written by :func:`write_json_atomic`; ConfigError when corrupt."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_STATE_BYTES + 1)
    if len(raw) > MAX_STATE_BYTES:
        raise ConfigError(f"state file {path} is larger than {MAX_STATE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"state file {path} is corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"state file {path} is corrupt: not a JSON object")
    return data


class Lock:
    """A held :func:`locked` lock. :meth:`discard` removes its file when the lock is
    released (for a lock whose subject is gone: a removed pod or run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


@contextlib.contextmanager
def locked(root: Path, name: str) -> Iterator[Lock]:
    """Hold an exclusive flock named ``name`` under ``root`` for the duration of the block.

    The lock file is unlinked only by its holder (:meth:`Lock.discard`), so a process that
    obtains the lock checks it still holds the file the name refers to, and otherwise takes
    the lock again on the new one: two holders never coexist.
    """
    lock_dir = ensure_dir(root / "locks")
    path = lock_dir / f"{name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # discarded by the holder we waited for: lock the file there now
    lock = Lock(path)
    try:
        yield lock
    finally:
        if lock.discarded:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)
