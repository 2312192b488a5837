"""Compiled seccomp programs kept between the runtimes of one guest, by profile.

Every ``exec`` into a container that has a seccomp profile (docker's default is the usual one)
gets that profile in its process object, and its runtime must load the filter. Compiling it
(:func:`ocispec.seccomp.compile`, Python) took ~8 ms under TCG, the largest single step of an
exec's runtime (docs/performance.md, "Session 11"). The program depends only on the profile
and on this guest's machine and compiler, which do not change during a VM's life; so the
first runtime that compiles a profile keeps the program in :data:`DIRECTORY`, named by the
SHA-256 of the profile's canonical JSON, and the later ones read it instead.

Safety: only the guest's root reaches the directory (a tmpfs path of the guest's own, outside
every container's mount namespace and root, mode 0700); a program is written under a
temporary name and renamed into place, so a reader sees a whole file or none; a file that is
not one (shorter than its header, not whole instructions) is compiled anew. A profile that
does not compile is never kept: its SpecError is raised by every runtime that receives it,
word for word as before. At most :data:`MAX_ENTRIES` programs are kept (one per distinct
profile; a few KiB each).
"""

from __future__ import annotations

import hashlib
import json
import os

from ocispec import seccomp
from ocispec.spec import seccomp_filter

#: Where the programs are kept (the guest's /run is a tmpfs; no container sees it).
DIRECTORY = "/run/pysandbox-seccomp"
#: Programs kept at most; past it a new profile is compiled by every runtime that needs it.
MAX_ENTRIES = 64
#: A kept file: the seccomp(2) flags (4 bytes, little-endian), then the program.
_HEADER = 4


def key(profile: object) -> str:
    """The name a profile's program is kept under: SHA-256 of its canonical JSON, in hex."""
    text = json.dumps(profile, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def compiled(profile: object, where: str, directory: str = DIRECTORY) -> seccomp.Filter:
    """The filter of ``profile`` (an OCI linux.seccomp object): the one kept in
    ``directory``, else compiled (and kept). ``where`` is the profile's field path for the
    compiler's SpecError, exactly as :func:`ocispec.spec.parse_process` would raise it."""
    if not isinstance(profile, dict):  # the compiler's own error says what is wrong
        return seccomp_filter(profile, where)
    name = key(profile)
    kept = _read(f"{directory}/{name}")
    if kept is not None:
        return kept
    found = seccomp_filter(profile, where)
    _keep(directory, name, found)
    return found


def _read(path: str) -> seccomp.Filter | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    program = data[_HEADER:]
    if len(data) <= _HEADER or len(program) % 8:
        return None
    return seccomp.Filter(program, int.from_bytes(data[:_HEADER], "little"))


def _keep(directory: str, name: str, found: seccomp.Filter) -> None:
    """Write ``found`` as ``directory/name``; silently nothing when it cannot be (the cache
    is an optimisation: the next runtime compiles again)."""
    temporary = f"{directory}/.{name}.{os.getpid()}"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if len(os.listdir(directory)) >= MAX_ENTRIES:
            return
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        data = found.flags.to_bytes(_HEADER, "little") + found.program
        try:
            if os.write(fd, data) != len(data):
                raise OSError("short write")
        finally:
            os.close(fd)
        os.rename(temporary, f"{directory}/{name}")
    except OSError:
        try:  # noqa: SIM105 - contextlib is one more import in the runtime
            os.unlink(temporary)
        except OSError:
            pass
