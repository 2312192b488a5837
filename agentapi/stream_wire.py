"""The output ports' wire format, used by the guest (writer) and the host (reader).

A pod has :data:`PORT_COUNT` extra virtio-serial ports named ``stream.0`` … (QEMU: a unix
socket chardev ``<pod>/stream-N.sock`` each). A host reader that holds port N (a lock file
on the host) and is connected to its socket asks the agent, in ReadStdout/ReadStderr, to write
the stream there instead of into gRPC messages (docs/stream-ports.md). The port then carries::

    "\\nPYSANDBOX-STREAM <nonce>\\n"                  the opening line (nonce: 32 hex digits)
    <u32 little-endian length N, 1..MAX_FRAME_BYTES> <N bytes of output>   any number of frames
    <u32 0>                                          the end frame: all output was written

A port is a byte pipe that outlives readers: a reader that went away mid-stream leaves bytes
in the port (the guest's queue, QEMU) that the next one would get. So the host discards
everything before the opening line with *its* nonce (at most :data:`MAX_DISCARD_BYTES`), as
the agent channel's handshake does (:mod:`agentapi.channel`). The guest is untrusted: the
host rejects a frame longer than :data:`MAX_FRAME_BYTES` and never buffers more than one.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

#: Output ports per pod (each costs the guest ~0.5 MiB of receive buffers the driver posts).
PORT_COUNT = 4
#: Name of output port ``index`` (``virtserialport,name=...``).
PORT_NAME_FORMAT = "stream.{index}"
#: Largest frame payload, bytes.
MAX_FRAME_BYTES = 1024 * 1024
#: Most bytes the host discards before the opening line before it gives up.
MAX_DISCARD_BYTES = 16 * 1024 * 1024

OPEN_PREFIX = b"\nPYSANDBOX-STREAM "
HEADER = struct.Struct("<I")
END_FRAME = HEADER.pack(0)
_NONCE_RE = re.compile(r"[0-9a-f]{32}")


class StreamError(Exception):
    """The port's bytes broke the format (oversized frame, too much garbage)."""


def port_name(index: int) -> str:
    """The virtio-serial name of output port ``index``."""
    return PORT_NAME_FORMAT.format(index=index)


def valid_nonce(nonce: str) -> bool:
    """True for 32 lowercase hex digits."""
    return _NONCE_RE.fullmatch(nonce) is not None


def opening_line(nonce: str) -> bytes:
    """The line that opens a stream for the reader that chose ``nonce``."""
    return OPEN_PREFIX + nonce.encode() + b"\n"


class FrameReader:
    """Parses a port's bytes fed in arbitrary pieces (host side).

    :meth:`feed` yields the payload of each frame, possibly in several pieces (memoryviews
    into the buffer fed: use them before the next call); :attr:`ended` becomes True at the
    end frame, after which the rest of the input is ignored. Memory is bounded: at most the
    opening line and one 4-byte header are kept between calls, never a payload.
    """

    def __init__(self, nonce: str) -> None:
        self._opening = opening_line(nonce)
        self._window = b""  # tail of discarded bytes that may begin the opening line
        self._opened = False
        self._discarded = 0
        self._header = b""  # a header split across feeds
        self._left = 0  # payload bytes of the current frame still to come
        self.ended = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """The payload bytes in ``data``; StreamError on a broken stream."""
        view = memoryview(data)
        if self.ended:
            return
        if not self._opened:
            joined = self._window + bytes(view)
            index = joined.find(self._opening)
            if index < 0:
                self._discarded += len(view)
                if self._discarded > MAX_DISCARD_BYTES:
                    raise StreamError("the output port sent too many bytes before its stream")
                self._window = joined[-(len(self._opening) - 1) :]
                return
            self._opened = True
            self._window = b""
            view = memoryview(joined)[index + len(self._opening) :]
        while view:
            if self._left:
                take = min(self._left, len(view))
                self._left -= take
                yield view[:take]
                view = view[take:]
                continue
            need = HEADER.size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) < HEADER.size:
                return
            (length,) = HEADER.unpack(self._header)
            self._header = b""
            if length == 0:
                self.ended = True
                return
            if length > MAX_FRAME_BYTES:
                raise StreamError(f"the output port sent a {length}-byte frame")
            self._left = length
