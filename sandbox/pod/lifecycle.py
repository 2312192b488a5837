"""A pod: one VM (QEMU + virtiofsd + agent proxy) that the pod's containers share.

Lifecycle (statuses and their transitions: sandbox/pod/record.py)::

    boot():  reserve dir [booting] -> shared mount -> virtiofsd -> [taps in the pod netns]
                -> QEMU (paused) -> agent proxy -> cont -> agent healthy
                -> mount the pod share in the guest -> [configure the guest network]
                -> [running]
    stop():  [stopping] agent Shutdown -> QEMU exits -> destroy()
    destroy(): [stopping] undo what the record names in reverse order: QEMU, proxy, taps,
                virtiofsd, mounts -> dir and record removed [stopped]; or, if something
                could not be undone, [broken] (kept for a retry)

Every process is recorded in pod.json (pid + start time) the moment it exists, and the
network devices (sandbox/pod/network.py) before they are created, so that ``destroy`` can always
clean up, whichever step failed and whichever process was killed.
A boot that fails is rolled back by ``destroy``, keeps the serial console log under
``<root>/logs/`` and names it in the error.

The host processes come from ``self.drivers`` (sandbox/pod/drivers.py): QEMU, virtiofsd and
the agent proxy, or a test's fake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agentapi.limits import DEFAULT_RPC_TIMEOUT
from hypervisor.process import ProcessHandle, signals_held
from hypervisor.zeropages import ZeroMap
from sandbox import store as state
from sandbox.errors import (
    AgentError,
    ConfigError,
    NetworkError,
    PodProcessDied,
    StateError,
    TemplateError,
)
from sandbox.pod import drivers as pod_drivers
from sandbox.pod import host_cgroup as cgroups
from sandbox.pod import hostfs
from sandbox.pod import record as pod_record
from sandbox.pod.drivers import Drivers
from sandbox.pod.record import BootKind, PodRecord, PodStatus

if TYPE_CHECKING:  # imported where used: verbs that only talk to an agent skip them (exec)
    from hypervisor.base import Hypervisor
    from hypervisor.qemu_args import Accelerator, NicConfig, VMConfig
    from hypervisor.virtiofsd import LockMode
    from sandbox.pod import network
    from sandbox.pod.agent_client import ContainerClient

#: Guest path of the pod's virtio-fs share (container rootfs live below it).
GUEST_SHARE = "/run/pysandbox/shared"
SHARE_TAG = "pod"
DEFAULT_MEMORY_MIB = 512
DEFAULT_BOOT_TIMEOUT = 60.0
#: Console logs of failed boots kept under ``<root>/logs/`` (the newest; older ones go).
KEPT_CONSOLE_LOGS = 16
#: Most bytes of a log kept under ``<root>/logs/`` (its end): a guest can write its serial
#: console without bound, and the kept copy must not double that.
KEPT_LOG_BYTES = 1 << 20
#: The pod's host processes a waiting call watches (:meth:`Pod.casualty`): record name,
#: what the error calls it, its log in the pod's directory.
WATCHED_PROCESSES = (
    ("qemu", "QEMU", "console-qemu.log"),
    ("virtiofsd", "virtiofsd", "virtiofsd.log"),
    ("proxy", "agent proxy", "proxy.log"),
)


def lock_mode() -> LockMode:
    """Where a pod's file locks are held: $PYSANDBOX_LOCKS (``local`` or ``remote``).

    ``local`` (default): in the guest kernel; blocking locks work, but exclude only within the
    VM. ``remote``: on the host file, so host processes and other pods are excluded too, but
    blocking requests fail with EOPNOTSUPP (docs/file-semantics.md). Raises ConfigError.
    """
    raw = os.environ.get("PYSANDBOX_LOCKS", "local")
    if raw not in ("local", "remote"):
        raise ConfigError(f"PYSANDBOX_LOCKS={raw!r}: expected 'local' or 'remote'")
    return "remote" if raw == "remote" else "local"


def _check_jail() -> None:
    """ConfigError, before anything is started, for misconfigured VMM jail settings
    (hypervisor/jail_ids.py); an exhausted id range is found when QEMU starts."""
    from hypervisor import jail_ids
    from hypervisor.errors import JailError

    try:
        jail_ids.settings()
    except JailError as exc:
        raise ConfigError(str(exc)) from exc


def boot_timeout() -> float:
    """Seconds to wait for the agent: $PYSANDBOX_BOOT_TIMEOUT or the default."""
    raw = os.environ.get("PYSANDBOX_BOOT_TIMEOUT")
    if not raw:
        return DEFAULT_BOOT_TIMEOUT
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"PYSANDBOX_BOOT_TIMEOUT={raw!r} is not a number of seconds") from exc
    if value <= 0:
        raise ConfigError("PYSANDBOX_BOOT_TIMEOUT must be positive")
    return value


@dataclass
class Pod:
    """A pod VM and its record (:class:`~sandbox.pod.record.PodRecord`, in ``pod.json``).

    ``drivers`` start and stop its host processes (:mod:`sandbox.pod.drivers`; QEMU,
    virtiofsd and the agent proxy unless a test installed a fake).
    """

    root: Path
    id: str
    record: PodRecord
    drivers: Drivers = field(default_factory=pod_drivers.current, repr=False, compare=False)
    #: The boot's client of the agent, kept for the first :meth:`client` (``keep_client``).
    _kept_client: ContainerClient | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # -- paths -------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return pod_record.directory(self.root, self.id)

    @property
    def shared_dir(self) -> Path:
        """Host directory exported to the guest at :data:`GUEST_SHARE`."""
        return self.dir / "shared"

    @property
    def agent_address(self) -> str:
        return f"unix:{self.dir / 'agent.sock'}"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    # -- record ------------------------------------------------------------------------------

    @property
    def status(self) -> PodStatus:
        """The recorded status (a ``str``: ``"running"``...)."""
        return self.record.status

    def observed_status(self) -> PodStatus:
        """The recorded status, except that a ``running`` pod whose QEMU or virtiofsd is
        gone (killed, crashed: what :meth:`casualty` names) reads ``broken``: it cannot run
        anything until stopped. Cheap: no RPC, the recorded pid and start time of each are
        checked in /proc. (A dead agent proxy is not counted: it is replaced on demand.)"""
        if self.status is PodStatus.RUNNING:
            for name in ("qemu", "virtiofsd"):
                ref = self.process(name)
                if ref is None or not ref.alive():
                    return PodStatus.BROKEN
        return self.status

    def process(self, name: str) -> ProcessHandle | None:
        """The recorded process ``name`` (``qemu``, ``virtiofsd``, ``proxy``), if any."""
        return self.record.processes.get(name)

    def host_cgroup(self) -> cgroups.Placement | None:
        """The pod's host cgroup (docs/cgroups.md "Host cgroups"), None when it has none."""
        return cgroups.Placement.from_json(self.record.host_cgroup)

    def save_host_cgroup(self, placement: cgroups.Placement) -> None:
        """Record ``placement`` (e.g. new container limits) in pod.json."""
        self.record.host_cgroup = placement.to_json()
        self.save()

    def locked(self) -> contextlib.AbstractContextManager[state.Lock]:
        """The pod's lock (:func:`sandbox.pod.record.lock`): hold it to change a record that
        other processes change too (members, the proxy); reload the record inside it."""
        return pod_record.lock(self.root, self.id)

    def reload(self) -> None:
        """Read the record again (after taking :meth:`locked`)."""
        self.record = pod_record.load(self.root, self.id)

    def save(self) -> None:
        """Write the record (atomically; FileNotFoundError once the pod's directory is gone)."""
        pod_record.save(self.root, self.record)

    def _remember(self, name: str, ref: ProcessHandle) -> None:
        # In memory first: a rollback tears down what the in-memory record names, so a
        # process is stopped again even when saving the record fails.
        self.record.processes[name] = ref
        self.save()

    def _forget(self, *names: str) -> None:
        for name in names:
            self.record.processes.pop(name, None)
        self.save()

    def remember_network(self, network_record: dict[str, Any]) -> None:
        """Record the pod network's ``network`` entry (sandbox/pod/network.py) now."""
        self.record.network = network_record
        self.save()

    def running_vm(self) -> Hypervisor:
        """The pod's running VM, re-attached from this process (for QMP: hot-plugging);
        StateError if it has no VMM recorded. It reports ``shutdown`` once QEMU is gone."""
        from hypervisor.guest_image import find_image

        qemu = self.process("qemu")
        if qemu is None:
            raise StateError(f"pod {self.id} has no VM")
        image = find_image(self.record.image or None)
        accel = cast("Accelerator", self.record.accel)
        config = self._vm_config(
            image, accel, self.record.memory_mib, kernel_cmdline(accel, self.record.cpus)
        )
        return self.drivers.running(config, qemu)

    def _set_status(self, status: PodStatus) -> None:
        """Guarded transition (StateError if illegal), then saved."""
        self.record.transition(status)
        self.save()

    def _set_status_quietly(self, status: PodStatus) -> None:
        """Guarded transition during a teardown: saved when possible, never recreating a
        removed directory and never stopping the teardown because the disk is full."""
        self.record.transition(status)
        with contextlib.suppress(OSError):
            self.save()

    # -- agent -------------------------------------------------------------------------------

    def client(self, timeout: float | None = None) -> ContainerClient:
        """A client of this pod's agent, through the pod's agent proxy.

        If the proxy died (killed, crashed) while the VM of a running pod runs, a new one is
        started first; it resynchronises the serial channel, so the agent is reachable again.
        """
        from sandbox.pod.agent_client import ContainerClient  # grpc: see run.foreground

        if self.status is PodStatus.RUNNING:
            self._ensure_proxy()
        kept, self._kept_client = self._kept_client, None
        if kept is not None and timeout is None:
            return kept
        if kept is not None:
            kept.close()
        return ContainerClient(
            self.agent_address,
            DEFAULT_RPC_TIMEOUT if timeout is None else timeout,
            pod_id=self.id,
            watch=self.casualty,
            output_ports=self.dir,
        )

    def casualty(self) -> str | None:
        """One line naming the first of the pod's recorded processes (QEMU, virtiofsd, agent
        proxy) that is gone, its pid and where its log was kept (``<root>/logs/<pod>-<log>``,
        copied there: the pod's directory goes with the pod); None while all of them live.

        A call waiting for the agent asks this (the client's ``watch``): without QEMU or the
        proxy the call cannot be answered, and without virtiofsd the guest waits for the
        share forever. A proxy replaced meanwhile by another process (a newer record) is
        not a casualty.
        """
        for name, label, log in WATCHED_PROCESSES:
            ref = self.process(name)
            if ref is None or ref.alive():
                continue
            with contextlib.suppress(StateError, ConfigError, OSError):
                now = pod_record.load(self.root, self.id).processes.get(name)
                if now is not None and now != ref and now.alive():
                    continue
            kept = self._keep_log(log, f"{self.id}-{name}.log")
            where = f"its log is kept at {kept}" if kept is not None else "it left no log"
            return f"{label} (pid {ref.pid}) of pod {self.id} died; {where}"
        return None

    def _ensure_proxy(self) -> None:
        proxy, qemu = self.process("proxy"), self.process("qemu")
        if qemu is None or not qemu.alive() or (proxy is not None and proxy.alive()):
            return
        with self.locked():
            self.reload()
            if self.status is not PodStatus.RUNNING:
                return  # going away: a new proxy would only race its teardown
            proxy = self.process("proxy")
            if proxy is None or not proxy.alive():
                forward = self._port_forward_listener()
                try:
                    with cgroups.inside(self.host_cgroup()):
                        started = self.drivers.start_proxy(self.dir, qemu.pid, forward)
                    self._remember("proxy", started)
                finally:
                    if forward is not None:
                        forward.close()

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, root: Path, pod_id: str) -> Pod:
        """The recorded pod ``pod_id``: NotFoundError when there is none, StateError when its
        directory holds another pod, ConfigError for an invalid id or a corrupt record."""
        return cls(root, pod_id, pod_record.load(root, pod_id))

    @classmethod
    def list(cls, root: Path) -> list[Pod]:
        """Every pod recorded under ``root`` (unreadable records skipped)."""
        return [cls(root, record.id, record) for record in pod_record.all_records(root)]

    # -- boot --------------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        root: Path,
        pod_id: str,
        *,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        cpus: int = 1,
        timeout: float | None = None,
        netns: Path | None = None,
        user_network: bool = False,
        hostname: str = "",
        privileged_files: bool = False,
        locks: LockMode | None = None,
        cgroup: tuple[cgroups.Request, cgroups.Placement] | None = None,
        cached_files: bool = False,
        owner: ProcessHandle | None = None,
        keep_client: bool = False,
        cgroup_layout: str = "",
    ) -> Pod:
        """Boot a new pod VM and return once its agent is healthy and the share mounted.

        Network (docs/networking.md): with ``netns`` the interfaces of that network namespace
        are carried into the guest (tap + tc redirect, one virtio-net NIC each) and the agent
        gives the guest their MACs, addresses and routes; with ``user_network`` the guest gets
        QEMU user-mode networking (outbound NAT, 10.0.2.15/24). Neither: loopback only.
        ``hostname`` is the guest's (root UTS namespace; default the host's, which a container
        under runc with a UTS namespace and no spec hostname sees) and, with user networking,
        goes into the hosts file written for containers.
        Unless ``privileged_files``, files the guest creates through the share are powerless
        on the host: no device nodes, setuid/setgid bits or file capabilities (EPERM in the
        guest; docs/security.md). With it, the guest's root acts as the host's root on
        writable shares, as runc's containers do. ``locks`` (default :func:`lock_mode`) says
        whether file locks are held in the guest or on the host files. ``cgroup`` (from
        :func:`sandbox.pod.host_cgroup.plan`) is the host cgroup made (and recorded) before
        anything is started; every process of the pod starts in it, and it goes with the pod.
        ``cached_files`` lets the guest keep file data cached across opens: only for pods
        whose shares nothing but the guest changes (an image of the store, no host volume),
        since a host change is then seen only when the guest revalidates the file's
        attributes, up to 1 s later (docs/file-semantics.md, "Cached shares").
        ``owner`` is recorded from the first save on (:attr:`PodRecord.owner`).
        ``cpus``: the VM's vCPUs (``-smp``), 1 up to the host's online CPUs (each vCPU is a
        host thread under TCG; a VM of more would only contend with itself).
        ``keep_client``: the boot's client of the agent (its channel connected) is what the
        first :meth:`client` call without a timeout returns, instead of a new one (a new
        channel's first call costs a connection to the proxy: ~20 ms on a run's path). For a
        caller that makes that call next, in this process (a run). ``cgroup_layout`` ("v1",
        "v2"; "" none): the layout the pod's containers will ask for (their spec's
        annotation, :mod:`sandbox.pod.guest_cgroup`), which a restored guest sets up in its
        idle time after the boot, ahead of the first container (protocol 1.14); a container
        asking for the other one is then refused, as in a VM whose first container chose.

        Raises StateError if the pod exists, ConfigError for a missing or invalid guest image
        or bad settings, AgentError/AgentTimeout if the agent is not reached (the error names
        the kept console log). On any failure (an exception, a signal turned into one) the
        boot is rolled back: everything it started is stopped in reverse order
        (:meth:`destroy`) and the pod's directory and record are gone.
        """
        from hypervisor import accel as accel_mod
        from hypervisor.errors import GuestImageError
        from hypervisor.guest_image import find_image
        from sandbox.pod import network, template

        state.validate_id(pod_id, "pod")
        state.check_socket_room(root)
        _check_jail()
        if netns is not None and user_network:
            raise ConfigError("a pod gets either a network namespace or user networking, not both")
        if netns is not None:
            network.check_netns(netns)
        if not 128 <= memory_mib <= 65536:
            raise ConfigError(f"pod memory {memory_mib} MiB is outside 128..65536")
        from hypervisor.qemu_args import host_cpus

        if not 1 <= cpus <= host_cpus():
            raise ConfigError(f"pod vCPUs {cpus} is outside 1..{host_cpus()} (the host's CPUs)")
        try:
            image = find_image()
        except GuestImageError as exc:
            raise ConfigError(str(exc)) from exc
        if template.enabled():
            template.max_bytes()  # a bad budget is refused before anything starts
        chosen = accel_mod.detect()
        remote_locks = (locks or lock_mode()) == "remote"
        pod = cls(
            root,
            pod_id,
            PodRecord(
                id=pod_id,
                status=PodStatus.BOOTING,
                created=time.time(),
                accel=chosen.chosen,
                memory_mib=memory_mib,
                cpus=cpus,
                image=str(image.dir),
                privileged_files=privileged_files,
                remote_locks=remote_locks,
                cached_files=cached_files,
                owner=owner,
            ),
        )
        state.ensure_dir(root / "p")
        reserved = False
        try:
            with signals_held():  # reserved and known to be: a signal lands after both
                try:
                    pod.dir.mkdir(mode=0o700)  # reserves the id
                except FileExistsError:
                    raise StateError(
                        f"pod {pod_id} already exists (a run or container of that name, or "
                        f"what a killed one left): see 'pysandbox --root {root} pod list'; "
                        f"'pysandbox --root {root} pod stop {pod_id}' removes it"
                    ) from None
                reserved = True
            pod.shared_dir.mkdir(mode=0o711)
            pod.save()
            placement = None
            if cgroup is not None:
                placement = pod._make_host_cgroup(*cgroup)
            with cgroups.inside(placement):
                pod._start(
                    image,
                    chosen.chosen,
                    memory_mib,
                    timeout or boot_timeout(),
                    netns=netns,
                    user_network=user_network,
                    hostname=hostname,
                    keep_client=keep_client,
                    cgroup_layout=cgroup_layout,
                )
            if placement is not None:
                # Only now: restoring a template reads (so allocates) all guest RAM for a
                # moment before its zero pages are given back (hypervisor/zeropages.py); a
                # limit during the boot would OOM-kill that QEMU (docs/cgroups.md).
                cgroups.apply(placement, cgroups.pod_limits(placement.containers))
        except BaseException as exc:
            if not reserved:
                raise
            if pod._kept_client is not None:
                pod._kept_client.close()
                pod._kept_client = None
            kept = pod._keep_console_log()
            pod.destroy()
            if isinstance(exc, AgentError) and kept is not None:
                raise exc.amended(f"serial console log kept at {kept}") from exc
            raise
        return pod

    def _make_host_cgroup(
        self, req: cgroups.Request, placement: cgroups.Placement
    ) -> cgroups.Placement:
        """Make the pod's host cgroup, recorded first (``destroy`` removes it, whatever step
        fails); its limits are written once the VM runs."""
        self.save_host_cgroup(placement)
        try:
            cgroups.make(placement, req)
        finally:
            self.save_host_cgroup(placement)
        return placement

    def _start(
        self,
        image: Any,
        accel_name: Accelerator,
        memory_mib: int,
        timeout: float,
        *,
        netns: Path | None = None,
        user_network: bool = False,
        hostname: str = "",
        keep_client: bool = False,
        cgroup_layout: str = "",
    ) -> None:
        """The boot steps, in order; each is recorded before or the moment it exists, so
        that :meth:`destroy` undoes exactly what was done, whichever step fails."""
        from hypervisor.qemu_args import NicConfig
        from sandbox.pod import network, template

        # 1. Bind mounts of container root filesystems made later must reach virtiofsd's
        #    mount namespace: make the shared directory a shared mount first.
        hostfs.make_shared_mountpoint(self.shared_dir)
        # 2. virtiofsd before QEMU: a cold-booted QEMU connects to its socket at start.
        fs = self.drivers.file_server(
            self.dir / "virtiofsd.sock",
            self.shared_dir,
            self.dir / "virtiofsd.log",
            privileged_files=self.record.privileged_files,
            locks="remote" if self.record.remote_locks else "local",
            cached=self.record.cached_files,
        )
        with signals_held():  # a SIGTERM now is handled once the process is recorded
            fs.start()
            self._remember("virtiofsd", fs.handle)
        # 3. The pod network's taps (recorded, then created) before QEMU, which opens them.
        guest_network: network.NetworkConfig | None = None
        nics: tuple[NicConfig, ...] = ()
        tap_fds: tuple[int, ...] = ()
        forward: socket.socket | None = None  # the port-forward listener (pod netns)
        if netns is not None:
            attached = network.attach(netns, self.remember_network)
            guest_network, tap_fds = attached.config, attached.tap_fds
            nics = tuple(
                NicConfig(nic.mac, "tap", fd, nic.mtu)
                for nic, fd in zip(attached.config.interfaces, tap_fds, strict=True)
            )
            if hostname:
                guest_network = dataclasses.replace(guest_network, hostname=hostname)
            forward = self._open_port_forward()
        elif user_network:
            self.remember_network({"mode": "user"})
            guest_network = network.user_network_config(hostname)
            nics = (NicConfig(network.USER_MAC, "user"),)
        # 4. QEMU (paused), its agent proxy, then the guest runs: restored from the
        #    template VM if there is one, else booted cold.
        try:
            boot = BootKind.COLD
            if template.enabled():
                deadline = time.monotonic() + timeout
                if self._restore(image, accel_name, memory_mib, timeout, nics, forward):
                    boot = BootKind.RESTORED
                else:
                    timeout = max(0.1, deadline - time.monotonic())  # one budget for the boot
            if boot is BootKind.COLD:
                self._cold_start(image, accel_name, memory_mib, nics, forward)
        finally:
            for fd in tap_fds:
                os.close(fd)  # QEMU holds the taps now; they vanish when it exits
            if forward is not None:
                forward.close()  # the proxy holds it now
        qemu = self.process("qemu")
        assert qemu is not None
        # 5. The agent: healthy, told it was restored, the share mounted, the network set.
        agent = self.client()
        try:
            mounted = False
            if boot is BootKind.RESTORED:
                # A clone of the template: its own randomness and the current time first,
                # then the share, in one call. No Health before: this first call waits for
                # the agent (the boot's timeout; cut short if QEMU, virtiofsd or the proxy
                # dies: the client's watch), and its answer proves the agent serves.
                mounted, protocol = agent.restored(
                    secrets.token_bytes(64),
                    time.time_ns(),
                    timeout,
                    (SHARE_TAG, GUEST_SHARE),
                    hostname or socket.gethostname(),
                    cgroup_layout,
                )
                self.record.agent_protocol = protocol or None
            else:
                agent.wait_healthy(timeout, alive=qemu.alive)
            if not mounted:  # cold boot, or an agent before protocol 1.8
                agent.mount_share(SHARE_TAG, GUEST_SHARE)
            if guest_network is not None:
                files = agent.configure_network(guest_network)
                self.record.network = {
                    **(self.record.network or {}),
                    "guest_files": {"resolv_conf": files.resolv_conf, "hosts": files.hosts},
                }
        except BaseException:
            agent.close()
            raise
        if keep_client:
            self._kept_client = agent
        else:
            agent.close()
        self.record.boot = boot
        self._set_status(PodStatus.RUNNING)

    def _vm_config(
        self,
        image: Any,
        accel_name: Accelerator,
        memory_mib: int,
        cmdline: str,
        **devices: Any,
    ) -> VMConfig:
        from sandbox.pod import template

        return template.vm_config(
            image,
            accel_name,
            memory_mib,
            cmdline,
            self.dir,
            name=f"pysandbox-{state.pod_dir_name(self.id)}",
            cpus=self.record.cpus,
            **devices,
        )

    def _cold_start(
        self,
        image: Any,
        accel_name: Accelerator,
        memory_mib: int,
        nics: tuple[NicConfig, ...],
        forward: socket.socket | None = None,
    ) -> None:
        """Boot the VM from scratch (share and NICs on the command line) and let it run."""
        vm = self.drivers.hypervisor(
            self._vm_config(
                image,
                accel_name,
                memory_mib,
                kernel_cmdline(accel_name, self.record.cpus),
                shares=((SHARE_TAG, self.dir / "virtiofsd.sock"),),
                nics=nics,
            )
        )
        with signals_held():
            vm.start()
            self._remember("qemu", vm.handle)
        with signals_held():
            self._remember("proxy", self.drivers.start_proxy(self.dir, vm.pid, forward))
        vm.resume()

    def _restore(
        self,
        image: Any,
        accel_name: Accelerator,
        memory_mib: int,
        timeout: float,
        nics: tuple[NicConfig, ...],
        forward: socket.socket | None = None,
    ) -> bool:
        """Start this pod's VM from the template for its machine (sandbox/pod/template.py).

        True once the restored VM runs with the share and ``nics`` hot-plugged (the caller
        then waits for the agent and sends ``Restored``). False if no template can be had or
        restoring fails: whatever this attempt started is stopped (QEMU, then its proxy) and
        forgotten and the caller cold boots; a state file QEMU could not load is discarded.
        """
        from hypervisor.errors import HypervisorError, JailError, LaunchError
        from sandbox.pod import template

        cmdline = kernel_cmdline(accel_name, self.record.cpus)
        try:
            # Open: a template evicted from now on stays readable through this file.
            found = template.acquire(
                image, accel_name, memory_mib, cmdline, timeout, self.drivers, cpus=self.record.cpus
            )
        except TemplateError as exc:
            self.note(f"no template, cold boot: {exc}")
            return False
        state_file = found.state_file
        zero_map = ZeroMap(state_file.with_name(template.ZERO_MAP_FILE), ZeroMap.key_of(found.fd))
        user_nic = any(nic.backend == "user" for nic in nics)
        try:
            vm = self.drivers.hypervisor(
                self._vm_config(
                    image,
                    accel_name,
                    memory_mib,
                    cmdline,
                    incoming_fd=found.fd,
                    host_network=user_nic,
                )
            )
        except BaseException:
            found.close()
            raise
        loaded = False
        try:
            with signals_held():
                try:
                    vm.start()
                finally:
                    found.close()
                self._remember("qemu", vm.handle)
            # The proxy starts (a Python process) while QEMU loads the state.
            with signals_held():
                pending = self.drivers.begin_proxy(self.dir, vm.pid, forward)
                self._remember("proxy", pending.handle)
            vm.wait_incoming(timeout)
            loaded = True
            started = time.monotonic()
            # Loading touched all RAM; paused: safe now.
            released = vm.release_zero_pages(zero_map)
            self.note(
                f"restored; {released >> 20} MiB of zero pages released"
                f" in {time.monotonic() - started:.3f}s"
            )
            vm.hotplug_share(SHARE_TAG, self.dir / "virtiofsd.sock")
            for index, nic in enumerate(nics):
                vm.hotplug_nic(nic, index)
            pending.wait()
            vm.resume()
        except (HypervisorError, AgentError, OSError) as exc:
            if isinstance(exc, JailError):
                raise  # not the template's fault, and a cold boot would fail alike
            if isinstance(exc, AgentError) and (died := self.casualty()) is not None:
                # A process of the pod was killed (the proxy while it started, virtiofsd):
                # not the template's fault either, and a cold boot would find it gone.
                raise PodProcessDied(died, pod_id=self.id) from exc
            # Only a state QEMU said it could not load is the template's fault: discard it
            # then; never for a QEMU killed by a signal (SIGKILL, the OOM killer) or a timeout.
            unloadable = isinstance(exc, LaunchError) and exc.reported
            if unloadable and not loaded:
                template.discard(found)
                self.note(f"restoring {state_file} failed, template discarded: {exc}")
            else:
                self.note(f"restoring {state_file} failed: {exc}")
            vm.kill()  # also removes its sockets and pid file
            proxy = self.process("proxy")
            if proxy is not None:
                self.drivers.terminate("proxy", proxy)
            self._forget("qemu", "proxy")
            return False
        return True

    def _open_port_forward(self) -> socket.socket | None:
        """Install the port-forward rule in the pod's network namespace and return the
        listener the agent proxy serves (sandbox/pod/portforward.py); None, with a boot note,
        when this host cannot have them (no iptables): the pod works without."""
        from sandbox.pod import network, redirect

        entry = self.record.network or {}
        try:
            nsfd = network.open_netns(Path(str(entry.get("netns"))))
            try:
                if network.identity(nsfd) != entry.get("identity"):
                    raise NetworkError("the pod's network namespace was replaced")
                network.in_netns(nsfd, redirect.add_redirect)
            finally:
                os.close(nsfd)
        except (NetworkError, ConfigError) as exc:
            self.note(f"kubectl port-forward unavailable: {exc}")
            return None
        return self._port_forward_listener()

    def _port_forward_listener(self) -> socket.socket | None:
        """A new port-forward listener in the pod's network namespace, for a proxy about to
        start; None for a pod without one (or with a boot note when it cannot be made)."""
        from sandbox.pod import portforward

        entry = self.record.network
        if not isinstance(entry, dict) or entry.get("mode") != "netns":
            return None
        try:
            return portforward.listen(Path(str(entry.get("netns"))), str(entry.get("identity")))
        except (NetworkError, ConfigError) as exc:
            self.note(f"kubectl port-forward unavailable: {exc}")
            return None

    def note(self, text: str) -> None:
        """Append a line to the pod's boot notes (``boot.log`` in its directory)."""
        with contextlib.suppress(OSError), open(self.dir / "boot.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def _keep_console_log(self) -> Path | None:
        """Copy the console log of a failed boot to ``<root>/logs/`` (its path, or None);
        only the :data:`KEPT_CONSOLE_LOGS` newest kept logs stay there."""
        return self._keep_log(self.console_log.name, f"{self.id}-console.log")

    def _keep_log(self, name: str, kept_name: str) -> Path | None:
        """Copy the log ``name`` of the pod's directory (its last :data:`KEPT_LOG_BYTES`)
        to ``<root>/logs/kept_name`` (its path, or None when there is none); only the
        :data:`KEPT_CONSOLE_LOGS` newest logs of each kind (the part of ``kept_name`` after
        the pod id) stay there."""
        source = self.dir / name
        if not source.exists():
            return None
        try:
            logs = state.ensure_dir(self.root / "logs")
            kept = logs / kept_name
            _copy_tail(source, kept, KEPT_LOG_BYTES)
        except OSError:
            return None
        prune_console_logs(logs, pattern="*" + kept_name.removeprefix(self.id))
        return kept

    # -- stop --------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Power the VM of a running pod off through its agent (waiting up to ``timeout``
        seconds for QEMU to exit), then tear everything down (:meth:`destroy`)."""
        self.begin_stop()
        self.finish_stop(timeout)

    def begin_stop(self) -> None:
        """The first half of :meth:`stop`: a running pod becomes ``stopping`` and its agent
        is asked to power the VM off (it syncs the guest's file systems, answers, then
        powers off). Uses gRPC; never raises for an agent that cannot be reached.

        A pod whose virtiofsd is gone (:meth:`observed_status` ``broken``) is not asked: the
        guest's sync would wait for the share for ever, so :meth:`finish_stop` stops QEMU
        the hard way at once (it used to wait out the call's 5 s and QEMU's 10 s)."""
        broken = self.observed_status() is PodStatus.BROKEN
        if self.mark_stopping() and not broken:
            self.request_power_off()

    def mark_stopping(self) -> bool:
        """A running pod whose QEMU lives becomes ``stopping`` (recorded: a new pod of the
        same id waits for it, nothing else uses it); whether it did. No gRPC."""
        qemu = self.process("qemu")
        if self.status is PodStatus.RUNNING and qemu is not None and qemu.alive():
            self._set_status_quietly(PodStatus.STOPPING)
            return True
        return False

    def request_power_off(self) -> None:
        """Ask the agent of a ``stopping`` pod to power the VM off (Shutdown: it syncs the
        guest's file systems first). Uses gRPC; never raises for an agent that cannot be
        reached (:meth:`finish_stop` then stops QEMU the hard way)."""
        if self.status is not PodStatus.STOPPING:
            return
        from sandbox.pod.agent_client import ContainerClient

        # No proxy restart here: stop may run under the pod lock; a dead proxy just means
        # the hard stop.
        with (
            contextlib.suppress(AgentError),
            ContainerClient(self.agent_address, 5.0) as agent,
        ):
            agent.shutdown()

    def finish_stop(self, timeout: float = 10.0) -> None:
        """The second half of :meth:`stop`: wait up to ``timeout`` seconds for QEMU to exit,
        then :meth:`destroy`. No gRPC (safe in a forked child)."""
        qemu, virtiofsd = self.process("qemu"), self.process("virtiofsd")
        if (
            self.status is PodStatus.STOPPING
            and qemu is not None
            and qemu.alive()
            and (virtiofsd is None or virtiofsd.alive())  # else the guest cannot sync
        ):
            qemu.wait(timeout)
        self.destroy()

    def _remove_virtiofsd_pid_file(self) -> None:
        """virtiofsd never removes its pid file in /var/run/virtiofsd/ (named after the
        socket path): remove it once no live virtiofsd serves this pod's socket."""
        from hypervisor.process import remove_quietly
        from hypervisor.virtiofsd import Virtiofsd, pid_file_for

        socket = self.dir / "virtiofsd.sock"
        if Virtiofsd(socket, self.shared_dir).owner() is None:
            remove_quietly(pid_file_for(socket))

    def destroy(self) -> None:
        """Undo everything the record names, in the reverse of the boot order; remove the
        pod's directory and record.

        Works from the record alone, in any state and after any crash; idempotent (a pod
        this object already destroyed is left alone). The order, and why:

        1. QEMU, then its agent proxy (which only relays to QEMU and exits with it; stopped
           after it, so no live VM is ever left without a proxy that a shim would restart);
        2. the pod network's taps, qdiscs and filters (QEMU held the taps);
        3. virtiofsd (QEMU was its only client);
        4. every mount below the directory (container files, then the share itself);
        5. the directory, only if nothing is mounted below it any more (never rmtree across
           a mount: it would delete a user's rootfs or volume).

        Every step runs even if an earlier one failed. If one failed, the pod is left
        ``broken`` with its directory and record (a later ``destroy`` retries) and the first
        failure is raised: StateError naming what is still mounted, NetworkError for a pod
        network that could not be cleaned up.
        """
        if self.status is PodStatus.STOPPED:
            return
        with signals_held():  # a SIGTERM must not cut an undo in two: it comes after
            self._destroy()

    def _destroy(self) -> None:
        from sandbox.pod import network

        self._set_status_quietly(PodStatus.STOPPING)
        failures: list[Exception] = []

        def step(action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:  # the remaining steps still run
                failures.append(exc)

        step(functools.partial(self._terminate, "qemu"))
        step(functools.partial(self._terminate, "proxy"))
        step(functools.partial(network.detach, self.record.network))
        step(functools.partial(self._terminate, "virtiofsd"))
        step(self._remove_virtiofsd_pid_file)
        step(functools.partial(hostfs.unmount_tree, self.dir))
        step(self._remove_host_cgroup)
        left = hostfs.mounts_below(self.dir)
        if left:
            failures.append(
                StateError(f"cannot remove pod {self.id}: still mounted: {', '.join(left)}")
            )
        if failures:
            self._set_status_quietly(PodStatus.BROKEN)
            raise failures[0]
        shutil.rmtree(self.dir, ignore_errors=True)
        self.record.transition(PodStatus.STOPPED)

    def _remove_host_cgroup(self) -> None:
        """Remove the host cgroup the pod made, once the processes in it are gone (those
        that linger, e.g. shims whose VM went, are killed: the cgroup holds only the pod's)."""
        placement = self.host_cgroup()
        if placement is None:
            return
        try:
            cgroups.remove(placement)
        finally:
            self.record.host_cgroup = placement.to_json() if placement.created else None
            with contextlib.suppress(OSError):
                self.save()

    def _terminate(self, name: str) -> None:
        ref = self.process(name)
        if ref is not None:
            self.drivers.terminate(name, ref)


def _copy_tail(source: Path, target: Path, limit: int) -> None:
    """Write the last ``limit`` bytes of ``source`` to ``target`` (replaced)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        if size > limit:
            src.seek(size - limit)
            dst.write(f"[{size - limit} earlier bytes not kept]\n".encode())
        shutil.copyfileobj(src, dst)


def prune_console_logs(logs: Path, keep: int | None = None, pattern: str = "*-console.log") -> None:
    """Remove all but the ``keep`` (default :data:`KEPT_CONSOLE_LOGS`) most recently
    written files of ``logs`` matching ``pattern`` (console logs unless told)."""
    keep = KEPT_CONSOLE_LOGS if keep is None else keep
    found = []
    for path in logs.glob(pattern):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime_ns, path))
    for _mtime, path in sorted(found, reverse=True)[keep:]:
        with contextlib.suppress(OSError):
            path.unlink()


def kernel_cmdline(accel: Accelerator = "tcg", cpus: int = 1) -> str:
    """The guest kernel command line for ``accel`` and ``cpus`` vCPUs (tuned for fast boots
    under TCG; see host-facts).

    ``mitigations=off`` only under TCG: there the guest's code never runs on the host CPU
    as such (QEMU translates it), so the guest kernel's CPU side-channel mitigations guard
    nothing and cost time. Under KVM the guest runs natively and its containers could use
    those side channels against the guest kernel and each other: the kernel's defaults stay
    (docs/security.md, "CPU side channels")."""
    return " ".join(
        [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "cryptomgr.notests",
            "tsc=reliable",
            "no_timer_check",
            "noreplace-smp",
            "i8042.noaux",
            "i8042.nomux",
            "i8042.nopnp",
            "i8042.dumbkbd",
            "8250.nr_uarts=1",
            *(["mitigations=off"] if accel == "tcg" else []),
            "audit=0",
            # tracer_init_tracefs: no tracefs files; they pin ~10k dentries and inodes,
            # ~9 MiB of slab in every restored pod (docs/performance.md, guest RAM).
            "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,"
            "load_system_certificate_list,tracer_init_tracefs",
            # No ACPI interrupt routing: probing each virtio-pci device otherwise interprets
            # the PCI link AML under TCG, ~0.1 s per device (docs/performance.md). It also
            # leaves the kernel one CPU (it takes no SMP configuration from the MADT then):
            # a VM of several vCPUs keeps ACPI routing and pays that time.
            *(["acpi=noirq"] if cpus == 1 else []),
            # The virtio-pmem root lies above 4 GiB: without this the kernel reserves a
            # 64 MiB bounce buffer no device here needs (docs/root-device.md).
            "swiotlb=noforce",
        ]
    )
