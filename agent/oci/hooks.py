"""startContainer hooks, run by the in-guest runtime inside the container (docs/hooks.md).

runtime spec config.md: startContainer hooks are called as part of ``start``, before the
user's program runs, are executed in the container namespace and their path is resolved in
the container namespace. So they run here, in the container's process after pivot_root and
after ``start`` arrived, as the container's user with its capabilities (as runc 1.1 runs them
in its init), each with the state JSON on stdin. The other kinds run on the host.

The host puts them into the spec it sends (``hooks.startContainer``, each with an explicit
``timeout``) together with the state they receive, less status and pid, as the spec member
:data:`STATE_KEY`. The runtime sets status ``created`` and pid to its own pid as the container
sees it (1 in a new pid namespace), as runc does.

A hook gets ``args`` as its argv (``[path]`` when absent), ``env`` as its environment (the
container process's environment when absent, as runc), stdin the state, stdout/stderr kept
for the error message; after ``timeout`` seconds its process group is killed and the hook has
failed. The first failure stops the others and the container's program never runs.
"""

from __future__ import annotations

import json
import os

from agent.oci.errors import HookError, SpecError
from ocispec import hook_output

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.syscalls import Syscalls
    from ocispec.spec import Hook

KIND = "startContainer"
#: The spec member with the state startContainer hooks receive (less status and pid).
STATE_KEY = "pysandbox.hookState"
#: Largest timeout accepted (seconds): the host's deadline for StartContainer covers it.
MAX_TIMEOUT = 24 * 3600


class StartHooks:
    """The startContainer hooks of a spec and the state they receive."""

    __slots__ = ("hooks", "state")

    def __init__(self, hooks: list[Hook], state: dict[str, object]) -> None:
        """``hooks`` as :func:`ocispec.spec.parse_hooks` gave them, each with a timeout."""
        self.hooks = hooks
        self.state = state

    def run(self, sys: Syscalls, env: list[str]) -> None:
        """Run each hook in order; :class:`HookError` for the first that fails. ``env`` is
        the container process's environment (for hooks without ``env``)."""
        doc = dict(self.state)
        doc["status"] = "created"
        doc["pid"] = sys.getpid()
        ordered: dict[str, object] = {}
        for key in ("ociVersion", "id", "status", "pid"):  # runc's order, then the rest
            if key in doc:
                ordered[key] = doc[key]
        ordered.update((k, v) for k, v in doc.items() if k not in ordered)
        payload = json.dumps(ordered, separators=(",", ":")).encode()  # compact, as runc
        for index, hook in enumerate(self.hooks):
            name = f"{KIND} hook #{index} ({hook.path})"
            timeout = hook.timeout or MAX_TIMEOUT  # parse() saw to it that it is set
            try:
                status, out, err = sys.run_hook(
                    hook.path, hook.args or [hook.path], hook.env or env, payload, timeout
                )
            except OSError as exc:
                raise HookError(f"{name} could not be run: {exc.strerror or exc}") from exc
            if status is None:
                raise HookError(f"{name} ran past its timeout of {timeout}s and was killed")
            if status != 0:
                raise HookError(f"{name} failed: {failure_text(status, out, err)}")


def failure_text(status: int, stdout: bytes, stderr: bytes) -> str:
    """``exit status N`` or ``killed by signal N`` for a raw wait status, then the start of
    stdout and stderr, as one line."""
    if os.WIFSIGNALED(status):
        how = f"killed by signal {os.WTERMSIG(status)}"
    else:
        how = f"exit status {os.WEXITSTATUS(status)}"
    return hook_output.failure_line(how, stdout, stderr)


def parse(hooks: tuple[Hook, ...], state: object) -> StartHooks | None:
    """The startContainer ``hooks`` of the spec (parsed and validated by
    :func:`ocispec.spec.parse_hooks`) and the spec member :data:`STATE_KEY` (``state``); None
    when there are none. :class:`SpecError` names the field: each hook needs the explicit
    timeout the host gives it, at most :data:`MAX_TIMEOUT`."""
    if not hooks:
        return None
    for i, hook in enumerate(hooks):
        if hook.timeout is None or hook.timeout > MAX_TIMEOUT:
            raise SpecError(
                f"hooks.{KIND}[{i}].timeout: expected seconds in 1..{MAX_TIMEOUT}, "
                f"got {hook.timeout!r}"
            )
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise SpecError(f"{STATE_KEY}: expected an object")
    return StartHooks(list(hooks), state)
