"""Pod networking in the guest: NICs found by MAC, addresses, routes, DNS files.

The host hands the guest one virtio-net NIC per interface of the pod's network namespace,
with the same MAC (see sandbox/pod/network.py); :meth:`NetworkManager.configure` gives each NIC
the name, MTU and addresses the interface had on the host, adds the routes, and writes
resolv.conf/hosts below :data:`NETWORK_DIR` for containers to bind-mount. Everything happens
in the guest's root network namespace, which containers that share the pod network run in,
unless the host names a container's network namespace (``netns``: a pod network set up after
the container was created, whose namespace belongs to the container's user namespace as under
runc): each NIC is then brought up in the root namespace (until it is operational), moved into
that namespace, and configured there by commands spawned from a thread that joined it.

Settings are applied with ``busybox ip`` (the image has no iproute2). The agent is PID 1 and
reaps every child itself, so commands are spawned here and their exit status is collected
through the :class:`agent.pid1.Reaper` (``subprocess`` would race with it for the status).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent import pid1

BUSYBOX = "/usr/lib/pysandbox/bin/busybox"
#: Guest directory (on the /run tmpfs) holding resolv.conf and hosts for containers.
NETWORK_DIR = "/run/pysandbox-network"
SYS_CLASS_NET = "/sys/class/net"
MAX_INTERFACES = 16
MAX_ROUTES = 256
MAX_ADDRESSES = 64
MAX_DNS_SERVERS = 8
MAX_DNS_ITEMS = 32
MAX_HOSTS = 256
NIC_WAIT_SECONDS = 10.0
COMMAND_TIMEOUT = 30.0

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# A DNS name or search domain, a resolv.conf option, a hostname: no spaces, no control chars.
_WORD_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,253}$")

#: Runs one command; returns (exit status, combined output).
Runner = Callable[[Sequence[str]], tuple[int, str]]
#: Runs a function in a thread that joined the network namespace at the path.
NetnsRunner = Callable[[str, Callable[[], None]], None]
CLONE_NEWNET = 0x40000000


def in_netns(path: str, work: Callable[[], None]) -> None:
    """Run ``work()`` in a helper thread that joined network namespace ``path`` (setns(2)
    of a network namespace applies to the calling thread, and the processes it spawns)."""
    import ctypes

    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetworkError(
                        "INTERNAL", f"entering the container's network: {os.strerror(err)}"
                    )
            finally:
                os.close(fd)
            work()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


class NetworkError(Exception):
    """A request the agent refuses; ``code`` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    mtu: int = 0
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    destination: str
    gateway: str = ""
    device: str = ""
    metric: int = 0


@dataclass(frozen=True)
class Settings:
    """What ConfigureNetwork asks for (see agent.proto)."""

    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hostname: str = ""


@dataclass
class Outcome:
    resolv_conf: str = ""
    hosts: str = ""
    interfaces: list[str] = field(default_factory=list)


def _invalid(message: str) -> NetworkError:
    return NetworkError("INVALID_ARGUMENT", message)


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _invalid(f"{what} {text[:64]!r} is not an IP address") from None


def _network(text: str, what: str, strict: bool) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if "/" not in text:
        raise _invalid(f"{what} {text[:64]!r} needs a prefix length (CIDR)")
    try:
        return ipaddress.ip_network(text, strict=strict)
    except ValueError:
        raise _invalid(f"{what} {text[:64]!r} is not in CIDR notation") from None


def validate(settings: Settings) -> None:
    """Raise NetworkError(INVALID_ARGUMENT) for anything malformed or over the limits."""
    if len(settings.interfaces) > MAX_INTERFACES:
        raise _invalid(f"more than {MAX_INTERFACES} interfaces")
    if len(settings.routes) > MAX_ROUTES:
        raise _invalid(f"more than {MAX_ROUTES} routes")
    names: set[str] = set()
    macs: set[str] = set()
    for nic in settings.interfaces:
        if not _IFNAME_RE.match(nic.name) or nic.name in (".", "..", "lo"):
            raise _invalid(f"invalid interface name {nic.name[:32]!r}")
        if not _MAC_RE.match(nic.mac):
            raise _invalid(f"invalid mac {nic.mac[:32]!r} for interface {nic.name}")
        if nic.name in names or nic.mac in macs:
            raise _invalid(f"interface {nic.name} ({nic.mac}) is given twice")
        names.add(nic.name)
        macs.add(nic.mac)
        if nic.mtu and not 68 <= nic.mtu <= 65535:
            raise _invalid(f"mtu {nic.mtu} of {nic.name} is outside 68..65535")
        if len(nic.addresses) > MAX_ADDRESSES:
            raise _invalid(f"more than {MAX_ADDRESSES} addresses on {nic.name}")
        for cidr in nic.addresses:
            _network(cidr, f"address of {nic.name}", strict=False)
    for route in settings.routes:
        dest = _network(route.destination, "route destination", strict=True)
        if route.gateway:
            gateway = _address(route.gateway, "route gateway")
            if gateway.version != dest.version:
                raise _invalid(f"route {route.destination} via {route.gateway} mixes families")
        if route.device and route.device not in names:
            raise _invalid(f"route {route.destination} names unknown device {route.device!r}")
        if not route.gateway and not route.device:
            raise _invalid(f"route {route.destination} needs a gateway or a device")
        if not 0 <= route.metric <= 0xFFFFFFFF:
            raise _invalid(f"route metric {route.metric} out of range")
    if len(settings.dns_servers) > MAX_DNS_SERVERS:
        raise _invalid(f"more than {MAX_DNS_SERVERS} dns servers")
    for server in settings.dns_servers:
        _address(server, "dns server")
    for item in (*settings.dns_search, *settings.dns_options):
        if not _WORD_RE.match(item):
            raise _invalid(f"invalid dns search domain or option {item[:64]!r}")
    if len(settings.dns_search) + len(settings.dns_options) > MAX_DNS_ITEMS:
        raise _invalid(f"more than {MAX_DNS_ITEMS} dns search domains and options")
    if len(settings.hosts) > MAX_HOSTS:
        raise _invalid(f"more than {MAX_HOSTS} host entries")
    for address, host_names in settings.hosts:
        _address(address, "hosts address")
        if not host_names or len(host_names) > 16:
            raise _invalid(f"hosts entry {address} needs 1..16 names")
        for name in host_names:
            if not _WORD_RE.match(name):
                raise _invalid(f"invalid host name {name[:64]!r}")
    if settings.hostname and not _WORD_RE.match(settings.hostname):
        raise _invalid(f"invalid hostname {settings.hostname[:64]!r}")


def nic_by_mac(sys_class_net: str = SYS_CLASS_NET) -> dict[str, str]:
    """Current interface name of every guest NIC, keyed by lowercase MAC."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(sys_class_net)):
        with contextlib.suppress(OSError):
            with open(f"{sys_class_net}/{name}/address", encoding="ascii") as handle:
                mac = handle.read().strip().lower()
            if _MAC_RE.match(mac) and mac != "00:00:00:00:00:00":
                found.setdefault(mac, name)
    return found


class NetworkManager:
    """Applies :class:`Settings` to the guest. Thread-safe (one configuration at a time)."""

    def __init__(
        self,
        reaper: pid1.Reaper | None = None,
        *,
        runner: Runner | None = None,
        sys_class_net: str = SYS_CLASS_NET,
        network_dir: str = NETWORK_DIR,
        nic_wait: float = NIC_WAIT_SECONDS,
        sethostname: Callable[[str], None] = socket.sethostname,
        load_nic_driver: Callable[[], None] | None = None,
        enter_netns: NetnsRunner = in_netns,
    ) -> None:
        """``load_nic_driver`` is called before NICs are looked for: a VM restored from a
        template gets its NICs hot-plugged after /init ran, so nothing loaded virtio_net."""
        if runner is None:
            if reaper is None:
                raise ValueError("a reaper or a runner is required")
            runner = _ReapedRunner(reaper)
        self._run = runner
        self._sys_class_net = sys_class_net
        self._dir = network_dir
        self._nic_wait = nic_wait
        self._sethostname = sethostname
        self._load_nic_driver = load_nic_driver
        self._enter_netns = enter_netns
        self._lock = threading.Lock()

    def _ip(self, *args: str, tolerate_exists: bool = False) -> None:
        argv = [BUSYBOX, "ip", *args]
        status, output = self._run(argv)
        if status != 0 and not (tolerate_exists and "File exists" in output):
            detail = output.strip().splitlines()[-1] if output.strip() else f"exit {status}"
            raise NetworkError("INTERNAL", f"ip {' '.join(args)}: {detail[:300]}")

    def configure(self, settings: Settings, netns_pid: int | None = None) -> Outcome:
        """Apply ``settings``: in the guest's root network namespace, or with ``netns_pid``
        in that process's (a container's init), the NICs moved there first."""
        validate(settings)
        with self._lock:
            outcome = Outcome()
            self._ip("link", "set", "dev", "lo", "up")
            if settings.interfaces and self._load_nic_driver is not None:
                try:
                    self._load_nic_driver()
                except OSError as exc:
                    raise NetworkError("INTERNAL", f"loading the NIC driver: {exc}") from exc
            current = self._find_nics(settings.interfaces)
            if netns_pid is None:
                self._configure_links(settings, current, wait=True)
            else:
                # Operational in the root namespace first (hot-plugged: carrier comes with
                # the link watcher), where sysfs shows it; the move keeps the carrier.
                names = [current[nic.mac] for nic in settings.interfaces]
                for name in names:
                    self._ip("link", "set", "dev", name, "up")
                self._wait_carrier(names)
                for name in names:
                    self._ip("link", "set", "dev", name, "netns", str(netns_pid))
                self._enter_netns(
                    f"/proc/{netns_pid}/ns/net",
                    lambda: self._configure_links(settings, current, wait=False),
                )
            outcome.interfaces.extend(nic.name for nic in settings.interfaces)
            if settings.dns_servers or settings.dns_search or settings.dns_options:
                outcome.resolv_conf = self._write("resolv.conf", _resolv_conf(settings))
            if settings.hosts or settings.hostname:
                outcome.hosts = self._write("hosts", _hosts(settings))
            if settings.hostname:
                try:
                    self._sethostname(settings.hostname)
                except OSError as exc:
                    raise NetworkError("INTERNAL", f"sethostname: {exc.strerror}") from exc
            return outcome

    def _configure_links(self, settings: Settings, current: dict[str, str], wait: bool) -> None:
        """Names, MTUs, addresses and routes, in the namespace this thread is in."""
        self._rename(settings.interfaces, current)
        for nic in settings.interfaces:
            self._setup_nic(nic)
        if wait:
            self._wait_carrier([nic.name for nic in settings.interfaces])
        # Routes out of a device first: a gateway must be reachable when its route is added.
        for route in sorted(settings.routes, key=lambda r: bool(r.gateway)):
            self._add_route(route)

    def _find_nics(self, wanted: Sequence[Interface]) -> dict[str, str]:
        deadline = time.monotonic() + self._nic_wait
        while True:
            current = nic_by_mac(self._sys_class_net)
            missing = [nic.mac for nic in wanted if nic.mac not in current]
            if not missing:
                return current
            if time.monotonic() >= deadline:
                raise NetworkError(
                    "FAILED_PRECONDITION",
                    f"no guest NIC with mac {', '.join(missing)} "
                    f"(the VM has {', '.join(sorted(current)) or 'no NICs'})",
                )
            time.sleep(0.05)

    def _rename(self, wanted: Sequence[Interface], current: dict[str, str]) -> None:
        # Two passes through temporary names, so that swapping names (eth0 <-> eth1) works.
        moves = [(current[nic.mac], nic.name) for nic in wanted if current[nic.mac] != nic.name]
        for index, (old, _new) in enumerate(moves):
            self._ip("link", "set", "dev", old, "down")
            self._ip("link", "set", "dev", old, "name", f"psbtmp{index}")
        for index, (_old, new) in enumerate(moves):
            self._ip("link", "set", "dev", f"psbtmp{index}", "name", new)

    def _setup_nic(self, nic: Interface) -> None:
        if nic.mtu:
            self._ip("link", "set", "dev", nic.name, "mtu", str(nic.mtu))
        # The pod's addresses were checked for uniqueness on the host (CNI): skip IPv6 DAD,
        # which would leave them "tentative" (unusable) for a second or two.
        with (
            contextlib.suppress(OSError),
            open(f"/proc/sys/net/ipv6/conf/{nic.name}/accept_dad", "w", encoding="ascii") as dad,
        ):
            dad.write("0")
        for cidr in nic.addresses:
            self._ip("addr", "add", cidr, "dev", nic.name, tolerate_exists=True)
        self._ip("link", "set", "dev", nic.name, "up")

    def _wait_carrier(self, names: Sequence[str]) -> None:
        """Wait (bounded by the NIC wait) until each NIC's operational state is up.

        A NIC hot-plugged into a restored VM has carrier at once but becomes operational
        (``RUNNING``, its qdisc active) only when the kernel's link watcher runs, up to a
        second later; the pod's containers must not start before. A NIC without a readable
        ``operstate`` is not waited for.
        """
        deadline = time.monotonic() + self._nic_wait
        pending = list(names)
        while pending and time.monotonic() < deadline:
            still = []
            for name in pending:
                try:
                    with open(f"{self._sys_class_net}/{name}/operstate", encoding="ascii") as f:
                        if f.read().strip() not in ("up", "unknown"):
                            still.append(name)
                except OSError:
                    continue
            pending = still
            if pending:
                time.sleep(0.02)

    def _add_route(self, route: Route) -> None:
        dest = ipaddress.ip_network(route.destination)
        args = [f"-{dest.version}", "route", "replace", route.destination]
        if route.gateway:
            args += ["via", route.gateway]
        if route.device:
            args += ["dev", route.device]
        if route.metric:
            args += ["metric", str(route.metric)]
        self._ip(*args)

    def _write(self, name: str, content: str) -> str:
        os.makedirs(self._dir, mode=0o755, exist_ok=True)
        path = f"{self._dir}/{name}"
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.replace(tmp, path)
        return path


def _resolv_conf(settings: Settings) -> str:
    lines = [f"nameserver {server}" for server in settings.dns_servers]
    if settings.dns_search:
        lines.append(f"search {' '.join(settings.dns_search)}")
    if settings.dns_options:
        lines.append(f"options {' '.join(settings.dns_options)}")
    return "\n".join(lines) + "\n"


def _hosts(settings: Settings) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if settings.hostname:
        lines.append(f"127.0.1.1\t{settings.hostname}")
    lines += [f"{address}\t{' '.join(names)}" for address, names in settings.hosts]
    return "\n".join(lines) + "\n"


class _ReapedRunner:
    """Runs a command with posix_spawn; its status comes from the PID 1 reaper."""

    def __init__(self, reaper: pid1.Reaper, timeout: float = COMMAND_TIMEOUT) -> None:
        self._reaper = reaper
        self._timeout = timeout

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull, 0),
            (os.POSIX_SPAWN_DUP2, write_end, 1),
            (os.POSIX_SPAWN_DUP2, write_end, 2),
        ]
        try:
            pid = os.posix_spawn(
                argv[0], list(argv), {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, file_actions=actions
            )
        finally:
            os.close(write_end)
            os.close(devnull)
        done = threading.Event()
        statuses: list[int] = []

        def on_exit(raw: int) -> None:
            statuses.append(raw)
            done.set()

        self._reaper.watch(pid, on_exit)
        output = bytearray()
        deadline = time.monotonic() + self._timeout
        try:
            while len(output) < 65536:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                    break
                chunk = os.read(read_end, 4096)
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(read_end)
        # Reap now instead of waiting for the reaper thread: it wakes on SIGCHLD only when the
        # main thread (blocked in the serial relay) gets to run the signal handler, else once
        # a second -- which made every command take up to a second.
        while not done.is_set():
            self._reaper.reap_once()
            if done.wait(0.002):
                break
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                done.wait(5.0)
                return 124, f"{argv[1] if len(argv) > 1 else argv[0]} timed out"
        raw = statuses[0]
        status = os.WEXITSTATUS(raw) if os.WIFEXITED(raw) else 128 + os.WTERMSIG(raw)
        return status, output.decode(errors="replace")
