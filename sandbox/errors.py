"""Errors of the host runtime.

::

    SandboxError                 every failure the CLI reports as one line
     ├── NotFoundError           unknown container or pod id
     ├── StateError              invalid state or transition, duplicate id
     ├── ConfigError             bad flags, malformed config, missing guest image
     ├── RunError                a failure of ``pysandbox run``, with docker's exit status
     ├── PullError               an image could not be pulled from a registry (exit 125)
     └── AgentError              the agent failed, timed out or answered nonsense
          └── AgentTimeout

Messages are lowercase, name what failed and, where there is one, what to do about it.
``hypervisor.errors.HypervisorError`` is reported the same way by the CLI.
"""

#: Exit statuses of ``pysandbox run`` when the container's own status is not the answer
#: (docker run's convention): pysandbox failed, the command cannot be run, it was not found,
#: ``--timeout`` expired.
EXIT_RUNTIME, EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 125, 126, 127, 124


class SandboxError(Exception):
    """Base of every error the CLI turns into a one-line message and a non-zero exit."""

    exit_code = 1


class NotFoundError(SandboxError):
    """An id names no container or pod."""


class StateError(SandboxError):
    """The object exists but is in the wrong state for the request, or already exists."""


class ConfigError(SandboxError):
    """Invalid user input: flags, bundle, config.json, image."""


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


class AgentError(SandboxError):
    """The guest agent failed a call or could not be reached."""


class AgentTimeout(AgentError):
    """The guest agent did not answer within the deadline."""


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
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1
    return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", 1
