"""The watcher of a detached run's shim (see :mod:`sandbox.runtime.shim`): a ``/bin/sh``.

:func:`sandbox.runtime.shim.spawn` makes a pipe before it starts the shim of a detached run;
the shim inherits the write end (and never writes to it, nor hands it to a child: its
subprocesses close every fd they are not given), and :func:`argv` is started with the read
end as its stdin. The pipe reads end-of-file once the shim is gone — on its exit and on its
SIGKILL alike, since the kernel closes a dead process's fds — which is what the watcher waits
for (``TIMEOUT`` seconds at most, through coreutils' ``timeout`` and ``head``); it then becomes
(exec) ``python -m sandbox.run.monitor ROOT NAME``, which releases the run's VM: with
``--kill`` if the timeout passed, with ``--broken`` if the shim wrote the line ``broken`` first
(the pod lost a process the container needs, its virtiofsd: the container's processes then
wait for their files for ever, so the shim would never end on its own). It keeps root's
capabilities (the shim has none): releasing a run kills its jailed QEMU and unmounts its files.

Until then it is a shell waiting in ``read``: ~0.3 MiB PSS, where the Python interpreter that
waited on a pidfd of the shim before was ~4 MiB (docs/performance.md, "Lean host processes,
part 3"). Its command line names :data:`LABEL` (the shell's ``$0``), by which tests and
``bench/footprint.py`` find it.
"""

from __future__ import annotations

#: ``$0`` of the watcher's shell: what its command line shows.
LABEL = "sandbox.runtime.shim_watch"

#: ``sh -c SCRIPT LABEL PYTHON ROOT NAME [TIMEOUT]``: stdin is the pipe's read end. ``read``
#: (a builtin: no second process) returns at the first line or at end-of-file; ``timeout``
#: exits 124 when it had to stop ``head``, which ends there too.
SCRIPT = """\
py=$1 root=$2 name=$3 limit=$4 line=
set --
if [ -n "$limit" ]; then
  line=$(timeout "$limit" head -n 1)
  [ "$?" -ne 124 ] || set -- --kill
else
  read -r line || :
fi
[ "$line" != broken ] || set -- --broken
exec "$py" -m sandbox.run.monitor "$root" "$name" "$@" </dev/null
"""

#: The shell (dash on Debian): POSIX ``read``, ``set``, ``exec``.
SHELL = "/bin/sh"


def argv(python: str, root: str, name: str, timeout: float | None) -> list[str]:
    """The watcher's command line: ``python`` (the interpreter the monitor runs with), the
    run's state ``root`` and ``name``, ``timeout`` in seconds (None: wait for the shim only).
    """
    extra = [] if timeout is None else [repr(float(timeout))]
    return [SHELL, "-c", SCRIPT, LABEL, python, root, name, *extra]
