"""The VMM jail without a VM: settings, id leases, the fd form of QEMU's command line, and
a real jailed process (root only) whose credentials and root are read from /proc."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor import jail, jail_ids, qemu_jail
from hypervisor.errors import JailError, VirtiofsdError
from hypervisor.jail_ids import Identity, Settings
from hypervisor.qemu_args import ChannelFds, VirtioFsShare, VMConfig, build_argv

FIRST = 2_130_706_432


@pytest.fixture
def leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "ids"
    monkeypatch.setattr(jail_ids, "LEASE_DIR", directory)
    return directory


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (jail_ids.ENV_JAIL, jail_ids.ENV_IDS, jail_ids.ENV_USER):
        monkeypatch.delenv(name, raising=False)


# -- settings ------------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_default_settings_are_a_range() -> None:
    settings = jail_ids.settings()
    assert settings.enabled and settings.user is None
    assert settings.ids == jail_ids.DEFAULT_RANGE


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("value", ["off", "0", "no", "false", "OFF"])
def test_explicit_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(jail_ids.ENV_JAIL, value)
    assert not jail_ids.settings().enabled


@pytest.mark.usefixtures("clean_env")
def test_unknown_switch_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jail_ids.ENV_JAIL, "maybe")
    with pytest.raises(JailError, match="PYSANDBOX_JAIL='maybe': expected 'on' or 'off'"):
        jail_ids.settings()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("bogus", "is not FIRST-LAST"),
        ("100-", "is not FIRST-LAST"),
        ("5-3", "ids must satisfy"),
        ("10-2000", "ids must satisfy 1000 <= FIRST"),
        ("3000-2000", "ids must satisfy"),
        ("1000-4294967295", "<= 4294967294"),
    ],
)
def test_bad_ranges_name_the_variable_and_the_fix(raw: str, message: str) -> None:
    with pytest.raises(JailError) as info:
        jail_ids.parse_range(raw)
    text = str(info.value)
    assert message in text and f"PYSANDBOX_JAIL_IDS={raw!r}" in text
    assert "PYSANDBOX_JAIL_USER=NAME" in text and "\n" not in text


def test_good_range() -> None:
    assert jail_ids.parse_range("70000-70009") == (70000, 70009)


@pytest.mark.usefixtures("clean_env")
def test_shared_user(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setenv(jail_ids.ENV_USER, "nobody")
    assert jail_ids.settings().user == Identity(nobody.pw_uid, nobody.pw_gid)
    monkeypatch.setenv(jail_ids.ENV_USER, "root")
    with pytest.raises(JailError, match="is root"):
        jail_ids.settings()
    monkeypatch.setenv(jail_ids.ENV_USER, "no-such-user-x")
    with pytest.raises(JailError, match="no such user"):
        jail_ids.settings()


# -- leases --------------------------------------------------------------------------------


def test_each_owner_gets_its_own_id(leases: Path, tmp_path: Path) -> None:
    config = Settings(enabled=True, ids=(FIRST, FIRST + 9))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first, second = jail_ids.allocate(config, a), jail_ids.allocate(config, b)
    assert first == Identity(FIRST, FIRST) and second == Identity(FIRST + 1, FIRST + 1)
    assert jail_ids.in_use(config) == 2
    jail_ids.release(first, b)  # not b's lease: kept
    assert jail_ids.in_use(config) == 2
    jail_ids.release(first, a)
    assert jail_ids.in_use(config) == 1
    assert jail_ids.allocate(config, a) == first


def test_exhausted_range(leases: Path, tmp_path: Path) -> None:
    config = Settings(enabled=True, ids=(FIRST, FIRST))
    owner = tmp_path / "vm"
    owner.mkdir()
    jail_ids.allocate(config, owner)
    with pytest.raises(JailError) as info:
        jail_ids.allocate(config, tmp_path)
    assert str(info.value) == (
        f"no free VM id: all 1 ids of the jail range {FIRST}-{FIRST} are used by running VMs "
        "(or are accounts); widen PYSANDBOX_JAIL_IDS or stop some pods"
    )


def test_stale_leases_are_reclaimed(leases: Path, tmp_path: Path) -> None:
    config = Settings(enabled=True, ids=(FIRST, FIRST))
    owner = tmp_path / "vm"
    owner.mkdir()
    identity = jail_ids.allocate(config, owner)
    owner.rmdir()  # the pod directory is gone: its lease is stale
    assert jail_ids.allocate(config, tmp_path) == identity
    owner.mkdir()
    # A lease whose process exited is stale too.
    jail_ids.record(identity, owner, os.getpid(), 1)  # start time 1: not this process
    assert jail_ids.allocate(config, tmp_path) == identity
    # A lease whose process lives is kept; it goes with release_process.
    from hypervisor.process import ProcessHandle

    me = ProcessHandle.of(os.getpid())
    jail_ids.record(identity, tmp_path, me.pid, me.start)
    with pytest.raises(JailError):
        jail_ids.allocate(config, owner)
    jail_ids.release_process(me.pid, me.start)
    assert jail_ids.allocate(config, owner) == identity


def test_a_lease_without_process_expires(
    leases: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Settings(enabled=True, ids=(FIRST, FIRST))
    identity = jail_ids.allocate(config, tmp_path)
    past = time.time() - jail_ids.LAUNCH_GRACE - 1
    os.utime(leases / str(identity.uid), (past, past))
    assert jail_ids.allocate(config, tmp_path) == identity


def test_accounts_are_skipped(leases: Path, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    config = Settings(enabled=True, ids=(nobody, nobody + 1))
    got = jail_ids.allocate(config, tmp_path)
    assert got.uid != nobody


# -- QEMU's command line with fds ----------------------------------------------------------

D = Path("/run/pod")


def config(**overrides: object) -> VMConfig:
    values: dict[str, object] = {
        "name": "vm",
        "kernel": Path("/img/vmlinux"),
        "initrd": Path("/img/initrd"),
        "rootfs": Path("/img/root.erofs"),
        "rootfs_size": 2 << 20,
        "cmdline": "console=ttyS0",
        "qmp_socket": D / "qmp.sock",
        "agent_socket": D / "agent-serial.sock",
        "console_log": D / "console.log",
        "pidfile": D / "qemu.pid",
        "shares": (("pod", D / "virtiofsd.sock"),),
    }
    values.update(overrides)
    return VMConfig(**values)  # type: ignore[arg-type]


def _after(argv: list[str], flag: str, contains: str) -> str:
    return next(
        argv[i + 1] for i, arg in enumerate(argv) if arg == flag and contains in argv[i + 1]
    )


def test_channel_fds_replace_paths() -> None:
    fds = ChannelFds(qmp=10, console=11, agent=12, shares=(13,))
    argv = build_argv(config(channel_fds=fds, pidfile=None))
    assert _after(argv, "-chardev", "id=qmp") == "socket,id=qmp,fd=10,server=on,wait=off"
    assert _after(argv, "-chardev", "id=agent") == "socket,id=agent,fd=12,server=on,wait=off"
    assert _after(argv, "-chardev", "id=fs0") == "socket,id=fs0,fd=13"
    assert _after(argv, "-add-fd", "fd=") == f"fd=11,set=1,opaque={D}/console.log"
    assert _after(argv, "-chardev", "id=console") == "file,id=console,path=/dev/fdset/1"
    # Nothing of the pod directory is left to open; it is only named, as the fd's label.
    assert [arg for arg in argv if str(D) in arg] == [f"fd=11,set=1,opaque={D}/console.log"]
    assert config(channel_fds=fds).pass_fds() == (10, 11, 12, 13)
    # Without fds the same options name the paths.
    plain = build_argv(config())
    assert _after(plain, "-chardev", "id=qmp").startswith(f"socket,id=qmp,path={D}/qmp.sock,")


def test_channel_fds_must_match_the_config() -> None:
    with pytest.raises(ValueError, match="one fd per virtio-fs share"):
        config(channel_fds=ChannelFds(qmp=1, console=2, agent=3))
    with pytest.raises(ValueError, match="agent must be set exactly"):
        config(channel_fds=ChannelFds(qmp=1, console=2, shares=(4,)))


def test_share_hotplug_by_fd() -> None:
    commands = VirtioFsShare("pod", D / "v.sock").hotplug("fs0-socket")
    backend = commands[0][1]["backend"]
    assert backend == {
        "type": "socket",
        "data": {"addr": {"type": "fd", "data": {"str": "fs0-socket"}}, "server": False},
    }


def test_binds_hold_usr_devices_and_the_image() -> None:
    binds = qemu_jail.binds_for(config(), Path("/usr/bin/qemu-system-x86_64"))
    sources = {str(b.source): b.writable for b in binds}
    assert sources["/usr"] is False
    for device in jail.DEVICES:
        assert sources[device] is True
    for image in ("/img/vmlinux", "/img/initrd", "/img/root.erofs"):
        assert sources[image] is False
    assert "/dev/kvm" not in sources
    assert not any(s.startswith(str(D)) for s in sources)
    kvm = qemu_jail.binds_for(config(accel="kvm"), Path("/usr/bin/qemu-system-x86_64"))
    assert any(str(b.source) == "/dev/kvm" and b.writable for b in kvm)


def test_prepare_opens_everything_as_fds(leases: Path, tmp_path: Path) -> None:
    vfs = socket.socket(socket.AF_UNIX)
    vfs.bind(str(tmp_path / "virtiofsd.sock"))
    vfs.listen(1)
    vm = config(
        qmp_socket=tmp_path / "qmp.sock",
        agent_socket=tmp_path / "agent-serial.sock",
        console_log=tmp_path / "console.log",
        pidfile=tmp_path / "qemu.pid",
        shares=(("pod", tmp_path / "virtiofsd.sock"),),
    )
    settings = Settings(enabled=True, ids=(FIRST, FIRST))
    launch = qemu_jail.prepare(vm, Path("/usr/bin/qemu-system-x86_64"), settings)
    try:
        assert launch.config.pidfile is None and launch.config.channel_fds is not None
        for sock in (vm.qmp_socket, vm.agent_socket):
            assert sock is not None
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # only root connects
        assert launch.identity == Identity(FIRST, FIRST)
        assert len(launch.config.pass_fds()) == 4
        with pytest.raises(JailError):  # its id is taken until released
            qemu_jail.prepare(vm, Path("/usr/bin/qemu-system-x86_64"), settings)
    finally:
        launch.abandon()
        vfs.close()
    assert not vm.qmp_socket.exists() and not (tmp_path / "agent-serial.sock").exists()
    assert jail_ids.in_use(settings) == 0


def test_prepare_failure_leaves_nothing(leases: Path, tmp_path: Path) -> None:
    """No virtiofsd listens (it died after starting): VirtiofsdError naming the share and
    its socket, not a jail error (it said "cannot prepare the jail", breaker4); sockets and
    lease are gone."""
    vm = config(
        qmp_socket=tmp_path / "qmp.sock",
        agent_socket=tmp_path / "agent-serial.sock",
        console_log=tmp_path / "console.log",
        shares=(("pod", tmp_path / "virtiofsd.sock"),),
    )
    settings = Settings(enabled=True, ids=(FIRST, FIRST))
    with pytest.raises(VirtiofsdError, match=r"virtiofsd of share pod .* on \S*virtiofsd\.sock"):
        qemu_jail.prepare(vm, Path("/usr/bin/qemu-system-x86_64"), settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "ids"]
    assert jail_ids.in_use(settings) == 0


# -- a real jailed process -----------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and setuid need root")


@pytest.fixture
def jailed_sleep(tmp_path: Path) -> Iterator[int]:
    spec = jail.JailSpec(Identity(FIRST, FIRST), tuple(jail.default_binds(Path("/usr/bin/sleep"))))
    with open(tmp_path / "out", "wb") as out:
        handle = jail.spawn(["/usr/bin/sleep", "30"], spec, stdout=out, what="sleep")
    try:
        yield handle.pid
    finally:
        handle.kill()


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@needs_root
def test_jailed_process_has_no_privileges(jailed_sleep: int) -> None:
    fields = _status(jailed_sleep)
    assert fields["Uid"].split() == [str(FIRST)] * 4
    assert fields["Gid"].split() == [str(FIRST)] * 4
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[caps], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["NSpid"].split()[-1] == "1"
    for kind in ("mnt", "pid", "ipc", "uts", "net"):
        assert os.readlink(f"/proc/{jailed_sleep}/ns/{kind}") != os.readlink(
            f"/proc/self/ns/{kind}"
        )
    limits = Path(f"/proc/{jailed_sleep}/limits").read_text()
    assert "Max core file size        0                    0" in limits


@needs_root
def test_jailed_root_is_minimal_and_read_only(jailed_sleep: int) -> None:
    root = Path(f"/proc/{jailed_sleep}/root")
    names = set(os.listdir(root))
    links = {
        n for n in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.islink(f"/{n}")
    }
    assert names == {"usr", "dev"} | links
    assert sorted(os.listdir(root / "dev")) == sorted(Path(d).name for d in jail.DEVICES)
    with pytest.raises(OSError) as info:
        (root / "x").write_text("x")
    assert info.value.errno == 30  # EROFS
    with pytest.raises(OSError) as info:
        (root / "usr" / "x").write_text("x")
    assert info.value.errno == 30


@needs_root
def test_host_network_keeps_the_namespace(tmp_path: Path) -> None:
    spec = jail.JailSpec(
        Identity(FIRST, FIRST),
        tuple(jail.default_binds(Path("/usr/bin/sleep"))),
        host_network=True,
    )
    with open(tmp_path / "out", "wb") as out:
        handle = jail.spawn(["/usr/bin/sleep", "30"], spec, stdout=out)
    try:
        assert os.readlink(f"/proc/{handle.pid}/ns/net") == os.readlink("/proc/self/ns/net")
    finally:
        handle.kill()


@needs_root
def test_jail_failure_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-image"
    spec = jail.JailSpec(Identity(FIRST, FIRST), (jail.Bind(Path("/usr")), jail.Bind(missing)))
    with open(tmp_path / "out", "wb") as out, pytest.raises(JailError) as info:
        jail.spawn(["/usr/bin/sleep", "30"], spec, stdout=out, what="sleep")
    text = str(info.value)
    assert "\n" not in text and "cannot set up the jail of sleep" in text
    assert f"bind {missing}" in text
    from tests.processes import processes_mentioning

    assert processes_mentioning("/usr/bin/sleep 30", live_only=True) == []
