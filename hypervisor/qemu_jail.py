"""The jailed launch of one QEMU: what it may see, who it runs as, the fds it gets.

:func:`prepare` turns a :class:`~hypervisor.qemu_args.VMConfig` into a :class:`JailedLaunch`:

* an id leased for this VM (:mod:`hypervisor.jail_ids`), or the configured shared user;
* every path QEMU would open in the pod's directory opened here, by root, and passed as an
  fd (``VMConfig.channel_fds``): the QMP and agent sockets bound and listening at their usual
  paths (mode 0600, so only root connects), the console log, a socket connected to each
  share's virtiofsd. The tap fds and the template state (``incoming_fd``) already are fds.
  QEMU's pid file is dropped (the pid is recorded from the spawn);
* the jail's root (:mod:`hypervisor.jail`): ``/usr`` and the device nodes of
  :func:`hypervisor.jail.default_binds`, the guest kernel, initrd and root image (read-only),
  and ``/dev/kvm`` under KVM (QEMU 7.2 cannot take an open ``/dev/kvm`` fd; it stays
  reachable through its group, kept as a supplementary group). Nothing of the pod's directory,
  the templates or the rest of the host.

The machine, and so the template key (sandbox/pod/template.py), is the same jailed or not:
only how the chardevs reach their files changes, which a saved state does not record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor import jail_ids
from hypervisor.errors import JailError, VirtiofsdError
from hypervisor.jail import Bind, JailSpec, default_binds
from hypervisor.jail_ids import Identity, Settings
from hypervisor.process import remove_quietly
from hypervisor.qemu_args import ChannelFds, VMConfig

KVM_DEVICE = Path("/dev/kvm")


@dataclass
class JailedLaunch:
    """One prepared launch: the fd form of the config, the jail, the fds to close after."""

    config: VMConfig
    spec: JailSpec
    owner: Path
    opened: list[int] = field(default_factory=list)

    @property
    def identity(self) -> Identity:
        return self.spec.identity

    def close_fds(self) -> None:
        """Close this process's copies of the passed fds (QEMU holds its own). Idempotent."""
        while self.opened:
            with contextlib.suppress(OSError):
                os.close(self.opened.pop())

    def abandon(self) -> None:
        """Undo :func:`prepare` for a launch that did not happen: fds closed, sockets
        removed, id released."""
        self.close_fds()
        remove_quietly(*self.config.sockets())
        jail_ids.release(self.identity, self.owner)


def binds_for(config: VMConfig, binary: Path) -> tuple[Bind, ...]:
    """The files and directories of the jail's root for ``config`` (module docstring)."""
    binds = default_binds(binary)
    for path in (config.kernel, config.initrd, config.rootfs):
        if path is None:
            continue
        resolved = path.resolve()
        covered = any(b.source.is_dir() and resolved.is_relative_to(b.source) for b in binds)
        if not covered:
            binds.append(Bind(path))
    if config.accel == "kvm":
        binds.append(Bind(KVM_DEVICE, writable=True))
    return tuple(binds)


def _unix_socket(path: Path, setup: Callable[[socket.socket], None]) -> int:
    """A unix stream socket after ``setup`` (bind+listen or connect), as a raw fd; closed
    again on failure, an OSError naming ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        setup(sock)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def _listen(path: Path) -> int:
    def bind(sock: socket.socket) -> None:
        remove_quietly(path)  # stale from a crashed run
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)

    return _unix_socket(path, bind)


def _connect(path: Path) -> int:
    return _unix_socket(path, lambda sock: sock.connect(str(path)))


def connect_share(path: Path) -> int:
    """A socket connected to the virtiofsd listening on ``path`` (the caller closes it);
    OSError if nothing listens there."""
    return _connect(path)


def prepare(config: VMConfig, binary: Path, settings: Settings) -> JailedLaunch:
    """Lease an id and open what QEMU needs (module docstring). JailError if no id is free
    or a file cannot be opened, VirtiofsdError if a share's virtiofsd does not answer on its
    socket; nothing is left behind then."""
    owner = config.qmp_socket.parent
    identity = jail_ids.allocate(settings, owner)
    groups: tuple[int, ...] = ()
    if config.accel == "kvm":
        with contextlib.suppress(OSError):
            groups = (KVM_DEVICE.stat().st_gid,)
    spec = JailSpec(
        identity=Identity(identity.uid, identity.gid, groups),
        binds=binds_for(config, binary),
        host_network=config.host_network or any(nic.backend == "user" for nic in config.nics),
    )
    launch = JailedLaunch(config=config, spec=spec, owner=owner)
    try:
        qmp = _listen(config.qmp_socket)
        launch.opened.append(qmp)
        agent = None
        if config.agent_socket is not None:
            agent = _listen(config.agent_socket)
            launch.opened.append(agent)
        # O_APPEND: the pod's agent proxy may cut the log (sandbox/pod/console_bound.py).
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        console = os.open(config.console_log, flags, 0o600)
        launch.opened.append(console)
        outputs = []
        for _name, path in config.output_ports:
            outputs.append(_listen(path))
            launch.opened.append(outputs[-1])
        shares = []
        for tag, path in config.shares:
            try:
                shares.append(_connect(path))
            except OSError as exc:
                # Not the jail's settings: the share's virtiofsd went away since it started.
                launch.abandon()
                raise VirtiofsdError(
                    f"virtiofsd of share {tag} of vm {config.name} does not answer on {path} "
                    f"({exc.strerror or exc}): it exited or was killed"
                ) from exc
            launch.opened.append(shares[-1])
    except OSError as exc:
        launch.abandon()
        raise JailError(
            f"cannot prepare the jail of vm {config.name}: {exc.strerror or exc}: "
            f"{exc.filename or ''}".rstrip(": ")
        ) from exc
    launch.config = dataclasses.replace(
        config,
        channel_fds=ChannelFds(qmp, console, agent, tuple(shares), tuple(outputs)),
        pidfile=None,
    )
    return launch
