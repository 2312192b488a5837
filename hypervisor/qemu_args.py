"""QEMU command line as typed values.

Every QEMU option is a small frozen dataclass whose :meth:`argv` renders exactly the
arguments it stands for; :func:`vm_options` chooses the options a :class:`VMConfig` needs,
in a fixed order, and :func:`build_argv` flattens them. No helper mutates a shared list, so
the golden tests in ``tests/unit/test_qemu_args.py`` can pin the whole command line.

Values embedded in a ``key=value,...`` option string go through :func:`escape` (QEMU
doubles commas). Paths are rendered as given: callers pass absolute paths.

Device naming: ``pc`` and ``q35`` put virtio devices on PCI (``virtio-serial-pci``...);
``microvm`` has no PCI and uses virtio-mmio (``virtio-serial-device``...), for which QEMU
needs ``-global virtio-mmio.force-legacy=false`` so vhost-user devices work.

The guest's root image is a virtio-pmem device (:class:`RootPmem`, docs/root-device.md): the
guest maps the image's pages (erofs ``dax=always``) straight from the host's page cache, so
every VM shares one copy instead of holding its own in its page cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from hypervisor.guest_image import PMEM_ALIGN

Accelerator = Literal["tcg", "kvm"]
MachineType = Literal["pc", "q35", "microvm"]
Bus = Literal["pci", "mmio"]

ACCELERATORS: tuple[Accelerator, ...] = ("tcg", "kvm")
MACHINES: tuple[MachineType, ...] = ("pc", "q35", "microvm")

#: ``-sandbox`` seccomp policy (QEMU 7.2 accepts it; measured to still boot with
#: virtio-fs, virtio-serial and a file console): no obsolete syscalls, no setuid,
#: no fork/exec, no scheduler/affinity changes.
SANDBOX_POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: vCPUs of a pod VM: the guest's CPUs are numbered 0..DEFAULT_CPUS-1 (cpuset lists).
DEFAULT_CPUS = 1


def host_cpus() -> int:
    """The CPUs this process may run on (``sched_getaffinity``): the most vCPUs a VM gets
    (under TCG each vCPU is a host thread; more would only contend with each other)."""
    return len(os.sched_getaffinity(0))


#: Maximum length of a virtio-fs tag (bytes), fixed by the virtio spec.
MAX_FS_TAG = 36
#: TCG translation buffer (MiB) of pod VMs. QEMU 7.2's default reserves 1 GiB and an idle
#: restored pod had touched ~60 MiB of it (PSS); 32 MiB bounds that at no measured cost to
#: ``exec`` latency, while 16 MiB made ``exec true`` slower (retranslation after each flush).
#: See docs/performance.md, "Host footprint".
TCG_TB_SIZE_MIB = 32
#: Id of the shared memory backend required by vhost-user devices.
MEMORY_BACKEND_ID = "mem"


def escape(value: str | Path) -> str:
    """Escape ``value`` for use inside a QEMU ``key=value,...`` option (commas doubled)."""
    return str(value).replace(",", ",,")


def _socket_address(path: Path, fd: int | None) -> str:
    """``path=PATH`` of a unix socket chardev, or ``fd=N`` for an inherited socket."""
    return f"path={escape(path)}" if fd is None else f"fd={fd}"


def bus_of(machine: MachineType) -> Bus:
    """The virtio transport of ``machine``: ``mmio`` for microvm, ``pci`` otherwise."""
    return "mmio" if machine == "microvm" else "pci"


def virtio_device(kind: str, bus: Bus) -> str:
    """QEMU device name for virtio ``kind`` on ``bus`` (``virtio-blk`` -> ``virtio-blk-pci``)."""
    return f"{kind}-pci" if bus == "pci" else f"{kind}-device"


class QemuOption(Protocol):
    """Anything that renders a part of the QEMU command line."""

    def argv(self) -> list[str]: ...


# -- global behaviour ----------------------------------------------------------------------


@dataclass(frozen=True)
class Name:
    """``-name``: shows in QMP ``query-name`` and in error messages."""

    name: str

    def argv(self) -> list[str]:
        return ["-name", escape(self.name)]


@dataclass(frozen=True)
class NoDefaults:
    """``-nodefaults``: no default NIC, VGA, serial, parallel, floppy or CD-ROM."""

    def argv(self) -> list[str]:
        return ["-nodefaults"]


@dataclass(frozen=True)
class NoUserConfig:
    """``-no-user-config``: ignore host-wide QEMU configuration files."""

    def argv(self) -> list[str]:
        return ["-no-user-config"]


@dataclass(frozen=True)
class DisplayNone:
    """``-display none``: no graphical window, no VNC."""

    def argv(self) -> list[str]:
        return ["-display", "none"]


@dataclass(frozen=True)
class NoReboot:
    """``-no-reboot``: a guest reboot (or ``panic=-1``) makes QEMU exit instead."""

    def argv(self) -> list[str]:
        return ["-no-reboot"]


@dataclass(frozen=True)
class Paused:
    """``-S``: create the VM in the ``prelaunch`` state; QMP ``cont`` runs it."""

    def argv(self) -> list[str]:
        return ["-S"]


@dataclass(frozen=True)
class Sandbox:
    """``-sandbox``: QEMU's seccomp filter (:data:`SANDBOX_POLICY`)."""

    policy: str = SANDBOX_POLICY

    def argv(self) -> list[str]:
        return ["-sandbox", self.policy]


@dataclass(frozen=True)
class Incoming:
    """``-incoming fd:N``: load a saved VM state from inherited fd ``N`` instead of booting."""

    fd: int

    def argv(self) -> list[str]:
        return ["-incoming", f"fd:{self.fd}"]


@dataclass(frozen=True)
class PidFile:
    """``-pidfile``: QEMU writes (and locks) its pid there."""

    path: Path

    def argv(self) -> list[str]:
        return ["-pidfile", str(self.path)]


@dataclass(frozen=True)
class GlobalProperty:
    """``-global driver.property=value``."""

    driver: str
    prop: str
    value: str

    def argv(self) -> list[str]:
        return ["-global", f"{self.driver}.{self.prop}={escape(self.value)}"]


# -- machine, CPU, memory ------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """``-machine TYPE[,memory-backend=ID]``."""

    type: MachineType = "pc"
    memory_backend: str | None = None

    def argv(self) -> list[str]:
        value: str = self.type
        if self.memory_backend is not None:
            value += f",memory-backend={self.memory_backend}"
        return ["-machine", value]


@dataclass(frozen=True)
class Accel:
    """``-accel``: ``tcg,thread=multi`` (one host thread per vCPU) or ``kvm``.

    ``tb_size_mib`` caps TCG's translation buffer (``tb-size``, MiB; QEMU 7.2's default is
    1 GiB of address space, filled as code is translated). Ignored under KVM.
    """

    kind: Accelerator
    tb_size_mib: int | None = None

    def argv(self) -> list[str]:
        if self.kind == "kvm":
            return ["-accel", "kvm"]
        value = "tcg,thread=multi"
        if self.tb_size_mib is not None:
            value += f",tb-size={self.tb_size_mib}"
        return ["-accel", value]


@dataclass(frozen=True)
class Cpu:
    """``-cpu MODEL``; :meth:`for_accel` gives ``max`` under TCG, ``host`` under KVM."""

    model: str

    @classmethod
    def for_accel(cls, accel: Accelerator) -> Cpu:
        return cls("host" if accel == "kvm" else "max")

    def argv(self) -> list[str]:
        return ["-cpu", self.model]


@dataclass(frozen=True)
class Smp:
    """``-smp N``."""

    cpus: int

    def argv(self) -> list[str]:
        return ["-smp", str(self.cpus)]


@dataclass(frozen=True)
class Memory:
    """``-m SIZE[,slots=N,maxmem=MAX]``, plus a shared memfd backend when ``shared``
    (required by vhost-user).

    With ``shared`` the :class:`Machine` must name :data:`MEMORY_BACKEND_ID` as its
    ``memory-backend``; :func:`vm_options` does that. ``slots`` memory-device slots with
    ``maxmem_mib`` (MiB, at least ``size_mib``) make room for memory devices (a virtio-pmem
    root: its region lies above the guest's RAM, not in it; the guest's RAM stays
    ``size_mib``).
    """

    size_mib: int
    shared: bool = False
    slots: int = 0
    maxmem_mib: int | None = None

    def __post_init__(self) -> None:
        if (self.slots > 0) != (self.maxmem_mib is not None):
            raise ValueError("memory slots and maxmem_mib go together")
        if self.maxmem_mib is not None and self.maxmem_mib < self.size_mib:
            raise ValueError(f"maxmem_mib {self.maxmem_mib} is below size_mib {self.size_mib}")

    def argv(self) -> list[str]:
        value = f"{self.size_mib}M"
        if self.slots:
            value += f",slots={self.slots},maxmem={self.maxmem_mib}M"
        args = ["-m", value]
        if self.shared:
            args += [
                "-object",
                f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={self.size_mib}M,share=on",
            ]
        return args


# -- boot ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """``-kernel``: a bzImage, or an ELF vmlinux with a PVH note (faster under TCG)."""

    path: Path

    def argv(self) -> list[str]:
        return ["-kernel", str(self.path)]


@dataclass(frozen=True)
class Initrd:
    """``-initrd``."""

    path: Path

    def argv(self) -> list[str]:
        return ["-initrd", str(self.path)]


@dataclass(frozen=True)
class Append:
    """``-append``: the kernel command line, passed as one argument."""

    cmdline: str

    def argv(self) -> list[str]:
        return ["-append", self.cmdline]


# -- devices -------------------------------------------------------------------------------


def pmem_device(bus: Bus) -> str:
    """QEMU's virtio-pmem device on ``bus`` (on virtio-mmio it is plain ``virtio-pmem``)."""
    return "virtio-pmem-pci" if bus == "pci" else "virtio-pmem"


@dataclass(frozen=True)
class RootPmem:
    """The read-only root image as a virtio-pmem device (the guest's ``/dev/pmem0``).

    QEMU maps the file through a ``memory-backend-file`` with ``readonly=on`` (opened
    ``O_RDONLY``, mapped ``PROT_READ``: no guest can change it) and ``share=on`` (the pages
    are the host's page cache, shared by every VM on the image). ``size`` is the file's size
    in bytes, a multiple of :data:`PMEM_ALIGN`; the machine needs a memory-device slot for it
    (:func:`root_memory`). QEMU 7.2 leaves a read-only file backend out of a saved VM state,
    so templates do not copy the image. ValueError for a size that is not positive and aligned.
    """

    path: Path
    size: int
    bus: Bus = "pci"
    id: str = "root"

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PMEM_ALIGN:
            raise ValueError(
                f"root image {self.path}: size {self.size} is not a positive multiple of "
                f"{PMEM_ALIGN} bytes (virtio-pmem)"
            )

    @property
    def memdev(self) -> str:
        return f"{self.id}-mem"

    def argv(self) -> list[str]:
        return [
            "-object",
            f"memory-backend-file,id={self.memdev},mem-path={escape(self.path)},"
            f"size={self.size},share=on,readonly=on",
            "-device",
            f"{pmem_device(self.bus)},memdev={self.memdev},id={self.id}",
        ]


def root_memory(memory_mib: int, shared: bool, root_size: int | None) -> Memory:
    """The ``-m`` of a VM with ``memory_mib`` of RAM and, if ``root_size`` (bytes) is given,
    one memory-device slot large enough for a virtio-pmem root of that size."""
    if root_size is None:
        return Memory(memory_mib, shared=shared)
    return Memory(memory_mib, shared=shared, slots=1, maxmem_mib=memory_mib + -(-root_size >> 20))


#: ``-add-fd`` set number of the console log of a jailed QEMU (``/dev/fdset/N``).
CONSOLE_FDSET = 1


@dataclass(frozen=True)
class ConsoleLog:
    """The first serial port appended to a file (the caller starts it empty; appending lets
    a reader cut the file while QEMU writes: sandbox/pod/console_bound.py).

    With ``fd`` (a jailed QEMU, which cannot open the path) QEMU writes to that inherited fd
    instead, through fd set :data:`CONSOLE_FDSET` (``-add-fd``; ``/dev/fdset/N`` is how QEMU
    names an fd wherever it takes a file name). The fd's ``opaque`` label names ``path``, so
    that QEMU's command line still names its VM's directory (who started it, for people and
    for re-attaching; :meth:`hypervisor.qemu.QemuVM.attach`).
    """

    path: Path
    id: str = "console"
    fd: int | None = None

    def argv(self) -> list[str]:
        if self.fd is not None:
            return [
                "-add-fd",
                f"fd={self.fd},set={CONSOLE_FDSET},opaque={escape(self.path)}",
                "-chardev",
                f"file,id={self.id},path=/dev/fdset/{CONSOLE_FDSET}",
                "-serial",
                f"chardev:{self.id}",
            ]
        return [
            "-chardev",
            f"file,id={self.id},path={escape(self.path)},append=on",
            "-serial",
            f"chardev:{self.id}",
        ]


@dataclass(frozen=True)
class QMPSocket:
    """QMP on a unix socket QEMU listens on (``server=on,wait=off``); with ``fd``, on that
    inherited listening socket (bound to ``path`` by the caller) instead."""

    path: Path
    id: str = "qmp"
    fd: int | None = None

    def argv(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id={self.id},{_socket_address(self.path, self.fd)},server=on,wait=off",
            "-mon",
            f"chardev={self.id},mode=control",
        ]


@dataclass(frozen=True)
class AgentSerialPort:
    """The agent channel over virtio-serial: QEMU listens on ``path``.

    The guest sees a port named ``name`` (``/dev/vport0p1``, name in
    ``/sys/class/virtio-ports/vport0p1/name``). With ``fd`` QEMU listens on that inherited
    socket (bound to ``path`` by the caller).
    """

    path: Path
    bus: Bus = "pci"
    name: str = "agent.0"
    id: str = "agent"
    fd: int | None = None

    def argv(self) -> list[str]:
        return [
            "-device",
            f"{virtio_device('virtio-serial', self.bus)},id=vser0",
            "-chardev",
            f"socket,id={self.id},{_socket_address(self.path, self.fd)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={self.id},name={escape(self.name)}",
        ]


@dataclass(frozen=True)
class OutputPort:
    """One more port on the agent's virtio-serial bus: a process's output stream to the host
    (:mod:`agentapi.stream_wire`). QEMU listens on ``path`` (or the inherited socket ``fd``);
    the guest sees a port called ``name``. Needs :class:`AgentSerialPort` (its bus).
    """

    path: Path
    name: str
    id: str
    fd: int | None = None

    def argv(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id={self.id},{_socket_address(self.path, self.fd)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={self.id},name={escape(self.name)}",
        ]


@dataclass(frozen=True)
class VsockDevice:
    """``vhost-vsock`` with guest context id ``cid`` (needs ``/dev/vhost-vsock`` on the host)."""

    cid: int
    bus: Bus = "pci"

    def argv(self) -> list[str]:
        return ["-device", f"{virtio_device('vhost-vsock', self.bus)},guest-cid={self.cid}"]


@dataclass(frozen=True)
class VirtioFsShare:
    """A virtio-fs share served by virtiofsd on ``socket``; the guest mounts ``tag``.

    With ``fd`` QEMU uses that inherited socket, already connected to ``socket`` by the
    caller, instead of connecting itself.
    """

    tag: str
    socket: Path
    index: int = 0
    bus: Bus = "pci"
    queue_size: int = 1024
    fd: int | None = None

    def argv(self) -> list[str]:
        chardev = f"fs{self.index}"
        return [
            "-chardev",
            f"socket,id={chardev},{_socket_address(self.socket, self.fd)}",
            "-device",
            f"{virtio_device('vhost-user-fs', self.bus)},chardev={chardev},"
            f"tag={escape(self.tag)},queue-size={self.queue_size}",
        ]

    def hotplug(self, fdname: str | None = None) -> list[tuple[str, dict[str, object]]]:
        """The QMP commands that add this share to a running VM (same devices as argv).

        With ``fdname`` the chardev uses the connected socket passed to QEMU under that name
        (QMP ``getfd``, done by the caller first) instead of connecting to :attr:`socket`.
        """
        chardev = f"fs{self.index}"
        address: dict[str, object] = (
            {"type": "unix", "data": {"path": str(self.socket)}}
            if fdname is None
            else {"type": "fd", "data": {"str": fdname}}
        )
        return [
            (
                "chardev-add",
                {
                    "id": chardev,
                    "backend": {
                        "type": "socket",
                        "data": {
                            "addr": address,
                            "server": False,
                        },
                    },
                },
            ),
            (
                "device_add",
                {
                    "driver": virtio_device("vhost-user-fs", self.bus),
                    "id": f"{chardev}dev",
                    "chardev": chardev,
                    "tag": self.tag,
                    "queue-size": self.queue_size,
                },
            ),
        ]


# -- network -------------------------------------------------------------------------------

#: Guest-visible addresses of QEMU user networking (slirp), pinned on the command line so the
#: agent can configure the guest statically (no DHCP in the guest).
USER_NET_CIDR = "10.0.2.0/24"
USER_NET_HOST = "10.0.2.2"
USER_NET_DNS = "10.0.2.3"

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class TapNetdev:
    """``-netdev tap,id=ID,fd=FD``: a tap device the caller opened and QEMU inherits.

    No helper script, no ``vhost`` (the hosts lack ``/dev/vhost-net``); QEMU probes the fd
    for ``IFF_VNET_HDR`` itself and uses offloads when it is set.
    """

    id: str
    fd: int

    def argv(self) -> list[str]:
        return ["-netdev", f"tap,id={self.id},fd={self.fd}"]


@dataclass(frozen=True)
class UserNetdev:
    """``-netdev user``: QEMU's user-mode (slirp) stack, outbound NAT from the guest.

    The gateway (``host``) also reaches the host's loopback; see docs/networking.md.
    IPv6 is off: the agent configures IPv4 only.
    """

    id: str
    net: str = USER_NET_CIDR
    host: str = USER_NET_HOST
    dns: str = USER_NET_DNS

    def argv(self) -> list[str]:
        return [
            "-netdev",
            f"user,id={self.id},net={self.net},host={self.host},dns={self.dns},ipv6=off",
        ]


@dataclass(frozen=True)
class VirtioNet:
    """A virtio-net NIC on netdev ``netdev`` with MAC ``mac`` (no PXE option ROM on PCI).

    ``mtu`` sets ``host_mtu``: the device advertises it (VIRTIO_NET_F_MTU) to the guest.
    """

    netdev: str
    mac: str
    bus: Bus = "pci"
    mtu: int | None = None

    def argv(self) -> list[str]:
        value = f"{virtio_device('virtio-net', self.bus)},netdev={self.netdev},mac={self.mac}"
        if self.mtu is not None:
            value += f",host_mtu={self.mtu}"
        if self.bus == "pci":
            value += ",romfile="
        return ["-device", value]


@dataclass(frozen=True)
class NicConfig:
    """One guest NIC: ``backend`` ``tap`` (``fd`` of an open tap) or ``user`` (slirp)."""

    mac: str
    backend: Literal["tap", "user"] = "tap"
    fd: int | None = None
    mtu: int | None = None

    def __post_init__(self) -> None:
        if not _MAC_RE.match(self.mac):
            raise ValueError(f"nic mac {self.mac!r} must be six lowercase hex pairs")
        if self.backend == "tap" and (self.fd is None or self.fd < 0):
            raise ValueError("a tap nic needs the fd of an open tap device")
        if self.backend == "user" and self.fd is not None:
            raise ValueError("a user-mode nic takes no fd")
        if self.backend not in ("tap", "user"):
            raise ValueError(f"nic backend must be tap or user, not {self.backend!r}")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"nic mtu {self.mtu} is outside 68..65535")

    def options(self, index: int, bus: Bus) -> list[QemuOption]:
        netdev = f"net{index}"
        backend: QemuOption
        if self.backend == "tap":
            assert self.fd is not None
            backend = TapNetdev(netdev, self.fd)
        else:
            backend = UserNetdev(netdev)
        return [backend, VirtioNet(netdev, self.mac, bus, self.mtu)]

    def hotplug(self, index: int, bus: Bus) -> list[tuple[str, dict[str, object], int | None]]:
        """The QMP commands that add this NIC to a running VM, as (command, arguments, fd to
        pass with it); the same netdev and device :meth:`options` puts on a command line."""
        netdev = f"net{index}"
        commands: list[tuple[str, dict[str, object], int | None]] = []
        if self.backend == "tap":
            fdname = f"tap{index}"
            commands.append(("getfd", {"fdname": fdname}, self.fd))
            commands.append(("netdev_add", {"type": "tap", "id": netdev, "fd": fdname}, None))
        else:
            user = UserNetdev(netdev)
            arguments: dict[str, object] = {
                "type": "user",
                "id": netdev,
                "net": user.net,
                "host": user.host,
                "dns": user.dns,
                "ipv6": False,
            }
            commands.append(("netdev_add", arguments, None))
        device: dict[str, object] = {
            "driver": virtio_device("virtio-net", bus),
            "id": f"{netdev}dev",
            "netdev": netdev,
            "mac": self.mac,
        }
        if self.mtu is not None:
            device["host_mtu"] = self.mtu
        if bus == "pci":
            device["romfile"] = ""
        commands.append(("device_add", device, None))
        return commands


# -- the VM --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelFds:
    """Fds standing for the paths of a :class:`VMConfig` (for a QEMU that cannot open them):
    listening sockets bound to ``qmp_socket`` and ``agent_socket``, the console log open for
    writing, and one socket connected to each share's virtiofsd, in ``shares`` order."""

    qmp: int
    console: int
    agent: int | None = None
    shares: tuple[int, ...] = ()
    #: Listening sockets bound to ``output_ports``, in that order.
    outputs: tuple[int, ...] = ()

    def all(self) -> tuple[int, ...]:
        """Every fd, each once."""
        agent = () if self.agent is None else (self.agent,)
        return (self.qmp, self.console, *agent, *self.shares, *self.outputs)


@dataclass(frozen=True)
class VMConfig:
    """Everything needed to build one VM's command line.

    ``agent_socket`` selects the virtio-serial agent transport (QEMU listens on that unix
    socket), ``vsock_cid`` the vhost-vsock one; at most one may be set. ``shares`` are
    ``(tag, virtiofsd socket)`` pairs; any share switches guest RAM to a shared memfd.
    ``qemu_log`` receives QEMU's stdout/stderr (default: next to ``console_log``).
    ``nics`` are the guest's network cards, in PCI order; tap fds are passed to QEMU
    (:meth:`pass_fds`). ``shared_memory`` puts guest RAM in a shared memfd even without
    shares (a VM that gets virtio-fs hot-plugged later, e.g. one restored from a template).
    ``incoming_fd`` makes QEMU load a saved VM state from that (inherited) fd instead of
    booting (``-incoming fd:N``); the command line must then be the saved VM's.
    ``tb_size_mib`` caps TCG's translation buffer (None: QEMU's default, 1 GiB).
    ``rootfs`` is the read-only root image, attached as virtio-pmem (:class:`RootPmem`);
    ``rootfs_size`` is its size in bytes (required with it, a multiple of :data:`PMEM_ALIGN`).
    ``channel_fds`` replaces the paths QEMU would open itself (QMP and agent sockets, console
    log, virtio-fs sockets) by fds the caller opened (a jailed QEMU: hypervisor/qemu_jail.py);
    they are inherited (:meth:`pass_fds`). ``host_network``: QEMU needs the host's network
    (a user-mode NIC, now or hot-plugged later); a jailed QEMU otherwise gets none.
    Invalid values raise ``ValueError`` (a caller bug, not a runtime condition).
    """

    name: str
    kernel: Path
    cmdline: str
    qmp_socket: Path
    console_log: Path
    initrd: Path | None = None
    rootfs: Path | None = None
    rootfs_size: int | None = None
    memory_mib: int = 512
    cpus: int = DEFAULT_CPUS
    accel: Accelerator = "tcg"
    cpu: str | None = None
    machine: MachineType = "pc"
    agent_socket: Path | None = None
    vsock_cid: int | None = None
    #: ``(name, socket)`` of each output port (:class:`OutputPort`), in port order; only
    #: with ``agent_socket``.
    output_ports: tuple[tuple[str, Path], ...] = ()
    shares: tuple[tuple[str, Path], ...] = ()
    pidfile: Path | None = None
    qemu_log: Path | None = None
    sandbox: bool = True
    nics: tuple[NicConfig, ...] = ()
    shared_memory: bool = False
    incoming_fd: int | None = None
    tb_size_mib: int | None = TCG_TB_SIZE_MIB
    channel_fds: ChannelFds | None = None
    host_network: bool = False
    extra: tuple[QemuOption, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise ValueError(f"accel must be one of {ACCELERATORS}, not {self.accel!r}")
        if self.machine not in MACHINES:
            raise ValueError(f"machine must be one of {MACHINES}, not {self.machine!r}")
        if self.memory_mib < 64:
            raise ValueError(f"memory_mib {self.memory_mib} is below 64")
        if self.cpus < 1:
            raise ValueError(f"cpus {self.cpus} is below 1")
        if (self.rootfs is None) != (self.rootfs_size is None):
            raise ValueError("rootfs and rootfs_size go together")
        if self.rootfs is not None and self.rootfs_size is not None:
            RootPmem(self.rootfs, self.rootfs_size)  # its size checks
        if self.tb_size_mib is not None and self.tb_size_mib < 1:
            raise ValueError(f"tb_size_mib {self.tb_size_mib} is below 1")
        if self.agent_socket is not None and self.vsock_cid is not None:
            raise ValueError("set agent_socket (virtio-serial) or vsock_cid, not both")
        if self.vsock_cid is not None and self.vsock_cid < 3:
            raise ValueError(f"vsock cid {self.vsock_cid} is reserved (use 3 or more)")
        tags = [tag for tag, _ in self.shares]
        if len(set(tags)) != len(tags):
            raise ValueError(f"duplicate virtio-fs tags in {tags}")
        for tag in tags:
            if not tag or len(tag.encode()) > MAX_FS_TAG:
                raise ValueError(f"virtio-fs tag {tag!r} must be 1..{MAX_FS_TAG} bytes")
        macs = [nic.mac for nic in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError(f"duplicate nic macs in {macs}")
        fds = self.channel_fds
        if fds is not None:
            if len(fds.shares) != len(self.shares):
                raise ValueError("channel_fds needs one fd per virtio-fs share")
            if (fds.agent is None) != (self.agent_socket is None):
                raise ValueError("channel_fds.agent must be set exactly with agent_socket")
            if len(fds.outputs) != len(self.output_ports):
                raise ValueError("channel_fds needs one fd per output port")
        if self.output_ports and self.agent_socket is None:
            raise ValueError("output_ports need agent_socket (the virtio-serial bus)")

    @property
    def agent_transport(self) -> Literal["serial", "vsock"] | None:
        """``serial``, ``vsock`` or None (no agent channel)."""
        if self.agent_socket is not None:
            return "serial"
        if self.vsock_cid is not None:
            return "vsock"
        return None

    @property
    def stderr_log(self) -> Path:
        """Where QEMU's stdout and stderr go."""
        if self.qemu_log is not None:
            return self.qemu_log
        return self.console_log.with_name(f"{self.console_log.stem}-qemu.log")

    def pass_fds(self) -> tuple[int, ...]:
        """The fds QEMU must inherit (tap devices named by ``fd=`` options, incoming state,
        :attr:`channel_fds`)."""
        fds = tuple(nic.fd for nic in self.nics if nic.fd is not None)
        fds += (self.incoming_fd,) if self.incoming_fd is not None else ()
        return fds + (self.channel_fds.all() if self.channel_fds is not None else ())

    def sockets(self) -> tuple[Path, ...]:
        """The unix sockets QEMU creates (and that are removed after it exits)."""
        named = (self.qmp_socket, self.agent_socket)
        return tuple(p for p in named if p is not None) + tuple(p for _, p in self.output_ports)


def vm_options(config: VMConfig, *, paused: bool = True) -> list[QemuOption]:
    """The typed options for ``config``, in command-line order."""
    bus = bus_of(config.machine)
    shared_memory = bool(config.shares) or config.shared_memory
    options: list[QemuOption] = [
        Name(config.name),
        Machine(config.machine, MEMORY_BACKEND_ID if shared_memory else None),
        Accel(config.accel, config.tb_size_mib),
        Cpu(config.cpu) if config.cpu else Cpu.for_accel(config.accel),
        Smp(config.cpus),
        root_memory(config.memory_mib, shared_memory, config.rootfs_size),
        NoDefaults(),
        NoUserConfig(),
        DisplayNone(),
        NoReboot(),
    ]
    if config.sandbox:
        options.append(Sandbox())
    if config.machine == "microvm":
        options.append(GlobalProperty("virtio-mmio", "force-legacy", "false"))
    options.append(Kernel(config.kernel))
    if config.initrd is not None:
        options.append(Initrd(config.initrd))
    options.append(Append(config.cmdline))
    fds = config.channel_fds
    options.append(ConsoleLog(config.console_log, fd=fds.console if fds else None))
    options.append(QMPSocket(config.qmp_socket, fd=fds.qmp if fds else None))
    if config.rootfs is not None and config.rootfs_size is not None:
        options.append(RootPmem(config.rootfs, config.rootfs_size, bus))
    if config.agent_socket is not None:
        options.append(AgentSerialPort(config.agent_socket, bus, fd=fds.agent if fds else None))
        for index, (name, path) in enumerate(config.output_ports):
            fd = fds.outputs[index] if fds else None
            options.append(OutputPort(path, name, f"out{index}", fd=fd))
    if config.vsock_cid is not None:
        options.append(VsockDevice(config.vsock_cid, bus))
    for index, (tag, socket) in enumerate(config.shares):
        share_fd = fds.shares[index] if fds else None
        options.append(VirtioFsShare(tag, socket, index, bus, fd=share_fd))
    for index, nic in enumerate(config.nics):
        options.extend(nic.options(index, bus))
    if config.pidfile is not None:
        options.append(PidFile(config.pidfile))
    options.extend(config.extra)
    if config.incoming_fd is not None:
        options.append(Incoming(config.incoming_fd))
    if paused:
        options.append(Paused())
    return options


def build_argv(
    config: VMConfig, qemu_binary: str | Path = "qemu-system-x86_64", *, paused: bool = True
) -> list[str]:
    """The full QEMU command line for ``config`` (``paused``: start in ``prelaunch``)."""
    argv = [str(qemu_binary)]
    for option in vm_options(config, paused=paused):
        argv += option.argv()
    return argv
