"""Errors of the in-guest runtime (tree drawn in :mod:`agent.oci`).

Every message is one lowercase line in the style of runc, because it travels to the agent as
``error <message>\\n`` on the sync socket and from there into a gRPC status.
"""

from __future__ import annotations


class OciError(Exception):
    """Base: the container (or exec) could not be set up. Exit with :attr:`exit_code`."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))

    @property
    def message(self) -> str:
        return str(self.args[0])


class SpecError(OciError):
    """The spec (or process JSON) is invalid. Raised before anything was changed."""


class SetupError(OciError):
    """A setup step failed: ``<step>: <strerror>``."""

    @classmethod
    def from_os(cls, step: str, exc: OSError) -> SetupError:
        reason = exc.strerror or str(exc)
        return cls(f"{step}: {reason}")


class ExecError(OciError):
    """The process cannot be executed: 127 when it is not found, 126 when it is not runnable."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
