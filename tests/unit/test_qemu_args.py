"""Golden tests of the QEMU command line built from a VMConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.qemu_args import (
    SANDBOX_POLICY,
    Accel,
    AgentSerialPort,
    ConsoleLog,
    Cpu,
    Machine,
    Memory,
    QMPSocket,
    RootPmem,
    VirtioFsShare,
    VMConfig,
    VsockDevice,
    build_argv,
    escape,
)

D = Path("/run/pod")


def config(**overrides: object) -> VMConfig:
    base: dict[str, object] = {
        "name": "pod1",
        "kernel": Path("/img/vmlinux"),
        "initrd": Path("/img/initrd.img"),
        "cmdline": "console=ttyS0 quiet",
        "qmp_socket": D / "qmp.sock",
        "console_log": D / "console.log",
    }
    base.update(overrides)
    return VMConfig(**base)  # type: ignore[arg-type]


def test_full_tcg_pc_golden() -> None:
    cfg = config(
        rootfs=Path("/img/root.erofs"),
        rootfs_size=63 << 21,
        agent_socket=D / "agent.sock",
        shares=(("pod", D / "fs.sock"),),
        pidfile=D / "qemu.pid",
    )
    assert build_argv(cfg, "/usr/bin/qemu-system-x86_64") == [
        "/usr/bin/qemu-system-x86_64",
        "-name", "pod1",
        "-machine", "pc,memory-backend=mem",
        "-accel", "tcg,thread=multi,tb-size=32",
        "-cpu", "max",
        "-smp", "1",
        "-m", "512M,slots=1,maxmem=638M",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", "/img/vmlinux",
        "-initrd", "/img/initrd.img",
        "-append", "console=ttyS0 quiet",
        "-chardev", "file,id=console,path=/run/pod/console.log,append=on",
        "-serial", "chardev:console",
        "-chardev", "socket,id=qmp,path=/run/pod/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-object",
        "memory-backend-file,id=root-mem,mem-path=/img/root.erofs,size=132120576,share=on,"
        "readonly=on",
        "-device", "virtio-pmem-pci,memdev=root-mem,id=root",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", "socket,id=agent,path=/run/pod/agent.sock,server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0",
        "-chardev", "socket,id=fs0,path=/run/pod/fs.sock",
        "-device", "vhost-user-fs-pci,chardev=fs0,tag=pod,queue-size=1024",
        "-pidfile", "/run/pod/qemu.pid",
        "-S",
    ]  # fmt: skip


def test_minimal_kvm_not_paused() -> None:
    cfg = config(accel="kvm", initrd=None, sandbox=False, memory_mib=256, cpus=2)
    assert build_argv(cfg, "qemu", paused=False) == [
        "qemu",
        "-name", "pod1",
        "-machine", "pc",
        "-accel", "kvm",
        "-cpu", "host",
        "-smp", "2",
        "-m", "256M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-kernel", "/img/vmlinux",
        "-append", "console=ttyS0 quiet",
        "-chardev", "file,id=console,path=/run/pod/console.log,append=on",
        "-serial", "chardev:console",
        "-chardev", "socket,id=qmp,path=/run/pod/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip


def test_microvm_uses_mmio_devices_and_non_legacy_global() -> None:
    cfg = config(
        machine="microvm",
        rootfs=Path("/img/root"),
        rootfs_size=2 << 20,
        vsock_cid=7,
        shares=(("a", D / "a.sock"), ("b", D / "b.sock")),
    )
    argv = build_argv(cfg, "qemu")
    assert argv[argv.index("-machine") + 1] == "microvm,memory-backend=mem"
    assert argv[argv.index("-global") + 1] == "virtio-mmio.force-legacy=false"
    devices = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device"]
    assert devices == [
        "virtio-pmem,memdev=root-mem,id=root",
        "vhost-vsock-device,guest-cid=7",
        "vhost-user-fs-device,chardev=fs0,tag=a,queue-size=1024",
        "vhost-user-fs-device,chardev=fs1,tag=b,queue-size=1024",
    ]


def test_q35_uses_pci() -> None:
    argv = build_argv(config(machine="q35", agent_socket=D / "a"), "qemu")
    assert "virtio-serial-pci,id=vser0" in argv
    assert argv[argv.index("-machine") + 1] == "q35"


def test_cpu_override() -> None:
    argv = build_argv(config(cpu="qemu64"), "qemu")
    assert argv[argv.index("-cpu") + 1] == "qemu64"


def test_commas_in_paths_are_escaped() -> None:
    assert escape("/a,b") == "/a,,b"
    assert QMPSocket(Path("/x,y/q.sock")).argv()[1] == (
        "socket,id=qmp,path=/x,,y/q.sock,server=on,wait=off"
    )
    assert ConsoleLog(Path("/l,og")).argv()[1] == "file,id=console,path=/l,,og,append=on"


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (Machine("q35"), ["-machine", "q35"]),
        (Accel("tcg"), ["-accel", "tcg,thread=multi"]),
        (Accel("kvm"), ["-accel", "kvm"]),
        (Accel("tcg", 16), ["-accel", "tcg,thread=multi,tb-size=16"]),
        (Accel("kvm", 16), ["-accel", "kvm"]),
        (Cpu.for_accel("tcg"), ["-cpu", "max"]),
        (Cpu.for_accel("kvm"), ["-cpu", "host"]),
        (Memory(128), ["-m", "128M"]),
        (VsockDevice(3), ["-device", "vhost-vsock-pci,guest-cid=3"]),
        (Memory(128, slots=1, maxmem_mib=130), ["-m", "128M,slots=1,maxmem=130M"]),
        (
            RootPmem(Path("/r,1"), 4 << 20, "mmio"),
            [
                "-object",
                "memory-backend-file,id=root-mem,mem-path=/r,,1,size=4194304,share=on,readonly=on",
                "-device",
                "virtio-pmem,memdev=root-mem,id=root",
            ],
        ),
        (
            VirtioFsShare("t", Path("/s"), 2),
            [
                "-chardev",
                "socket,id=fs2,path=/s",
                "-device",
                "vhost-user-fs-pci,chardev=fs2,tag=t,queue-size=1024",
            ],
        ),
        (
            AgentSerialPort(Path("/a"), name="x.1"),
            [
                "-device",
                "virtio-serial-pci,id=vser0",
                "-chardev",
                "socket,id=agent,path=/a,server=on,wait=off",
                "-device",
                "virtserialport,bus=vser0.0,chardev=agent,name=x.1",
            ],
        ),
    ],
)
def test_option_argv(option: object, expected: list[str]) -> None:
    assert option.argv() == expected  # type: ignore[attr-defined]


def test_sandbox_policy_is_the_documented_one() -> None:
    assert SANDBOX_POLICY == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )


def test_agent_transport_and_sockets() -> None:
    assert config().agent_transport is None
    serial = config(agent_socket=D / "agent.sock")
    assert serial.agent_transport == "serial"
    assert serial.sockets() == (D / "qmp.sock", D / "agent.sock")
    assert config(vsock_cid=3).agent_transport == "vsock"


def test_stderr_log_defaults_next_to_console_log() -> None:
    assert config().stderr_log == D / "console-qemu.log"
    assert config(qemu_log=D / "q.log").stderr_log == D / "q.log"


@pytest.mark.parametrize(
    "overrides",
    [
        {"accel": "hvf"},
        {"machine": "virt"},
        {"memory_mib": 16},
        {"cpus": 0},
        {"agent_socket": D / "a", "vsock_cid": 3},
        {"vsock_cid": 2},
        {"shares": (("t", D / "a"), ("t", D / "b"))},
        {"shares": (("", D / "a"),)},
        {"shares": (("x" * 37, D / "a"),)},
        {"tb_size_mib": 0},
        {"rootfs": Path("/r")},
        {"rootfs_size": 2 << 20},
        {"rootfs": Path("/r"), "rootfs_size": (2 << 20) + 4096},
        {"rootfs": Path("/r"), "rootfs_size": 0},
    ],
)
def test_invalid_config_raises_value_error(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        config(**overrides)


def test_root_image_is_a_read_only_shared_pmem_device_with_a_slot_for_it() -> None:
    """The root image is mapped read-only from the host's page cache (never a writable or
    private copy), and the machine has one memory-device slot with room for all of it."""
    argv = build_argv(config(rootfs=Path("/img/root.erofs"), rootfs_size=3 << 21), "qemu")
    assert argv[argv.index("-m") + 1] == "512M,slots=1,maxmem=518M"
    backend = next(a for a in argv if a.startswith("memory-backend-file,"))
    assert backend.split(",") == [
        "memory-backend-file",
        "id=root-mem",
        "mem-path=/img/root.erofs",
        "size=6291456",
        "share=on",
        "readonly=on",
    ]
    assert "-drive" not in argv
    with pytest.raises(ValueError, match="maxmem_mib"):
        Memory(512, slots=1)
    with pytest.raises(ValueError, match="below"):
        Memory(512, slots=1, maxmem_mib=256)


def test_nics_tap_and_user_golden() -> None:
    from hypervisor.qemu_args import NicConfig

    cfg = config(
        nics=(
            NicConfig("be:5f:58:e1:19:a1", "tap", fd=5, mtu=1400),
            NicConfig("52:54:00:12:34:56", "user"),
        ),
        pidfile=D / "qemu.pid",
    )
    argv = build_argv(cfg, "qemu")
    start = argv.index("-netdev")
    assert argv[start : argv.index("-pidfile")] == [
        "-netdev", "tap,id=net0,fd=5",
        "-device", "virtio-net-pci,netdev=net0,mac=be:5f:58:e1:19:a1,host_mtu=1400,romfile=",
        "-netdev", "user,id=net1,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off",
        "-device", "virtio-net-pci,netdev=net1,mac=52:54:00:12:34:56,romfile=",
    ]  # fmt: skip
    assert cfg.pass_fds() == (5,)
    assert config().pass_fds() == ()


def test_nic_on_microvm_is_a_virtio_mmio_device() -> None:
    from hypervisor.qemu_args import NicConfig

    argv = build_argv(config(machine="microvm", nics=(NicConfig("02:00:00:00:00:01", fd=3),)))
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01" in argv


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mac": "BE:5F:58:E1:19:A1", "fd": 3}, "six lowercase hex pairs"),
        ({"mac": "02:00:00:00:00:01"}, "needs the fd of an open tap"),
        ({"mac": "02:00:00:00:00:01", "backend": "user", "fd": 3}, "takes no fd"),
        ({"mac": "02:00:00:00:00:01", "fd": 3, "mtu": 20}, "outside 68..65535"),
    ],
)
def test_nic_validation(kwargs: dict[str, object], message: str) -> None:
    from hypervisor.qemu_args import NicConfig

    with pytest.raises(ValueError, match=message):
        NicConfig(**kwargs)  # type: ignore[arg-type]


def test_duplicate_nic_macs_are_refused() -> None:
    from hypervisor.qemu_args import NicConfig

    nic = NicConfig("02:00:00:00:00:01", fd=3)
    with pytest.raises(ValueError, match="duplicate nic macs"):
        config(nics=(nic, NicConfig("02:00:00:00:00:01", fd=4)))
