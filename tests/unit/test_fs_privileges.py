"""The seccomp filter and capability options that keep guest files powerless on the host.

The filter is installed for real in a child process (with no_new_privs, so no root needed)
that then tries what virtiofsd would do for a guest: every call that would leave a setuid or
setgid bit is refused with EPERM, everything else works as before.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypervisor import fs_privileges
from hypervisor.virtiofsd import Virtiofsd

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import ctypes, errno, json, os, stat, sys
    from hypervisor.fs_privileges import Filter
    work = sys.argv[1]
    seccomp = Filter()
    assert ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    seccomp.install()
    os.chdir(work)
    results = {}
    def attempt(name, call):
        try:
            call()
            results[name] = "ok"
        except OSError as exc:
            results[name] = errno.errorcode[exc.errno]
    open("f", "w").close()
    dir_fd = os.open(".", os.O_RDONLY)
    file_fd = os.open("f", os.O_RDONLY)
    attempt("chmod 4755", lambda: os.chmod("f", 0o4755))
    attempt("chmod 2755", lambda: os.chmod("f", 0o2755))
    attempt("chmod 6755", lambda: os.chmod("f", 0o6755))
    attempt("chmod 1777", lambda: os.chmod("f", 0o1777))
    attempt("chmod 755", lambda: os.chmod("f", 0o755))
    attempt("fchmod 4755", lambda: os.fchmod(file_fd, 0o4755))
    attempt("fchmod 644", lambda: os.fchmod(file_fd, 0o644))
    attempt("fchmodat 2755", lambda: os.chmod("f", 0o2755, dir_fd=dir_fd))
    attempt("create 4755", lambda: os.close(os.open("g", os.O_CREAT | os.O_WRONLY, 0o4755)))
    attempt("create 644", lambda: os.close(os.open("h", os.O_CREAT | os.O_WRONLY, 0o644)))
    attempt("open existing", lambda: os.close(os.open("f", os.O_RDONLY)))
    attempt("mknod fifo 4644", lambda: os.mknod("p1", stat.S_IFIFO | 0o4644))
    attempt("mknod fifo 644", lambda: os.mknod("p2", stat.S_IFIFO | 0o644))
    attempt("mkdir 2755", lambda: os.mkdir("d", 0o2755))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = (ctypes.c_uint64 * 3)(os.O_CREAT | os.O_WRONLY, 0o4755, 0)
    rc = libc.syscall(437, -100, b"o2", ctypes.byref(how), ctypes.c_size_t(24))
    results["openat2"] = "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
    modes = {n: oct(stat.S_IMODE(os.lstat(n).st_mode)) for n in sorted(os.listdir("."))}
    print(json.dumps({"results": results, "modes": modes}))
    """
)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="no syscall table")
def test_filter_refuses_setuid_and_setgid_modes_and_nothing_else(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["results"] == {
        "chmod 4755": "EPERM",
        "chmod 2755": "EPERM",
        "chmod 6755": "EPERM",
        "chmod 1777": "ok",
        "chmod 755": "ok",
        "fchmod 4755": "EPERM",
        "fchmod 644": "ok",
        "fchmodat 2755": "EPERM",
        "create 4755": "EPERM",
        "create 644": "ok",
        "open existing": "ok",
        "mknod fifo 4644": "EPERM",
        "mknod fifo 644": "ok",
        "mkdir 2755": "ok",  # the kernel drops both bits from mkdir's mode
        "openat2": "ENOSYS",
    }
    modes = report["modes"]
    assert not any(int(mode, 8) & 0o6000 for mode in modes.values()), modes
    assert sorted(modes) == ["d", "f", "h", "p2"]


def test_programs_for_each_machine() -> None:
    for machine in ("x86_64", "aarch64"):
        program = fs_privileges.seccomp_program(machine)
        assert len(program) % 8 == 0 and 0 < len(program) // 8 < 256
    with pytest.raises(ValueError, match="no seccomp syscall table for mips"):
        fs_privileges.seccomp_program("mips")


def test_virtiofsd_without_privileged_files_drops_capabilities(tmp_path: Path) -> None:
    default = Virtiofsd(tmp_path / "s", tmp_path / "d").argv(Path("/bin/vfs"))
    restricted = Virtiofsd(tmp_path / "s", tmp_path / "d", privileged_files=False)
    assert restricted.argv(Path("/bin/vfs")) == [
        *default,
        "-o",
        "modcaps=-mknod:-fsetid:-setfcap",
    ]
