"""Errors of the host runtime: every exception class of ``sandbox``, and how the others arrive.

::

    SandboxError                 every failure the CLI reports as one line; .exit_code 1
     ├── NotFoundError           unknown container, pod or run id
     ├── StateError              invalid state or transition, duplicate id
     ├── ConfigError             bad flags, bundle, config.json, image name; no guest image
     ├── PullError               an image could not be pulled from a registry (exit 125)
     ├── ImageError              an OCI image's content is unusable (sandbox.image; re-raised
     │    │                      as ConfigError naming the image)
     │    └── StreamError        reading or decompressing one of its blobs failed
     ├── NetworkError            the pod's host network devices cannot be set up or removed
     ├── HookError               an OCI hook failed, timed out or could not be run: .hook
     │                           (its kind) .index .path; the message names all three
     ├── TemplateError           a template VM cannot be built or restored (callers cold boot)
     ├── AgentError              the agent failed a call, timed out or answered nonsense:
     │    │                      .rpc .code .reason .detail .pod_id .container_id .exec_id
     │    ├── AgentTimeout       no answer within the deadline (.code DEADLINE_EXCEEDED)
     │    ├── PodProcessDied     a process of the pod (QEMU, virtiofsd, agent proxy) died
     │    │                      while a call waited: the message names it and its kept log
     │    └── CommandError       the container's program cannot be run: .exit_code 127 when
     │                           it is not found, 126 when it cannot be invoked (.reason says)
     └── RunError                a failure of ``pysandbox run``: .exit_code 125 (pysandbox
                                 failed), 126/127 (the command), 124 (--timeout)

Four exceptions stay inside the module that raises them and are translated where it is
called, so they never reach the CLI: ``sandbox.image.skopeo.SkopeoError`` (a skopeo call
failed: ``.kind``, ``.detail``) becomes a PullError in ``sandbox.image.explain``,
``sandbox.image.reference.ReferenceError`` (a ValueError: not a valid reference) a PullError in
``sandbox.image.pull``, ``sandbox.pod.standin_wire.WireError`` (a malformed message
between a shim and its agent proxy) an AgentError in the shim or a logged line in the proxy,
and ``sandbox.pod.grpc_call.CallError`` (a failed gRPC call of the agent proxy's own:
``.code``, ``.details``, ``.trailers``) an AgentError in ``sandbox.pod.proxy_client`` or a
logged line of port-forward.

How failures of the other layers reach the CLI:

- The guest agent answers a failed call with a gRPC status: a code, a message for people and,
  where it knows one, a :class:`FailureReason` in the status's trailing metadata (agent.proto
  ``Failure``; :mod:`agentapi.failure`). :class:`~sandbox.pod.agent_client.AgentClient` turns
  it into an :class:`AgentError` carrying all three, and into a :class:`CommandError` when the
  reason is that the program cannot be run. Nothing on the host reads the message to decide.
- ``hypervisor`` keeps its own tree (``hypervisor/errors.py``: HypervisorError → LaunchError,
  QMPError, VirtiofsdError, AccelError, HypervisorTimeout, GuestImageError), because that layer
  does not import ``sandbox``. ``Pod.boot`` re-raises GuestImageError as ConfigError (it names
  the fix, ``make guest-image``); any other HypervisorError reaches :func:`describe`, which
  reports its message with exit status 1 (125 from ``run``).
- OSError: its strerror and file name, exit 1. Anything else is a bug: ``internal error: ...``
  (``--debug`` shows the traceback).

Exit statuses: 1 for every error (runc's convention), except CommandError (127/126, from
``create``, ``exec`` and ``run``; runc itself exits 1 from create and 255 from exec, the
docker convention followed here is what docker, podman and a shell report) and ``run``'s own
(:data:`EXIT_RUNTIME` and the rest, docker run's). Messages are lowercase, name what failed and,
where there is one, what to do about it.
"""

from __future__ import annotations

import enum
import errno

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~0.6 MiB)

if TYPE_CHECKING:  # annotations only: the shim imports this module and not typing
    from typing import Any, Self

#: Exit statuses of ``pysandbox run`` when the container's own status is not the answer
#: (docker run's convention): pysandbox failed, the command cannot be run, it was not found,
#: ``--timeout`` expired.
EXIT_RUNTIME, EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 125, 126, 127, 124


class FailureReason(enum.Enum):
    """Why the agent failed a call, beyond the status code: agent.proto ``Failure.Reason``,
    member for member (values are the proto names)."""

    UNSPECIFIED = "UNSPECIFIED"
    #: process.args[0] names no file or is not in $PATH.
    EXECUTABLE_NOT_FOUND = "EXECUTABLE_NOT_FOUND"
    #: process.args[0] is a directory or not executable by the process's user.
    NOT_EXECUTABLE = "NOT_EXECUTABLE"
    #: The spec or process JSON was refused by the guest.
    INVALID_SPEC = "INVALID_SPEC"
    #: A setup step (mounts, namespaces, cgroup, user...) failed in the guest.
    SETUP_FAILED = "SETUP_FAILED"
    #: A startContainer hook failed in the guest; the container's process exits (stopped).
    HOOK_FAILED = "HOOK_FAILED"

    @classmethod
    def named(cls, name: str) -> FailureReason:
        """The member called ``name``; UNSPECIFIED for a name this host does not know."""
        return cls.__members__.get(name, cls.UNSPECIFIED)

    @property
    def command_status(self) -> int | None:
        """The exit status that reports this reason for a command (127 not found, 126 cannot
        be invoked); None when the reason is not about the command."""
        return {
            FailureReason.EXECUTABLE_NOT_FOUND: EXIT_NOT_FOUND,
            FailureReason.NOT_EXECUTABLE: EXIT_CANNOT_INVOKE,
        }.get(self)


class SandboxError(Exception):
    """Base of every error the CLI turns into a one-line message and a non-zero exit."""

    exit_code = 1


class NotFoundError(SandboxError):
    """An id names no container or pod."""


class StateError(SandboxError):
    """The object exists but is in the wrong state for the request, or already exists."""


class ConfigError(SandboxError):
    """Invalid user input: flags, bundle, config.json, image."""


class ImageError(SandboxError):
    """An OCI image's content is unusable.

    The message is one lowercase clause that does not name the image; ``sandbox.image.store``
    prefixes it with ``image NAME:`` and raises ``ConfigError``.
    """


class StreamError(ImageError):
    """Reading or decompressing a blob failed; the message already names the blob."""


class NetworkError(SandboxError):
    """Setting up or removing the pod's network devices failed."""


class HookError(SandboxError):
    """An OCI hook failed (non-zero exit, killed, past its timeout) or could not be run.

    ``hook`` is its kind ("prestart"...), ``index`` its position in that list, ``path`` its
    program; the message is one line naming all three and what happened, with the start of
    the hook's stdout and stderr (runtime spec config.md "POSIX-platform Hooks").
    """

    def __init__(self, message: str, *, hook: str = "", index: int = -1, path: str = "") -> None:
        super().__init__(message)
        self.hook = hook
        self.index = index
        self.path = path


class TemplateError(SandboxError):
    """A template could not be built or restored (the caller may cold boot instead)."""


class AgentError(SandboxError):
    """The guest agent failed a call, could not be reached, or answered nonsense.

    Fields (empty when not known, e.g. for a reply that failed the host's checks):
    ``rpc`` the call ("CreateContainer"); ``code`` its gRPC status name ("FAILED_PRECONDITION",
    "" when there was no status); ``reason`` the agent's :class:`FailureReason`; ``detail``
    the agent's own message (or this error's message when the agent sent none); ``pod_id`` the
    pod whose agent it was; ``container_id`` and ``exec_id`` what the call was about ("" for
    a container's init process).
    """

    def __init__(
        self,
        message: str,
        *,
        rpc: str = "",
        code: str = "",
        reason: FailureReason = FailureReason.UNSPECIFIED,
        detail: str | None = None,
        pod_id: str = "",
        container_id: str = "",
        exec_id: str = "",
    ) -> None:
        super().__init__(message)
        self.rpc = rpc
        self.code = code
        self.reason = reason
        self.detail = message if detail is None else detail
        self.pod_id = pod_id
        self.container_id = container_id
        self.exec_id = exec_id

    def amended(self, note: str) -> Self:
        """The same error (class and fields) with ``; note`` added to its message."""
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        Exception.__init__(copy, f"{self}; {note}")
        return copy


class AgentTimeout(AgentError):
    """The guest agent did not answer within the deadline."""


class PodProcessDied(AgentError):
    """A host process of the pod (QEMU, virtiofsd, the agent proxy) died while a call waited
    for the agent: the call was given up at once instead of waiting out its deadline. The
    message names the process, its pid and where its log was kept."""


class CommandError(AgentError):
    """The container's program cannot be run (CreateContainer or ExecProcess failed with
    ``reason`` EXECUTABLE_NOT_FOUND or NOT_EXECUTABLE); ``exit_code`` is 127 or 126."""

    def __init__(self, message: str, *, reason: FailureReason, **fields: Any) -> None:
        status = reason.command_status
        if status is None:
            raise ValueError(f"{reason.name} is not a reason why a command cannot run")
        super().__init__(message, reason=reason, **fields)
        self.exit_code = status


class RunError(SandboxError):
    """A failure of ``run`` with the exit status docker would use."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PullError(SandboxError):
    """Pulling an image failed: the message names the reference, what failed and what to do.

    Exit status 125, as podman's ``pull`` and ``run`` use for their own failures.
    """

    exit_code = 125


def describe(exc: BaseException) -> tuple[str, int]:
    """One-line message and exit status for any exception reaching the CLI boundary.

    Known errors keep their message; an unexpected one is named by type so that a bug still
    reports without a traceback (``--debug`` shows it).
    """
    if isinstance(exc, SandboxError):
        return str(exc), exc.exit_code
    module = type(exc).__module__
    if module.startswith("hypervisor"):
        return str(exc), 1
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        hint = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "; free space there (or give --root on another file system)"
        return f"{exc.strerror or exc}{where}{hint}", 1
    return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", 1
