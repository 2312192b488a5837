"""OCI hooks: validated at create, run at their point of the lifecycle with the state on stdin.

Source: runtime spec config.md "POSIX-platform Hooks" and runtime.md "Lifecycle". Where each
kind runs, and why (docs/hooks.md):

- ``prestart``, ``createRuntime``, ``createContainer``: here, on the host, in the runtime's
  namespaces, during ``create`` once the container exists in its VM (its namespaces set up,
  its process waiting for ``start``), in that order, with status ``creating``. A failure
  fails ``create``, which undoes everything.
- ``startContainer``: in the guest, inside the container after pivot_root, by the in-guest
  runtime (``agent/oci/hooks.py``): :func:`for_guest` puts them into the guest's spec. A
  failure fails ``start`` and the container's process exits (stopped).
- ``poststart`` (in ``start``, status ``running``) and ``poststop`` (in ``delete``, status
  ``stopped``): here, on the host; a failure is a warning and the remaining hooks still run.

A hook is ``{"path": str, "args": [str], "env": [str], "timeout": int}``: ``path`` absolute,
``args`` the whole argv (``args[0]`` is argv[0]; ``[path]`` when absent), ``env`` exactly the
hook's environment, ``timeout`` seconds (> 0) after which the hook's process group is killed
and the hook has failed; without one, :data:`DEFAULT_TIMEOUT` applies. As under runc (measured,
runc 1.1), a hook without ``env`` inherits the environment of what runs it: the runtime's for
host hooks, the container process's for createContainer and startContainer; host hooks run in
the bundle directory, createContainer in the rootfs, startContainer in the process's cwd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ocispec import hook_output
from sandbox.errors import HookError

if TYPE_CHECKING:
    from ocispec.spec import Hook
    from sandbox.runtime.record import ContainerRecord

#: Every kind, in the order of the lifecycle (runtime.md "Lifecycle", steps 3-5, 7, 9, 13).
KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
#: The kinds ``create`` runs on the host, in this order.
CREATE_KINDS = ("prestart", "createRuntime", "createContainer")
#: The kind run in the guest, in the container's namespaces.
GUEST_KIND = "startContainer"
#: Seconds a hook without a ``timeout`` may run (runc waits forever: a hung hook would hang
#: create or start, and a guest call needs a deadline).
DEFAULT_TIMEOUT = 120
#: Member of the guest's spec carrying the state its startContainer hooks receive (less
#: status and pid, which the in-guest runtime fills in). docs/oci-in-guest.md.
GUEST_STATE_KEY = "pysandbox.hookState"

Hooks = dict[str, list[dict[str, Any]]]


def parse_hooks(hooks: dict[str, tuple[Hook, ...]]) -> Hooks:
    """The hooks ocispec parsed from config.json (``Spec.hooks``, validated there), as this
    runtime keeps them in the container's record: kind -> list of hooks, each with ``path``,
    ``args`` (``[path]`` when not given), ``env`` and ``timeout`` (an int, or None)."""
    return {
        kind: [
            {
                "path": hook.path,
                "args": list(hook.args) or [hook.path],
                "env": list(hook.env),
                "timeout": hook.timeout,
            }
            for hook in entries
        ]
        for kind, entries in hooks.items()
        if kind in KINDS and entries
    }


def state(record: ContainerRecord, status: str, pid: int | None) -> dict[str, Any]:
    """The state a hook reads on stdin (runtime.md "State"): ociVersion, id, status, pid
    (left out when None: poststop, as runc), bundle, annotations."""
    from sandbox.runtime.record import OCI_VERSION

    doc: dict[str, Any] = {"ociVersion": OCI_VERSION, "id": record.id, "status": status}
    if pid is not None:
        doc["pid"] = pid
    doc["bundle"] = record.data.get("bundle", "")
    doc["annotations"] = record.data.get("annotations") or {}
    return doc


def run_hooks(
    hooks: Hooks,
    kind: str,
    doc: dict[str, Any],
    *,
    cwd: str,
    inherited_env: list[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Run the ``kind`` hooks in order, here on the host, each with ``doc`` (JSON) on stdin,
    in directory ``cwd``; a hook without ``env`` gets ``inherited_env`` (None: this process's
    environment).

    Without ``warn`` the first failure raises :class:`HookError` and the rest do not run
    (create's hooks); with it each failure is passed to ``warn`` and the next hook runs
    (poststart, poststop: runtime.md says to log a warning and carry on).
    """
    payload = json.dumps(doc, separators=(",", ":")).encode()  # compact, as runc writes it
    if not os.path.isdir(cwd):
        cwd = "/"  # e.g. a bundle removed before delete: the hook still runs
    for index, hook in enumerate(hooks.get(kind, ())):
        env_list = hook.get("env") or inherited_env
        env = dict(os.environ) if env_list is None else _environ(env_list)
        try:
            _run_one(kind, index, hook, payload, env, cwd)
        except HookError as exc:
            if warn is None:
                raise
            warn(str(exc))


def warn_stderr(message: str) -> None:
    """The default ``warn``: one line on stderr."""
    import sys

    print(f"pysandbox: warning: {message}", file=sys.stderr)


def _environ(entries: list[str]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _run_one(
    kind: str, index: int, hook: dict[str, Any], payload: bytes, env: dict[str, str], cwd: str
) -> None:
    import subprocess

    path = hook["path"]
    timeout = hook.get("timeout") or DEFAULT_TIMEOUT
    name = f"{kind} hook #{index} ({path})"
    out, err = os.memfd_create("hook-stdout"), os.memfd_create("hook-stderr")
    try:
        try:
            proc = subprocess.Popen(
                hook.get("args") or [path],
                executable=path,
                env=env,
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                process_group=0,  # killed as a group when it runs past its timeout
            )
        except OSError as exc:
            raise HookError(
                f"{name} could not be run: {exc.strerror or exc}", hook=kind, index=index, path=path
            ) from None
        try:
            proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            raise HookError(
                f"{name} ran past its timeout of {timeout}s and was killed",
                hook=kind,
                index=index,
                path=path,
            ) from None
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        if proc.returncode != 0:
            raise HookError(
                f"{name} failed: {failure_text(proc.returncode, _head(out), _head(err))}",
                hook=kind,
                index=index,
                path=path,
            )
    finally:
        os.close(out)
        os.close(err)


def failure_text(returncode: int, stdout: bytes, stderr: bytes) -> str:
    """``exit status N`` or ``killed by signal N``, then the start of stdout and stderr, as
    one line (runc's error shows both outputs as well)."""
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return hook_output.failure_line(how, stdout, stderr)


def _head(fd: int) -> bytes:
    return os.pread(fd, hook_output.QUOTED_OUTPUT * 4, 0)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def for_guest(guest_spec: dict[str, Any], hooks: Hooks, doc: dict[str, Any]) -> None:
    """Leave only the guest's hooks in ``guest_spec`` (a copy bound for the guest).

    Host hooks are removed (their paths mean nothing there). startContainer hooks stay, each
    with its timeout made explicit, and :data:`GUEST_STATE_KEY` carries ``doc`` (the state
    without status and pid, which the guest fills in).
    """
    guest_spec.pop("hooks", None)
    guest_spec.pop(GUEST_STATE_KEY, None)
    start = hooks.get(GUEST_KIND)
    if not start:
        return
    guest_spec["hooks"] = {
        GUEST_KIND: [{**hook, "timeout": hook.get("timeout") or DEFAULT_TIMEOUT} for hook in start]
    }
    guest_spec[GUEST_STATE_KEY] = {k: v for k, v in doc.items() if k not in ("status", "pid")}


def guest_seconds(hooks: Hooks) -> float:
    """The longest the guest's startContainer hooks may take together (seconds)."""
    return float(sum(h.get("timeout") or DEFAULT_TIMEOUT for h in hooks.get(GUEST_KIND, ())))
