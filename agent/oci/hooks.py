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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.syscalls import Syscalls

KIND = "startContainer"
#: The spec member with the state startContainer hooks receive (less status and pid).
STATE_KEY = "pysandbox.hookState"
#: Characters of a failed hook's stdout and of its stderr quoted in the error.
QUOTED_OUTPUT = 200
#: Largest timeout accepted (seconds): the host's deadline for StartContainer covers it.
MAX_TIMEOUT = 24 * 3600


class Hook:
    """One hook: ``path`` (absolute), ``args`` (argv), ``env`` (None: inherit), ``timeout``."""

    __slots__ = ("args", "env", "path", "timeout")

    def __init__(self, path: str, args: list[str], env: list[str] | None, timeout: int) -> None:
        self.path = path
        self.args = args
        self.env = env
        self.timeout = timeout


class StartHooks:
    """The startContainer hooks of a spec and the state they receive."""

    __slots__ = ("hooks", "state")

    def __init__(self, hooks: list[Hook], state: dict[str, object]) -> None:
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
            try:
                status, out, err = sys.run_hook(
                    hook.path,
                    hook.args,
                    env if hook.env is None else hook.env,
                    payload,
                    hook.timeout,
                )
            except OSError as exc:
                raise HookError(f"{name} could not be run: {exc.strerror or exc}") from exc
            if status is None:
                raise HookError(f"{name} ran past its timeout of {hook.timeout}s and was killed")
            if status != 0:
                raise HookError(f"{name} failed: {failure_text(status, out, err)}")


def failure_text(status: int, stdout: bytes, stderr: bytes) -> str:
    """``exit status N`` or ``killed by signal N`` for a raw wait status, then the start of
    stdout and stderr, as one line."""
    if os.WIFSIGNALED(status):
        how = f"killed by signal {os.WTERMSIG(status)}"
    else:
        how = f"exit status {os.WEXITSTATUS(status)}"
    parts = [how]
    for label, data in (("stdout", stdout), ("stderr", stderr)):
        text = " ".join(data.decode(errors="replace").split())
        if text:
            if len(text) > QUOTED_OUTPUT:
                text = text[:QUOTED_OUTPUT] + "…"
            parts.append(f"{label}: {text}")
    return ", ".join(parts)


def parse(config: dict[str, object]) -> StartHooks | None:
    """The startContainer hooks of a decoded config.json (None when there are none).
    :class:`SpecError` names the field; other kinds are the host's and are ignored here."""
    hooks = config.get("hooks")
    if hooks is None:
        return None
    if not isinstance(hooks, dict):
        raise SpecError("hooks: expected an object")
    entries = hooks.get(KIND)
    if not entries:
        return None
    if not isinstance(entries, list):
        raise SpecError(f"hooks.{KIND}: expected a list")
    parsed = [_hook(entry, f"hooks.{KIND}[{i}]") for i, entry in enumerate(entries)]
    state = config.get(STATE_KEY)
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise SpecError(f"{STATE_KEY}: expected an object")
    return StartHooks(parsed, state)


def _hook(entry: object, where: str) -> Hook:
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: expected an object")
    path = entry.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise SpecError(f"{where}.path: expected an absolute path, got {path!r}")
    args = entry.get("args") or [path]
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}.args: expected a list of strings")
    env = entry.get("env")
    if env is not None and (
        not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env)
    ):
        raise SpecError(f"{where}.env: expected a list of NAME=VALUE strings")
    timeout = entry.get("timeout")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= MAX_TIMEOUT:
        raise SpecError(f"{where}.timeout: expected seconds in 1..{MAX_TIMEOUT}, got {timeout!r}")
    return Hook(path, list(args), list(env) if env else None, timeout)
