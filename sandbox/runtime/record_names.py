"""Names of the files a container's host stand-ins write in its record directory.

Kept apart from :mod:`sandbox.runtime.record` (which imports ``pathlib``, ``shutil`` and the
state store) so that a shim (:mod:`sandbox.runtime.shim`), one per container and idle for
its whole life, needs only the standard library's core to name them.
"""

#: Where the shim records the exit status of a container's init process (JSON: ``status``,
#: ``oom``).
EXIT_FILE = "exit"
#: Suffix of the files naming the host stand-in of a running exec: ``<exec id>.standin`` in
#: the container's directory holds that process's handle (written by the process itself,
#: removed when it ends; a handle whose process is gone is ignored).
STANDIN_SUFFIX = ".standin"


def standin_name(exec_id: str) -> str:
    """The name (in the container's directory) of the file naming exec ``exec_id``'s host
    stand-in (see :data:`STANDIN_SUFFIX`)."""
    return f"{exec_id}{STANDIN_SUFFIX}"
