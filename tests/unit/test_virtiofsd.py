"""Virtiofsd driver against a fake daemon (and the real one when present and root)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor import virtiofsd as vfs_mod
from hypervisor.errors import VirtiofsdError
from hypervisor.virtiofsd import Virtiofsd, find_virtiofsd, pid_file_for

# Creates --socket-path (unless FAKE_VFS_MODE=exit/silent) and waits for a signal.
FAKE_VIRTIOFSD = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    mode = os.environ.get("FAKE_VFS_MODE", "")
    path = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--socket-path="))
    print("fake-virtiofsd:", " ".join(sys.argv[1:]), flush=True)
    import ctypes
    print("securebits:", ctypes.CDLL(None).prctl(27, 0, 0, 0, 0), flush=True)  # PR_GET_SECUREBITS
    if mode == "exit":
        print("fake-virtiofsd: Cannot lock pid file", flush=True)
        sys.exit(1)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode != "silent":
        s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfs", dir="/tmp"))
    (path / "share").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(workdir: Path) -> Path:
    script = workdir / "fake-virtiofsd"
    script.write_text(f"#!{sys.executable}\n{FAKE_VIRTIOFSD}")
    script.chmod(0o755)
    return script


@pytest.fixture
def daemons() -> Iterator[list[Virtiofsd]]:
    made: list[Virtiofsd] = []
    yield made
    for fs in made:
        fs.stop(timeout=0.1)


def new(workdir: Path, binary: Path, daemons: list[Virtiofsd], **kwargs: object) -> Virtiofsd:
    fs = Virtiofsd(
        workdir / "fs.sock",
        workdir / "share",
        log_path=workdir / "fs.log",
        binary=binary,
        **kwargs,  # type: ignore[arg-type]
    )
    daemons.append(fs)
    return fs


def test_argv(workdir: Path) -> None:
    fs = Virtiofsd(workdir / "s", workdir / "d", cache="none", xattr=True, options=["flock"])
    assert fs.argv(Path("/bin/vfs")) == [
        "/usr/bin/setpriv",
        "--securebits",
        "+no_setuid_fixup",
        "--",
        "/bin/vfs",
        f"--socket-path={workdir / 's'}",
        "-o",
        f"source={workdir / 'd'}",
        "-o",
        "cache=none",
        "-o",
        "sandbox=namespace",
        "-o",
        "no_flock",
        "-o",
        "no_posix_lock",
        "-o",
        "xattr",
        "-o",
        "flock",
    ]


def test_argv_xattr_map_and_acl(workdir: Path) -> None:
    """The container xattr policy: user.*, file capabilities and ACLs pass, the rest is refused."""
    fs = Virtiofsd(
        workdir / "s",
        workdir / "d",
        xattr=True,
        xattr_map=vfs_mod.CONTAINER_XATTR_MAP,
        posix_acl=True,
    )
    argv = fs.argv(Path("/bin/vfs"))
    options = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]
    assert options[-3:] == ["xattr", f"xattrmap={vfs_mod.CONTAINER_XATTR_MAP}", "posix_acl"]
    rules = re.findall(r":(\w+):(\w+):([^:]*):([^:]*):", vfs_mod.CONTAINER_XATTR_MAP)
    assert "".join(f":{t}:{s}:{k}:{p}:" for t, s, k, p in rules) == vfs_mod.CONTAINER_XATTR_MAP
    assert rules == [
        ("ok", "all", "user.", ""),
        ("ok", "all", "security.capability", ""),
        ("ok", "all", "system.posix_acl_access", ""),
        ("ok", "all", "system.posix_acl_default", ""),
        ("bad", "all", "", ""),  # first match wins: everything else is refused and hidden
    ]


def test_argv_direct_io(workdir: Path) -> None:
    argv = Virtiofsd(workdir / "s", workdir / "d", direct_io=True).argv(Path("/bin/vfs"))
    assert argv[-2:] == ["-o", "allow_direct_io"]
    assert "allow_direct_io" not in Virtiofsd(workdir / "s", workdir / "d").argv(Path("/bin/vfs"))


def test_argv_cache_and_attribute_timeout(workdir: Path) -> None:
    """cache=auto alone by default; a given timeout follows the policy as -o timeout=N."""

    def options(fs: Virtiofsd) -> list[str]:
        argv = fs.argv(Path("/bin/vfs"))
        return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]

    plain = options(Virtiofsd(workdir / "s", workdir / "d"))
    assert "cache=auto" in plain and not any(o.startswith("timeout=") for o in plain)
    cached = options(Virtiofsd(workdir / "s", workdir / "d", cache="always", attr_timeout=1.0))
    assert cached[cached.index("cache=always") + 1] == "timeout=1"
    assert options(Virtiofsd(workdir / "s", workdir / "d", attr_timeout=0.5)).count("timeout=0.5")


def test_argv_remote_locks(workdir: Path) -> None:
    """Remote locks: flock and POSIX/OFD locks are taken on the host file."""
    argv = Virtiofsd(workdir / "s", workdir / "d", locks="remote").argv(Path("/bin/vfs"))
    options = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]
    assert options[-2:] == ["flock", "posix_lock"]
    assert "no_flock" not in options and "no_posix_lock" not in options


def test_argv_recheck_permissions(workdir: Path) -> None:
    """Without the setpriv prefix virtiofsd is started directly (host re-checks creates)."""
    fs = Virtiofsd(workdir / "s", workdir / "d", recheck_permissions=True)
    argv = fs.argv(Path("/bin/vfs"), setpriv=Path("/x/setpriv"))
    assert argv[0] == "/bin/vfs"
    assert "/x/setpriv" not in argv


@pytest.mark.parametrize("recheck", [False, True])
def test_started_with_no_setuid_fixup(
    workdir: Path, fake: Path, daemons: list[Virtiofsd], recheck: bool
) -> None:
    """The daemon runs with SECBIT_NO_SETUID_FIXUP (its capabilities survive its per-request
    setresuid) unless it is asked to re-check permissions itself."""
    if os.geteuid() != 0:
        pytest.skip("setting securebits needs CAP_SETPCAP (root)")
    fs = new(workdir, fake, daemons, recheck_permissions=recheck)
    fs.start()
    deadline = time.monotonic() + 5
    while "securebits:" not in (log := (workdir / "fs.log").read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.01)
    bits = int(log.split("securebits:")[1].split()[0])
    assert bool(bits & 0b100) is not recheck, log  # SECBIT_NO_SETUID_FIXUP


def test_start_stop(workdir: Path, fake: Path, daemons: list[Virtiofsd]) -> None:
    fs = new(workdir, fake, daemons, sandbox="chroot")
    fs.start()
    assert fs.alive()
    assert fs.socket_path.exists()
    assert "sandbox=chroot" in (workdir / "fs.log").read_text()
    fs.stop()
    assert not fs.alive()
    assert not fs.socket_path.exists()
    fs.stop()  # idempotent


def test_stop_escalates_to_sigkill(
    workdir: Path, fake: Path, daemons: list[Virtiofsd], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VFS_MODE", "stubborn")
    fs = new(workdir, fake, daemons)
    fs.start()
    fs.stop(timeout=0.2)
    assert not fs.alive()


def test_early_exit(
    workdir: Path, fake: Path, daemons: list[Virtiofsd], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VFS_MODE", "exit")
    fs = new(workdir, fake, daemons)
    with pytest.raises(VirtiofsdError, match=r"exited with status 1.*Cannot lock pid file"):
        fs.start()
    assert not fs.alive()


def test_socket_never_appears(
    workdir: Path, fake: Path, daemons: list[Virtiofsd], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VFS_MODE", "silent")
    fs = new(workdir, fake, daemons, start_timeout=0.3)
    with pytest.raises(VirtiofsdError, match="did not create"):
        fs.start()
    assert not fs.alive()


def test_shared_dir_must_exist(workdir: Path, fake: Path) -> None:
    fs = Virtiofsd(workdir / "s", workdir / "missing", binary=fake)
    with pytest.raises(VirtiofsdError, match="not a directory"):
        fs.start()


def test_attach_and_stop(workdir: Path, fake: Path, daemons: list[Virtiofsd]) -> None:
    fs = new(workdir, fake, daemons)
    fs.start()
    other = Virtiofsd.attach(fs.socket_path, fs.shared_dir, fs.handle.pid, fs.handle.start)
    assert other.alive()
    assert Virtiofsd.attach(fs.socket_path, fs.shared_dir, fs.pid).alive()  # cmdline check
    assert not Virtiofsd.attach(fs.socket_path, fs.shared_dir, os.getpid()).alive()
    other.stop()
    assert not fs.alive()
    assert not fs.socket_path.exists()


def test_pid_file_name() -> None:
    assert pid_file_for(Path("/run/p/fs.sock")) == Path("/var/run/virtiofsd/.run.p.fs.sock.pid")


def test_find_virtiofsd_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(vfs_mod.ENV_VIRTIOFSD, raising=False)
    monkeypatch.setattr(vfs_mod, "CANDIDATES", (tmp_path / "nope",))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VirtiofsdError, match="apt-get install qemu-system-common"):
        find_virtiofsd()


def test_find_virtiofsd_override(monkeypatch: pytest.MonkeyPatch, fake: Path) -> None:
    monkeypatch.setenv(vfs_mod.ENV_VIRTIOFSD, str(fake))
    assert find_virtiofsd() == fake


def _real_virtiofsd() -> Path | None:
    try:
        return find_virtiofsd()
    except VirtiofsdError:
        return None


@pytest.mark.skipif(
    _real_virtiofsd() is None or os.geteuid() != 0, reason="needs virtiofsd and root"
)
def test_real_virtiofsd_start_stop_and_second_instance(
    workdir: Path, daemons: list[Virtiofsd]
) -> None:
    binary = _real_virtiofsd()
    assert binary is not None
    fs = new(workdir, binary, daemons)
    started = time.monotonic()
    fs.start()
    assert time.monotonic() - started < 2
    assert pid_file_for(fs.socket_path).exists()
    # A second daemon on the same socket is refused without disturbing the first.
    twin = new(workdir, binary, daemons)
    with pytest.raises(VirtiofsdError, match="already served"):
        twin.start()
    assert fs.alive()
    assert fs.socket_path.exists()
    fs.stop()
    assert not fs.alive()
    assert not fs.socket_path.exists()
    assert not pid_file_for(fs.socket_path).exists()


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "local"), ("local", "local"), ("remote", "remote")]
)
def test_pod_lock_mode_from_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, mode: str
) -> None:
    from sandbox.pod.lifecycle import lock_mode

    if value is None:
        monkeypatch.delenv("PYSANDBOX_LOCKS", raising=False)
    else:
        monkeypatch.setenv("PYSANDBOX_LOCKS", value)
    assert lock_mode() == mode


def test_pod_lock_mode_refuses_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.errors import ConfigError
    from sandbox.pod.lifecycle import lock_mode

    monkeypatch.setenv("PYSANDBOX_LOCKS", "host")
    with pytest.raises(
        ConfigError, match=r"^PYSANDBOX_LOCKS='host': expected 'local' or 'remote'$"
    ):
        lock_mode()
