"""Keep a pod's serial console log bounded on the host.

The guest writes its serial console as fast as it likes, and QEMU's ``file`` chardev appends
it to ``<pod>/console.log`` without a limit (QEMU has none to offer): a hostile guest could fill
the host's ``--root`` (a tmpfs by default, so host memory). The pod's agent proxy, which lives
as long as the VM, therefore calls :func:`bound` every half second: once the log is larger than
:data:`LIMIT_BYTES`, only its last :data:`KEEP_BYTES` stay, after one marker line. QEMU appends
(the log is opened ``O_APPEND``), so writes after the cut land at the new end; bytes written
during the cut itself may be lost, which only happens to a guest that floods its console.
Worst case on disk: the limit plus what the guest writes in half a second.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: Size past which the console log is cut (bytes).
LIMIT_BYTES = 16 << 20
#: Bytes of the log's end kept by a cut.
KEEP_BYTES = 1 << 20
MARKER = b"\n[pysandbox: console log cut, only its last MiB kept]\n"


def bound(path: Path, limit: int = LIMIT_BYTES, keep: int = KEEP_BYTES) -> bool:
    """Cut ``path`` to its last ``keep`` bytes (after :data:`MARKER`) when it holds more than
    ``limit``; True when it was cut. A missing file or an OSError leaves it as it is."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= limit:
            return False
        tail = os.pread(fd, keep, size - keep)
        kept = MARKER + tail
        os.pwrite(fd, kept, 0)
        os.ftruncate(fd, len(kept))
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
