"""A pod: one VM (QEMU + virtiofsd + agent proxy) that the pod's containers share.

Lifecycle::

    boot():  reserve dir -> virtiofsd -> [taps in the pod netns] -> QEMU (paused) -> agent proxy
                -> cont -> agent healthy -> mount the pod share in the guest
                -> [configure the guest network] -> status "running"
    stop():  agent Shutdown -> QEMU exits -> proxy, virtiofsd stopped -> dir removed
    destroy(): kill whatever the record names (any state, after any crash) -> dir removed

Every process is recorded in pod.json (pid + start time) the moment it exists, and the
network devices (sandbox/pod/network.py) before they are created, so that ``destroy`` can always
clean up, whichever step failed and whichever process was killed.
A boot that fails tears everything down, keeps the serial console log under
``<root>/logs/`` and names it in the error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.process import ProcessHandle
from hypervisor.qemu_args import Accelerator, NicConfig
from sandbox import store as state
from sandbox.errors import (
    AgentError,
    ConfigError,
    NotFoundError,
    SandboxError,
    StateError,
    TemplateError,
)
from sandbox.pod import agent_proxy, hostfs, network, template
from sandbox.pod.agent_client import ContainerClient

#: Guest path of the pod's virtio-fs share (container rootfs live below it).
GUEST_SHARE = "/run/pysandbox/shared"
SHARE_TAG = "pod"
DEFAULT_MEMORY_MIB = 512
DEFAULT_BOOT_TIMEOUT = 60.0
_PROCESS_NAMES = ("qemu", "virtiofsd", "proxy")


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
    """A pod VM as recorded under ``<root>/p/<digest>/pod.json``."""

    root: Path
    id: str
    record: dict[str, Any]

    # -- paths -------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.root / "p" / state.pod_dir_name(self.id)

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

    @property
    def status(self) -> str:
        return str(self.record.get("status", "unknown"))

    def process(self, name: str) -> ProcessHandle | None:
        return ProcessHandle.from_json(self.record.get("processes", {}).get(name))

    def client(self, timeout: float | None = None) -> ContainerClient:
        """A client of this pod's agent, through the pod's agent proxy.

        If the proxy died (killed, crashed) while the VM runs, a new one is started first;
        it resynchronises the serial channel, so the agent is reachable again.
        """
        if self.status == "running":
            self._ensure_proxy()
        if timeout is None:
            return ContainerClient(self.agent_address, pod_id=self.id)
        return ContainerClient(self.agent_address, timeout, pod_id=self.id)

    def _ensure_proxy(self) -> None:
        proxy, qemu = self.process("proxy"), self.process("qemu")
        if qemu is None or not qemu.alive() or (proxy is not None and proxy.alive()):
            return
        with state.locked(self.root, f"pod-{state.pod_dir_name(self.id)}"):
            self.record = state.read_json(self.dir / "pod.json")
            proxy = self.process("proxy")
            if proxy is None or not proxy.alive():
                self._remember("proxy", ProcessHandle.of(self._start_proxy(qemu.pid)))

    def save(self) -> None:
        state.write_json_atomic(self.dir / "pod.json", self.record)

    def _remember(self, name: str, ref: ProcessHandle) -> None:
        self.record.setdefault("processes", {})[name] = ref.to_json()
        self.save()

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, root: Path, pod_id: str) -> Pod:
        """The recorded pod ``pod_id``; NotFoundError when there is none."""
        state.validate_id(pod_id, "pod")
        pod = cls(root, pod_id, {})
        try:
            record = state.read_json(pod.dir / "pod.json")
        except FileNotFoundError:
            raise NotFoundError(f"pod {pod_id} does not exist") from None
        if record.get("id") != pod_id:
            raise StateError(f"pod directory {pod.dir} belongs to another pod")
        pod.record = record
        return pod

    @classmethod
    def list(cls, root: Path) -> list[Pod]:
        pods = []
        base = root / "p"
        for entry in sorted(base.iterdir()) if base.is_dir() else []:
            with contextlib.suppress(OSError, SandboxError):
                record = state.read_json(entry / "pod.json")
                pods.append(cls(root, str(record["id"]), record))
        return pods

    # -- boot --------------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        root: Path,
        pod_id: str,
        *,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        timeout: float | None = None,
        netns: Path | None = None,
        user_network: bool = False,
        hostname: str = "",
    ) -> Pod:
        """Boot a new pod VM and return once its agent is healthy and the share mounted.

        Network (docs/networking.md): with ``netns`` the interfaces of that network namespace
        are carried into the guest (tap + tc redirect, one virtio-net NIC each) and the agent
        gives the guest their MACs, addresses and routes; with ``user_network`` the guest gets
        QEMU user-mode networking (outbound NAT, 10.0.2.15/24). Neither: loopback only.
        ``hostname`` is the guest's (root UTS namespace) and, with user networking, goes into
        the hosts file written for containers.

        Raises StateError if the pod exists, ConfigError for a missing or invalid guest image
        or bad settings, AgentError/AgentTimeout if the agent is not reached (the error names
        the kept console log). On any failure nothing the boot started is left running.
        """
        from hypervisor import accel as accel_mod
        from hypervisor.errors import GuestImageError
        from hypervisor.guest_image import find_image

        state.validate_id(pod_id, "pod")
        if netns is not None and user_network:
            raise ConfigError("a pod gets either a network namespace or user networking, not both")
        if netns is not None:
            network.check_netns(netns)
        if not 128 <= memory_mib <= 65536:
            raise ConfigError(f"pod memory {memory_mib} MiB is outside 128..65536")
        try:
            image = find_image()
        except GuestImageError as exc:
            raise ConfigError(str(exc)) from exc
        chosen = accel_mod.detect()
        pod = cls(root, pod_id, {})
        state.ensure_dir(root / "p")
        try:
            pod.dir.mkdir(mode=0o700)
        except FileExistsError:
            raise StateError(f"pod {pod_id} already exists") from None
        pod.record = {
            "id": pod_id,
            "status": "booting",
            "created": time.time(),
            "accel": chosen.chosen,
            "memory_mib": memory_mib,
            "image": str(image.dir),
            "processes": {},
        }
        pod.shared_dir.mkdir(mode=0o711)
        pod.save()
        try:
            pod._start(
                image,
                chosen.chosen,
                memory_mib,
                timeout or boot_timeout(),
                netns=netns,
                user_network=user_network,
                hostname=hostname,
            )
        except BaseException as exc:
            kept = pod._keep_console_log()
            pod.destroy()
            if isinstance(exc, AgentError) and kept is not None:
                raise exc.amended(f"serial console log kept at {kept}") from exc
            raise
        return pod

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
    ) -> None:
        from hypervisor.virtiofsd import Virtiofsd

        # Bind mounts of container root filesystems made later must reach virtiofsd's
        # mount namespace: make the shared directory a shared mount first.
        hostfs.make_shared_mountpoint(self.shared_dir)
        fs = Virtiofsd(
            socket_path=self.dir / "virtiofsd.sock",
            shared_dir=self.shared_dir,
            log_path=self.dir / "virtiofsd.log",
        )
        fs.start()
        self._remember("virtiofsd", ProcessHandle.of(fs.pid))
        guest_network: network.NetworkConfig | None = None
        nics: tuple[NicConfig, ...] = ()
        tap_fds: tuple[int, ...] = ()
        if netns is not None:
            attached = network.attach(netns, self.record, self.save)  # recorded, then created
            guest_network, tap_fds = attached.config, attached.tap_fds
            nics = tuple(
                NicConfig(nic.mac, "tap", fd, nic.mtu)
                for nic, fd in zip(attached.config.interfaces, tap_fds, strict=True)
            )
            if hostname:
                guest_network = dataclasses.replace(guest_network, hostname=hostname)
        elif user_network:
            self.record["network"] = {"mode": "user"}
            self.save()
            guest_network = network.user_network_config(hostname)
            nics = (NicConfig(network.USER_MAC, "user"),)
        try:
            boot = "cold"
            if template.enabled():
                deadline = time.monotonic() + timeout
                if self._restore(image, accel_name, memory_mib, timeout, nics):
                    boot = "restored"
                else:
                    timeout = max(0.1, deadline - time.monotonic())  # one budget for the boot
            if boot == "cold":
                self._cold_start(image, accel_name, memory_mib, nics)
        finally:
            for fd in tap_fds:
                os.close(fd)  # QEMU holds the taps now; they vanish when it exits
        qemu = self.process("qemu")
        assert qemu is not None
        with self.client() as agent:
            agent.wait_healthy(timeout, alive=qemu.alive)
            if boot == "restored":
                # A clone of the template: its own randomness and the current time first.
                agent.restored(secrets.token_bytes(64), time.time_ns())
            agent.mount_share(SHARE_TAG, GUEST_SHARE)
            if guest_network is not None:
                files = agent.configure_network(guest_network)
                self.record["network"]["guest_files"] = {
                    "resolv_conf": files.resolv_conf,
                    "hosts": files.hosts,
                }
        self.record["boot"] = boot
        self.record["status"] = "running"
        self.save()

    def _cold_start(
        self, image: Any, accel_name: Accelerator, memory_mib: int, nics: tuple[NicConfig, ...]
    ) -> None:
        """Boot the VM from scratch (share and NICs on the command line) and let it run."""
        from hypervisor.qemu import QemuVM

        config = template.vm_config(
            image,
            accel_name,
            memory_mib,
            kernel_cmdline(),
            self.dir,
            name=f"pysandbox-{state.pod_dir_name(self.id)}",
            shares=((SHARE_TAG, self.dir / "virtiofsd.sock"),),
            nics=nics,
        )
        vm = QemuVM(config)
        vm.start()
        self._remember("qemu", ProcessHandle.of(vm.pid))
        self._remember("proxy", ProcessHandle.of(self._start_proxy(vm.pid)))
        vm.resume()

    def _restore(
        self,
        image: Any,
        accel_name: Accelerator,
        memory_mib: int,
        timeout: float,
        nics: tuple[NicConfig, ...],
    ) -> bool:
        """Start this pod's VM from the template for its machine (sandbox/pod/template.py).

        True once the restored VM runs with the share and ``nics`` hot-plugged (the caller
        then waits for the agent and sends ``Restored``). False if no template can be had or
        restoring fails: whatever this attempt started is stopped and forgotten and the
        caller cold boots; a state file QEMU could not load is discarded.
        """
        from hypervisor.errors import HypervisorError, HypervisorTimeout
        from hypervisor.qemu import QemuVM

        cmdline = kernel_cmdline()
        try:
            state_file = template.ensure(image, accel_name, memory_mib, cmdline, timeout)
            fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        except (TemplateError, OSError) as exc:
            self._note(f"no template, cold boot: {exc}")
            return False
        config = template.vm_config(
            image,
            accel_name,
            memory_mib,
            cmdline,
            self.dir,
            name=f"pysandbox-{state.pod_dir_name(self.id)}",
            incoming_fd=fd,
        )
        vm = QemuVM(config)
        loaded = False
        try:
            try:
                vm.start()
            finally:
                os.close(fd)
            self._remember("qemu", ProcessHandle.of(vm.pid))
            self._remember("proxy", ProcessHandle.of(self._start_proxy(vm.pid)))
            vm.wait_incoming(timeout)
            loaded = True
            started = time.monotonic()
            released = vm.release_zero_pages()  # loading touched all RAM; paused: safe now
            self._note(
                f"restored; {released >> 20} MiB of zero pages released"
                f" in {time.monotonic() - started:.3f}s"
            )
            vm.hotplug_share(SHARE_TAG, self.dir / "virtiofsd.sock")
            for index, nic in enumerate(nics):
                vm.hotplug_nic(nic, index)
            vm.resume()
        except (HypervisorError, AgentError, OSError) as exc:
            # Only a state QEMU could not load is the template's fault: discard it then.
            unloadable = isinstance(exc, HypervisorError) and not isinstance(exc, HypervisorTimeout)
            if unloadable and not loaded:
                template.discard(state_file)
                self._note(f"restoring {state_file} failed, template discarded: {exc}")
            else:
                self._note(f"restoring {state_file} failed: {exc}")
            proxy = self.process("proxy")
            if proxy is not None:
                proxy.terminate(timeout=2.0)
            vm.kill()  # also removes its sockets and pid file
            for name in ("proxy", "qemu"):
                self.record["processes"].pop(name, None)
            self.save()
            return False
        return True

    def _note(self, text: str) -> None:
        """Append a line to the pod's boot notes (``boot.log`` in its directory)."""
        with contextlib.suppress(OSError), open(self.dir / "boot.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def _start_proxy(self, vm_pid: int) -> int:
        return agent_proxy.start(self.dir, vm_pid)

    def _keep_console_log(self) -> Path | None:
        if not self.console_log.exists():
            return None
        logs = state.ensure_dir(self.root / "logs")
        kept = logs / f"{self.id}-console.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(self.console_log, kept)
            return kept
        return None

    # -- stop --------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Power the VM off through its agent, then clean up everything (as :meth:`destroy`)."""
        qemu = self.process("qemu")
        if qemu is not None and qemu.alive() and self.status == "running":
            # No proxy restart here: stop may run under the pod lock; a dead proxy just
            # means the hard stop below.
            with (
                contextlib.suppress(AgentError),
                ContainerClient(self.agent_address, 5.0) as agent,
            ):
                agent.shutdown()
                qemu.wait(timeout)
        self.destroy()

    def destroy(self) -> None:
        """Stop every recorded process (QEMU first), remove sockets and the pod directory.

        Works in any state and after any crash; idempotent.
        """
        for name in _PROCESS_NAMES:
            ref = self.process(name)
            if ref is not None:
                ref.terminate(timeout=2.0)
        # After QEMU is gone (its taps with it): the qdiscs and filters in the pod netns.
        network.detach(self.record.get("network"))
        hostfs.unmount_tree(self.dir)
        left = hostfs.mounts_below(self.dir)
        if left:
            # Never rmtree across a mount: it would delete a user's rootfs or volume.
            raise StateError(f"cannot remove pod {self.id}: still mounted: {', '.join(left)}")
        shutil.rmtree(self.dir, ignore_errors=True)


def kernel_cmdline() -> str:
    """The guest kernel command line (tuned for fast boots under TCG; see host-facts)."""
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
            "mitigations=off",
            "audit=0",
            "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list",
            # No ACPI interrupt routing: probing each virtio-pci device otherwise interprets
            # the PCI link AML under TCG, ~0.1 s per device (docs/performance.md).
            "acpi=noirq",
        ]
    )
