"""Pod networking on the host: the pod's network namespace reaches the VM.

A CNI plugin (or podman, or a test) prepares a network namespace for the pod: a veth (or
macvlan...) with the pod's MAC, addresses and routes. The VM cannot live in that namespace
as a kernel would, so its interfaces are carried into the guest, as Kata Containers does
with its "tcfilter" model::

    pod netns:   peer <-> eth0 --tc ingress: u32 match-all, mirred egress redirect--> tap0_psb
                          eth0 <--tc ingress: u32 match-all, mirred egress redirect-- tap0_psb
    QEMU:        -netdev tap,fd=N (tap0_psb, opened in the netns) + virtio-net, mac = eth0's
    guest:       eth0 (found by MAC, renamed), eth0's MTU, addresses and routes (agent)

Every frame arriving on ``eth0`` goes to the tap (QEMU reads it, the guest receives it);
every frame the guest sends leaves through ``eth0``. The namespace's own stack never sees
the traffic; the addresses stay on ``eth0`` so tools that read the netns still see them.

Namespaces are entered with setns(2) in a short-lived helper thread (setns of a network
namespace changes only the calling thread), so the rest of the process stays where it is.
The tap is opened there (a tap belongs to the netns of the thread that opens
``/dev/net/tun``), with IFF_VNET_HDR so QEMU can use checksum/segmentation offloads. It is
not persistent: it disappears when QEMU (the last holder of its fd) exits.

Crash safety: :func:`attach` records the namespace (path + inode identity) and every tap and
qdisc it is about to create in the pod record *before* creating them; :func:`detach` removes
them from that record alone, idempotently, and only while the path still names the same
namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypervisor import syscalls
from hypervisor.syscalls import CLONE_NEWNET
from sandbox.errors import ConfigError, NetworkError

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs fd is
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1
ETH_P_ALL = 0x0003
INGRESS_HANDLE = 0xFFFF0000
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
#: Interfaces carried into one VM at most (each is a PCI device).
MAX_INTERFACES = 8
TAP_SUFFIX = "_psb"

#: QEMU user networking (slirp): the guest's static configuration. QEMU's defaults, pinned
#: on its command line (hypervisor.qemu_args.UserNetdev).
USER_MAC = "52:54:00:12:34:56"
USER_ADDRESS = "10.0.2.15/24"
USER_GATEWAY = "10.0.2.2"
USER_DNS = "10.0.2.3"

T = TypeVar("T")


@dataclass(frozen=True)
class Interface:
    """One pod interface as the guest should get it."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    """A route of the pod (``destination`` in CIDR notation, 0.0.0.0/0 for the default)."""

    destination: str
    gateway: str = ""
    device: str = ""
    metric: int = 0


@dataclass(frozen=True)
class NetworkConfig:
    """The pod network the agent configures in the guest."""

    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    hostname: str = ""


@dataclass(frozen=True)
class Attachment:
    """What :func:`attach` made: the guest configuration and one open tap fd per interface
    (same order). The caller passes the fds to QEMU and then closes them."""

    config: NetworkConfig
    tap_fds: tuple[int, ...]


def tap_name(index: int) -> str:
    return f"tap{index}{TAP_SUFFIX}"


def user_network_config(hostname: str = "") -> NetworkConfig:
    """The guest side of ``--network user`` (QEMU slirp): static, no DHCP."""
    return NetworkConfig(
        interfaces=(Interface("eth0", USER_MAC, 1500, (USER_ADDRESS,)),),
        routes=(Route("0.0.0.0/0", USER_GATEWAY, "eth0"),),
        dns_servers=(USER_DNS,),
        hostname=hostname,
    )


# -- namespaces ------------------------------------------------------------------------------


def open_netns(path: Path) -> int:
    """An O_RDONLY fd of network namespace ``path``; ConfigError saying what is wrong.

    Refuses the host's own network namespace: redirecting its interfaces into a VM would
    cut the host off the network.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open network namespace {path}: {exc.strerror}") from exc
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise ConfigError(f"{path} is not a network namespace (not an nsfs file)") from None
        if kind != CLONE_NEWNET:
            raise ConfigError(f"{path} is a namespace, but not a network namespace")
        if identity(fd) in _host_identities():
            raise ConfigError(
                f"{path} is the host's network namespace; pod networking needs the pod's own"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(fd: int) -> str:
    """``dev:inode`` of a namespace fd: equal for two fds iff they name the same namespace."""
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def _host_identities() -> set[str]:
    found = set()
    for path in ("/proc/1/ns/net", "/proc/self/ns/net"):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            found.add(f"{st.st_dev}:{st.st_ino}")
    return found


def check_netns(path: Path) -> None:
    """Raise ConfigError unless ``path`` is a usable pod network namespace."""
    os.close(open_netns(path))


def in_netns(nsfd: int, work: Callable[[], T]) -> T:
    """Run ``work()`` in a helper thread that has joined network namespace ``nsfd``."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            try:
                syscalls.setns(nsfd, CLONE_NEWNET)
            except OSError as exc:
                raise NetworkError(f"cannot enter the network namespace: {exc.strerror}") from None
            results.append(work())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


@contextlib.contextmanager
def _netlink() -> Iterator[Any]:
    from pyroute2 import IPRoute  # imported here: only pods with a network pay for it

    with IPRoute() as ipr:
        yield ipr


def _netlink_error(exc: Exception, what: str) -> NetworkError:
    return NetworkError(f"{what}: {getattr(exc, 'args', [None, ''])[-1] or exc}")


# -- reading the namespace -------------------------------------------------------------------


def read_config(nsfd: int) -> NetworkConfig:
    """Interfaces (ethernet, not loopback, not our taps) and routes of namespace ``nsfd``."""
    return in_netns(nsfd, _read_config)


def _read_config() -> NetworkConfig:
    interfaces: list[Interface] = []
    routes: list[Route] = []
    with _netlink() as ipr:
        names: dict[int, str] = {}
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            mac = str(link.get_attr("IFLA_ADDRESS") or "").lower()
            if (
                link["flags"] & IFF_LOOPBACK
                or link["ifi_type"] != ARPHRD_ETHER
                or name.endswith(TAP_SUFFIX)
                or len(mac) != 17
            ):
                continue
            names[int(link["index"])] = name
            addresses = []
            for addr in ipr.get_addr(index=link["index"]):
                if addr["family"] == 10 and addr["scope"] != RT_SCOPE_UNIVERSE:
                    continue  # IPv6 link-local: the guest derives the same one from the MAC
                addresses.append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
            interfaces.append(
                Interface(name, mac, int(link.get_attr("IFLA_MTU")), tuple(addresses))
            )
        for family in (2, 10):
            for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                if route["proto"] == RTPROT_KERNEL or route["type"] != RTN_UNICAST:
                    continue  # made by the kernel from an address: the guest makes its own
                oif = route.get_attr("RTA_OIF")
                gateway = route.get_attr("RTA_GATEWAY") or ""
                if oif is not None and oif not in names:
                    continue  # out of an interface the guest does not get (lo, ...)
                if oif is None and not gateway:
                    continue  # multipath or unusual: not carried over
                dst = route.get_attr("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                routes.append(
                    Route(
                        destination=f"{dst}/{route['dst_len']}",
                        gateway=str(gateway),
                        device=names.get(oif, "") if oif is not None else "",
                        metric=int(route.get_attr("RTA_PRIORITY") or 0),
                    )
                )
    if len(interfaces) > MAX_INTERFACES:
        raise NetworkError(
            f"the pod network has {len(interfaces)} interfaces; at most "
            f"{MAX_INTERFACES} are supported"
        )
    return NetworkConfig(tuple(interfaces), tuple(routes))


# -- attaching and detaching -----------------------------------------------------------------


def attach(
    netns: Path, remember: Callable[[dict[str, Any]], None], expect: str | None = None
) -> Attachment:
    """Carry the interfaces of ``netns`` to taps QEMU can use; return config and tap fds.

    ``remember`` is called with what is about to be created (the pod record's ``network``
    entry, which :func:`detach` takes) before anything is created; on failure whatever was
    created is removed again (and the recorded entry still allows :func:`detach` after a
    crash). ``expect``: the :func:`identity` ``netns`` must have (NetworkError otherwise:
    a ``/proc/<pid>/ns/net`` path whose pid was reused).
    """
    nsfd = open_netns(netns)
    try:
        if expect is not None and identity(nsfd) != expect:
            raise NetworkError(f"{netns} no longer names the pod's network namespace")
        config = read_config(nsfd)
        links = [
            {"device": nic.name, "tap": tap_name(i)} for i, nic in enumerate(config.interfaces)
        ]
        in_netns(nsfd, lambda: _check_free(links))
        remember(
            {
                "mode": "netns",
                "netns": str(netns),
                "identity": identity(nsfd),
                "links": links,
            }
        )
        try:
            fds = in_netns(nsfd, lambda: _create_links(links, config.interfaces))
        except BaseException:
            with contextlib.suppress(Exception):
                in_netns(nsfd, lambda: _remove_links(links))
            raise
    finally:
        os.close(nsfd)
    return Attachment(config, tuple(fds))


def _check_free(links: list[dict[str, str]]) -> None:
    with _netlink() as ipr:
        for link in links:
            if ipr.link_lookup(ifname=link["tap"]):
                raise NetworkError(
                    f"{link['tap']} already exists in the pod network namespace "
                    "(is another VM attached to it?)"
                )
            index = _index(ipr, link["device"])
            if index is not None and _has_ingress(ipr, index):
                raise NetworkError(
                    f"{link['device']} already has an ingress qdisc; pysandbox needs it to "
                    "redirect the interface's traffic into the VM"
                )


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _has_ingress(ipr: Any, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "ingress" for q in ipr.get_qdiscs(index))


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot create tap {name}: {exc.strerror}") from exc
    return fd


def _redirect(ipr: Any, source: int, target: int) -> None:
    """Ingress qdisc on ``source`` + a match-everything u32 filter redirecting to ``target``."""
    ipr.tc("add", "ingress", source, "ffff:")
    ipr.tc(
        "add-filter",
        "u32",
        source,
        parent="ffff:",
        protocol=ETH_P_ALL,
        target=0x10001,  # flowid 1:1 (required by the u32 encoder; unused at ingress)
        keys=["0x0/0x0+0"],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target},
    )


def _create_links(links: list[dict[str, str]], interfaces: tuple[Interface, ...]) -> list[int]:
    fds: list[int] = []
    try:
        with _netlink() as ipr:
            for link, nic in zip(links, interfaces, strict=True):
                what = f"redirecting {nic.name} to {link['tap']}"
                fds.append(_open_tap(link["tap"]))
                try:
                    device = _index(ipr, link["device"])
                    tap = _index(ipr, link["tap"])
                    if device is None or tap is None:
                        raise NetworkError(f"{what}: {link['device']} disappeared")
                    ipr.link("set", index=tap, mtu=nic.mtu, state="up")
                    _redirect(ipr, device, tap)
                    _redirect(ipr, tap, device)
                except NetworkError:
                    raise
                except Exception as exc:
                    raise _netlink_error(exc, what) from exc
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _remove_links(links: list[dict[str, str]]) -> list[str]:
    """Delete our taps and the ingress qdiscs (with their filters); return what failed."""
    problems = []
    with _netlink() as ipr:
        for link in links:
            tap = _index(ipr, str(link.get("tap", "")))
            if tap is not None and str(link.get("tap", "")).endswith(TAP_SUFFIX):
                try:
                    ipr.link("del", index=tap)
                except Exception as exc:
                    if getattr(exc, "code", None) != 19:  # ENODEV: gone meanwhile
                        problems.append(f"deleting {link['tap']}: {exc}")
            device = _index(ipr, str(link.get("device", "")))
            if device is not None and _has_ingress(ipr, device):
                try:
                    ipr.tc("del", "ingress", device, "ffff:")
                except Exception as exc:
                    if getattr(exc, "code", None) not in (2, 22):  # already gone
                        problems.append(f"removing the ingress qdisc of {link['device']}: {exc}")
    return problems


def detach(network: Any) -> None:
    """Remove the taps, qdiscs and filters ``network`` (a pod record's ``network``) names.

    Idempotent, and safe after any crash: a namespace that is gone took its devices with
    it; a path that now names another namespace is left alone. NetworkError if something
    that exists could not be removed.
    """
    from sandbox.pod import redirect

    if not isinstance(network, dict) or network.get("mode") != "netns":
        return
    links = [link for link in network.get("links") or [] if isinstance(link, dict)]
    path = Path(str(network.get("netns", "")))
    if not path.is_absolute():
        return
    try:
        nsfd = open_netns(path)
    except ConfigError:
        return  # the namespace is gone, and with it everything we made in it
    try:
        if identity(nsfd) != network.get("identity"):
            return
        problems = in_netns(nsfd, lambda: _remove_links(links) + redirect.remove_redirect())
    finally:
        os.close(nsfd)
    if problems:
        raise NetworkError(f"cleaning up pod network in {path}: {'; '.join(problems)}")


def leftovers(netns: Path) -> list[str]:
    """Our taps, any ingress qdiscs and our port-forward rule in ``netns`` (for tests and
    diagnostics)."""
    from sandbox.pod import redirect

    nsfd = open_netns(netns)

    def look() -> list[str]:
        found = ["port-forward rule"] if redirect.redirect_present() else []
        with _netlink() as ipr:
            for link in ipr.get_links():
                name = str(link.get_attr("IFLA_IFNAME"))
                if name.endswith(TAP_SUFFIX):
                    found.append(f"tap {name}")
                if _has_ingress(ipr, int(link["index"])):
                    found.append(f"ingress qdisc on {name}")
                filters = ipr.get_filters(index=int(link["index"]), parent=INGRESS_HANDLE)
                if any(f.get_attr("TCA_KIND") for f in filters):
                    found.append(f"filter on {name}")
        return found

    try:
        return in_netns(nsfd, look)
    finally:
        os.close(nsfd)
