"""Errors of the in-guest runtime (tree drawn in :mod:`agent.oci`).

Every message is one lowercase line in the style of runc, because it travels to the agent as
``error <REASON> <message>\\n`` on the sync socket and from there into a gRPC status. REASON
is one of the names below, the names of agent.proto's ``Failure.Reason``: the agent passes it
on to the host as a field, so the host never has to read the message to tell "not found"
(127) from "cannot be run" (126).
"""

from __future__ import annotations

from ocispec.errors import SpecError as SpecError  # re-exported: reported with INVALID_SPEC

#: Failure reasons, spelt as agent.proto's ``Failure.Reason`` values (the agent maps by name).
#: Nothing more specific is known (an unexpected exception).
UNSPECIFIED = "UNSPECIFIED"
#: process.args[0] names no file, or is not found in $PATH (a shell's and docker's 127).
EXECUTABLE_NOT_FOUND = "EXECUTABLE_NOT_FOUND"
#: process.args[0] exists but cannot be run: a directory, no execute permission (126).
NOT_EXECUTABLE = "NOT_EXECUTABLE"
#: The spec or process JSON is invalid; nothing was changed.
INVALID_SPEC = "INVALID_SPEC"
#: A setup step (mount, namespace, cgroup, user, cwd, ...) failed in the guest.
SETUP_FAILED = "SETUP_FAILED"

#: A startContainer hook failed (after ``start``): the container's process exits.
HOOK_FAILED = "HOOK_FAILED"

REASONS = (
    UNSPECIFIED,
    EXECUTABLE_NOT_FOUND,
    NOT_EXECUTABLE,
    INVALID_SPEC,
    SETUP_FAILED,
    HOOK_FAILED,
)


class OciError(Exception):
    """Base: the container (or exec) could not be set up. Exit with :attr:`exit_code`;
    :attr:`reason` is what the agent is told along with the message.

    An invalid spec is :class:`ocispec.errors.SpecError` instead (re-exported here; it has
    ``message`` and ``exit_code`` too): it travels with the reason :data:`INVALID_SPEC`.
    """

    exit_code = 1
    reason = UNSPECIFIED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))

    @property
    def message(self) -> str:
        return str(self.args[0])


class SetupError(OciError):
    """A setup step failed: ``<step>: <strerror>``."""

    reason = SETUP_FAILED

    @classmethod
    def from_os(cls, step: str, exc: OSError) -> SetupError:
        reason = exc.strerror or str(exc)
        return cls(f"{step}: {reason}")


class HookError(OciError):
    """A startContainer hook failed, ran past its timeout or could not be run; the message
    names its kind, index and path (``startContainer hook #0 (/bin/x) failed: ...``)."""

    reason = HOOK_FAILED


class ExecError(OciError):
    """The process cannot be executed: ``reason`` is :data:`EXECUTABLE_NOT_FOUND` (exit code
    127) or :data:`NOT_EXECUTABLE` (126)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        if reason not in (EXECUTABLE_NOT_FOUND, NOT_EXECUTABLE):
            raise ValueError(f"not an exec failure reason: {reason!r}")
        self.reason = reason
        self.exit_code = 127 if reason == EXECUTABLE_NOT_FOUND else 126
