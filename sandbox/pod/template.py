"""Template VMs: boot a pod VM once, save it, start later pods by restoring the saved state.

Under TCG most of a pod's cold boot is the guest starting Python and grpcio (docs/performance.md);
a restored VM skips all of it. A template is a VM with exactly a pod's command line minus what
is per pod — the virtio-fs share (QEMU 7.2 cannot save a VM with vhost-user-fs attached) and
network cards — with its RAM in a shared memfd so that virtio-fs can be hot-plugged after the
restore. It is saved (QMP ``migrate`` to a file) as soon as its agent answers Health.

A pod restored from it (:meth:`sandbox.pod.lifecycle.Pod.boot`): QEMU with the same command line
plus ``-incoming fd:N`` loads the state paused; the share is hot-plugged; the guest continues; the
agent is told it was restored (``Restored``: CRNG reseeded from host entropy, clock set).

Templates live in :func:`template_dir` under a key that covers everything the saved state
depends on (QEMU binary, guest image, machine, memory, kernel command line, accelerator). A
template is built under a lock, written to a temporary directory and renamed into place, so
concurrent boots build it once and never see a partial file. ``PYSANDBOX_TEMPLATES=0``
disables templates (every pod cold boots).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.process import ProcessHandle
from hypervisor.qemu_args import Accelerator, NicConfig, VMConfig, build_argv
from sandbox.errors import AgentError, TemplateError
from sandbox.pod import host_cgroup

if TYPE_CHECKING:
    from sandbox.pod.drivers import Drivers

DEFAULT_TEMPLATE_DIR = Path("/var/lib/pysandbox/templates")
STATE_FILE = "state"
META_FILE = "meta.json"
#: Templates kept (one per memory size in use, typically); the least recently used go first.
KEEP = 4
SAVE_TIMEOUT = 120.0
#: Placeholder directory for per-VM paths when computing a key (they do not reach the state).
_KEY_DIR = Path("/pysandbox-template")


def enabled() -> bool:
    """False when ``PYSANDBOX_TEMPLATES`` is ``0``/``no``/``off``."""
    return os.environ.get("PYSANDBOX_TEMPLATES", "1").lower() not in ("0", "no", "off", "false")


def template_dir() -> Path:
    """``$PYSANDBOX_TEMPLATE_DIR`` or :data:`DEFAULT_TEMPLATE_DIR`."""
    return Path(os.environ.get("PYSANDBOX_TEMPLATE_DIR") or DEFAULT_TEMPLATE_DIR)


def vm_config(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    directory: Path,
    *,
    name: str = "pysandbox-template",
    incoming_fd: int | None = None,
    shares: tuple[tuple[str, Path], ...] = (),
    nics: tuple[NicConfig, ...] = (),
) -> VMConfig:
    """The machine of a pod VM (paths in ``directory``): of a template and every pod
    restored from it (no ``shares`` or ``nics``: they are hot-plugged), and of a pod booted
    cold (with them on the command line).

    One function serves all of them so that their machines cannot differ.
    """
    return VMConfig(
        name=name,
        kernel=image.kernel,
        initrd=image.initrd,
        rootfs=image.rootfs,
        cmdline=cmdline,
        memory_mib=memory_mib,
        accel=accel,
        qmp_socket=directory / "qmp.sock",
        agent_socket=directory / "agent-serial.sock",
        console_log=directory / "console.log",
        pidfile=directory / "qemu.pid",
        shares=shares,
        nics=nics,
        shared_memory=True,
        incoming_fd=incoming_fd,
    )


def key(image: Any, accel: Accelerator, memory_mib: int, cmdline: str, qemu: Path) -> str:
    """Hex digest naming the template for these inputs.

    Covers the QEMU command line (per-VM paths replaced by one placeholder), the QEMU binary
    (path, size, mtime), and the guest image (its manifest, which records every input's hash).
    """
    config = vm_config(image, accel, memory_mib, cmdline, _KEY_DIR)
    stat = qemu.stat()
    digest = hashlib.sha256()
    for part in (
        *build_argv(config, qemu),
        f"qemu {stat.st_size} {stat.st_mtime_ns}",
        json.dumps(image.manifest, sort_keys=True),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    timeout: float,
    drivers: Drivers | None = None,
) -> Path:
    """The state file of the template for these inputs, built first if there is none.

    The template VM and its agent proxy come from ``drivers`` (default: those of
    :func:`sandbox.pod.drivers.current`). TemplateError if building fails (nothing it
    started is left running; the template VM's console log is kept next to the templates
    and named in the error).
    """
    from hypervisor.qemu import find_qemu
    from sandbox.pod.drivers import current

    qemu = find_qemu()
    name = key(image, accel, memory_mib, cmdline, qemu)
    base = template_dir()
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = base / name
        state_file = final / STATE_FILE
        with _locked(base / f"{name}.lock"):
            if not state_file.exists():
                # Shared by every later pod: not charged to the host cgroup of this one.
                with host_cgroup.outside():
                    _build(
                        image,
                        accel,
                        memory_mib,
                        cmdline,
                        timeout,
                        base,
                        final,
                        drivers or current(),
                    )
            os.utime(final)  # least recently used goes first in _prune
        _prune(base, keep=KEEP)
    except OSError as exc:
        raise TemplateError(f"template directory {base}: {exc.strerror or exc}") from exc
    return state_file


def discard(state_file: Path) -> None:
    """Remove a template whose state could not be restored (it is rebuilt on next use)."""
    with contextlib.suppress(OSError):
        shutil.rmtree(state_file.parent)


def _build(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    timeout: float,
    base: Path,
    final: Path,
    drivers: Drivers,
) -> None:
    from hypervisor.errors import HypervisorError
    from sandbox.pod.agent_client import AgentClient

    # The VM's sockets go in a short directory (unix socket paths are limited to 107 bytes);
    # the state is written next to its final place and renamed there once complete.
    work = Path(tempfile.mkdtemp(prefix="psb-template-", dir="/tmp"))
    staging = Path(tempfile.mkdtemp(prefix=f".build-{final.name[:12]}-", dir=base))
    vm = drivers.hypervisor(vm_config(image, accel, memory_mib, cmdline, work))
    proxy: ProcessHandle | None = None
    try:
        vm.start()
        proxy = drivers.start_proxy(work, vm.pid)
        vm.resume()
        with AgentClient(f"unix:{work / 'agent.sock'}") as agent:
            agent.wait_healthy(timeout, alive=lambda: bool(vm.pids()))
        fd = os.open(staging / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            vm.save_state(fd, SAVE_TIMEOUT)
            os.fsync(fd)
        finally:
            os.close(fd)
        meta = {"created": time.time(), "memory_mib": memory_mib, "image": str(image.dir)}
        (staging / META_FILE).write_text(json.dumps(meta) + "\n")
        os.rename(staging, final)
    except (HypervisorError, AgentError, OSError) as exc:
        kept = base / f"failed-{final.name}-console.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(work / "console.log", kept)
        raise TemplateError(
            f"building the template VM failed: {exc}; its console log is kept at {kept}"
        ) from exc
    finally:
        with contextlib.suppress(HypervisorError):
            vm.kill()
        if proxy is not None:
            drivers.terminate("proxy", proxy)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _prune(base: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used templates (and stale build dirs)."""
    templates = sorted(
        (p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for stale in base.glob(".build-*"):  # left by a builder that was killed
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    for old in templates[keep:]:
        with _locked(base / f"{old.name}.lock"):
            shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            (base / f"{old.name}.lock").unlink()
