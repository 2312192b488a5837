"""The reason of a failed agent call, as a field: agent.proto's ``Failure`` in trailing metadata.

A failed call's gRPC status carries a code and a message for people. Where the agent knows
more (the container's program was not found, a spec was refused...), it also sends a
serialized ``Failure`` as the binary trailing metadata entry :data:`METADATA_KEY`
(:func:`trailer`). The host reads it with :func:`reason_of` and never parses the message; the
pod's agent proxy forwards the entry unchanged (:func:`forwarded`).

Reasons are passed around as the proto enum's value names (``"EXECUTABLE_NOT_FOUND"``...), so
that neither side needs more than this module to speak of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Binary trailing metadata key of a serialized ``Failure`` (gRPC: ``-bin`` keys carry bytes).
METADATA_KEY = "pysandbox-failure-bin"
#: Largest serialized ``Failure`` the host decodes (the guest is untrusted).
MAX_FAILURE_BYTES = 64
#: The reason of a failure that carries none.
UNSPECIFIED = "UNSPECIFIED"


def trailer(reason: str) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying ``reason`` (a ``Failure.Reason`` name); ValueError for an
    unknown name. Empty for UNSPECIFIED: absence means the same, and costs nothing."""
    from agentapi.proto import agent_pb2 as pb

    pb.Failure.Reason.Value(reason)  # ValueError for a name the proto does not have
    if reason == UNSPECIFIED:
        return ()
    return ((METADATA_KEY, pb.Failure(reason=reason).SerializeToString()),)


def _entries(metadata: Iterable[Any] | None) -> list[tuple[str, bytes]]:
    """The :data:`METADATA_KEY` entries of gRPC metadata (key/value pairs or _Metadatum)."""
    found = []
    for entry in metadata or ():
        key, value = entry[0], entry[1]
        if key == METADATA_KEY and isinstance(value, bytes):
            found.append((key, value))
    return found


def reason_of(metadata: Iterable[Any] | None) -> str:
    """The ``Failure.Reason`` name in a failed call's trailing metadata.

    UNSPECIFIED when there is none, more than one, or one that is oversized, malformed or names
    a reason this side does not know (an older host, or a misbehaving guest).
    """
    from google.protobuf.message import DecodeError

    from agentapi.proto import agent_pb2 as pb

    entries = _entries(metadata)
    if len(entries) != 1 or len(entries[0][1]) > MAX_FAILURE_BYTES:
        return UNSPECIFIED
    try:
        failure = pb.Failure.FromString(entries[0][1])
        return str(pb.Failure.Reason.Name(failure.reason))
    except (DecodeError, ValueError):
        return UNSPECIFIED


def forwarded(metadata: Iterable[Any] | None) -> tuple[tuple[str, bytes], ...]:
    """The Failure entries of ``metadata`` to pass on unchanged (the agent proxy's job)."""
    return tuple(_entries(metadata))
