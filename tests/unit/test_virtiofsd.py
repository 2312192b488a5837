"""Virtiofsd driver against a fake daemon (and the real one when present and root)."""

from __future__ import annotations

import os
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
        "/bin/vfs",
        f"--socket-path={workdir / 's'}",
        "-o",
        f"source={workdir / 'd'}",
        "-o",
        "cache=none",
        "-o",
        "sandbox=namespace",
        "-o",
        "xattr",
        "-o",
        "flock",
    ]


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
