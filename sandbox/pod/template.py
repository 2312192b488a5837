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

Garbage collection (:func:`collect`, after every use): the templates are kept most recently
used first while they number at most :data:`KEEP` and their disk use stays within
``$PYSANDBOX_TEMPLATE_MAX_MIB`` (default :data:`DEFAULT_MAX_MIB`); the rest are removed, the
one just used never. Eviction never makes a restore fail: a pod gets its template as an open
file (:func:`acquire`, opened under the template's lock), which stays readable after its
directory is removed; a template whose lock someone holds (being built or opened) is skipped;
the lock file is removed with the template while it is held, and whoever waited on it takes
the new one (:func:`_locked` checks that the file it locked is still the one at the path).
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentapi import stream_wire
from hypervisor.process import ProcessHandle
from hypervisor.qemu_args import DEFAULT_CPUS, Accelerator, NicConfig, VMConfig, build_argv
from sandbox.errors import AgentError, ConfigError, TemplateError
from sandbox.pod import host_cgroup

if TYPE_CHECKING:
    from sandbox.pod.drivers import Drivers

DEFAULT_TEMPLATE_DIR = Path("/var/lib/pysandbox/templates")
STATE_FILE = "state"
#: The zero-page runs of the state once restored (hypervisor.zeropages.ZeroMap).
ZERO_MAP_FILE = "zero-pages.json"
META_FILE = "meta.json"
#: Most templates kept (one per memory size in use, typically); least recently used go first.
KEEP = 8
#: Default bound of the templates' disk use, MiB ($PYSANDBOX_TEMPLATE_MAX_MIB). A 512 MiB
#: pod's template takes ~100 MiB, a 4 GiB one's ~190 MiB (most of the RAM is zero pages).
DEFAULT_MAX_MIB = 2048
#: Build failures' console logs kept next to the templates (the newest).
KEEP_FAILED_LOGS = 4
SAVE_TIMEOUT = 120.0
#: Seconds the template VM's guest gets to drop its caches and zero its free memory.
PREPARE_TIMEOUT = 120.0
#: How a template is made beyond the VM's command line and image (the guest prepared by
#: ``PrepareTemplate`` before the save since 2; the root image on virtio-pmem since 3, which
#: the command line in the key shows too): part of :func:`key`, so a state made the old way
#: is never reused.
RECIPE = 3
#: Placeholder directory for per-VM paths when computing a key (they do not reach the state).
_KEY_DIR = Path("/pysandbox-template")


def enabled() -> bool:
    """False when ``PYSANDBOX_TEMPLATES`` is ``0``/``no``/``off``."""
    return os.environ.get("PYSANDBOX_TEMPLATES", "1").lower() not in ("0", "no", "off", "false")


def template_dir() -> Path:
    """``$PYSANDBOX_TEMPLATE_DIR`` or :data:`DEFAULT_TEMPLATE_DIR`."""
    return Path(os.environ.get("PYSANDBOX_TEMPLATE_DIR") or DEFAULT_TEMPLATE_DIR)


def max_bytes() -> int:
    """The templates' disk budget in bytes: ``$PYSANDBOX_TEMPLATE_MAX_MIB`` (a whole number
    of MiB, 0 keeps only the template in use) or :data:`DEFAULT_MAX_MIB`. ConfigError for
    anything else."""
    raw = os.environ.get("PYSANDBOX_TEMPLATE_MAX_MIB", "").strip()
    if not raw:
        return DEFAULT_MAX_MIB << 20
    if not raw.isdigit() or len(raw) > 9:
        raise ConfigError(
            f"PYSANDBOX_TEMPLATE_MAX_MIB={raw!r}: expected a whole number of MiB, e.g. 2048"
        )
    return int(raw) << 20


@dataclass
class Template:
    """A template's saved state, open for reading (:func:`acquire`): ``fd`` reads the whole
    state whatever happens to ``state_file`` meanwhile (evicted, discarded). Close it once
    QEMU has its copy."""

    state_file: Path
    fd: int
    #: (st_dev, st_ino) of the template's directory when it was opened.
    identity: tuple[int, int]

    def close(self) -> None:
        """Close :attr:`fd` (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
    host_network: bool = False,
    cpus: int = DEFAULT_CPUS,
) -> VMConfig:
    """The machine of a pod VM (paths in ``directory``): of a template and every pod
    restored from it (no ``shares`` or ``nics``: they are hot-plugged), and of a pod booted
    cold (with them on the command line). ``host_network``: a user-mode NIC will be
    hot-plugged (a jailed QEMU then keeps the host's network namespace). ``cpus``: vCPUs.

    One function serves all of them so that their machines cannot differ.
    """
    return VMConfig(
        name=name,
        kernel=image.kernel,
        initrd=image.initrd,
        rootfs=image.rootfs,
        rootfs_size=image.rootfs_size,
        cmdline=cmdline,
        memory_mib=memory_mib,
        cpus=cpus,
        accel=accel,
        qmp_socket=directory / "qmp.sock",
        agent_socket=directory / "agent-serial.sock",
        output_ports=tuple(
            (stream_wire.port_name(n), directory / f"stream-{n}.sock")
            for n in range(stream_wire.PORT_COUNT)
        ),
        console_log=directory / "console.log",
        pidfile=directory / "qemu.pid",
        shares=shares,
        nics=nics,
        shared_memory=True,
        incoming_fd=incoming_fd,
        host_network=host_network,
    )


def key(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    qemu: Path,
    *,
    cpus: int = DEFAULT_CPUS,
) -> str:
    """Hex digest naming the template for these inputs (``cpus``: the VM's vCPUs).

    Covers the QEMU command line (per-VM paths replaced by one placeholder), the QEMU binary
    (path, size, mtime), the guest image (its manifest, which records every input's hash)
    and how the template is made (:data:`RECIPE`).
    """
    config = vm_config(image, accel, memory_mib, cmdline, _KEY_DIR, cpus=cpus)
    stat = qemu.stat()
    digest = hashlib.sha256()
    for part in (
        *build_argv(config, qemu),
        f"qemu {stat.st_size} {stat.st_mtime_ns}",
        json.dumps(image.manifest, sort_keys=True),
        f"recipe {RECIPE}",
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock file ``path`` (made if missing) for the block; yields True. The file
    may be removed by whoever holds it (an eviction): a lock taken on a file that is no
    longer the one at ``path`` is dropped and taken again on the current one. Without
    ``wait``, yields False at once when someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue  # removed while we waited: lock the new one
            held = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                continue
            yield True
            return
        finally:
            os.close(fd)  # releases the lock


def ensure(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    timeout: float,
    drivers: Drivers | None = None,
    *,
    cpus: int = DEFAULT_CPUS,
) -> Path:
    """The state file of the template for these inputs, built first if there is none (see
    :func:`acquire`; for a caller that only wants it to exist: a restore must use
    :func:`acquire`, whose open file eviction cannot take away)."""
    found = acquire(image, accel, memory_mib, cmdline, timeout, drivers, cpus=cpus)
    found.close()
    return found.state_file


def acquire(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    timeout: float,
    drivers: Drivers | None = None,
    *,
    cpus: int = DEFAULT_CPUS,
) -> Template:
    """The template for these inputs (``cpus``: the VM's vCPUs), open (:class:`Template`),
    built first if there is none; then the templates are collected (:func:`collect`), this
    one kept.

    The template VM and its agent proxy come from ``drivers`` (default: those of
    :func:`sandbox.pod.drivers.current`). TemplateError if building fails (nothing it
    started is left running; the template VM's console log is kept next to the templates
    and named in the error) or the directory is unusable; ConfigError for a bad
    ``$PYSANDBOX_TEMPLATE_MAX_MIB``.
    """
    from hypervisor.qemu import find_qemu
    from sandbox.pod.drivers import current

    budget = max_bytes()
    qemu = find_qemu()
    name = key(image, accel, memory_mib, cmdline, qemu, cpus=cpus)
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
                        cpus,
                    )
            fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
            found = os.stat(final)
            os.utime(final)  # least recently used goes first in collect
        collect(base, keep=KEEP, max_bytes=budget, protect=name)
    except OSError as exc:
        raise TemplateError(f"template directory {base}: {exc.strerror or exc}") from exc
    return Template(state_file, fd, (found.st_dev, found.st_ino))


def discard(found: Template) -> None:
    """Remove a template whose state could not be restored (it is rebuilt on next use),
    unless it was replaced meanwhile (another pod rebuilt it)."""
    final = found.state_file.parent
    with contextlib.suppress(OSError), _locked(final.with_name(f"{final.name}.lock")):
        now = os.stat(final)
        if (now.st_dev, now.st_ino) == found.identity:
            shutil.rmtree(final)


def _build(
    image: Any,
    accel: Accelerator,
    memory_mib: int,
    cmdline: str,
    timeout: float,
    base: Path,
    final: Path,
    drivers: Drivers,
    cpus: int,
) -> None:
    from hypervisor.errors import HypervisorError, JailError
    from sandbox.pod.agent_client import AgentClient

    # The VM's sockets go in a short directory (unix socket paths are limited to 107 bytes);
    # the state is written next to its final place and renamed there once complete.
    work = Path(tempfile.mkdtemp(prefix="psb-template-", dir="/tmp"))
    staging = Path(tempfile.mkdtemp(prefix=f".build-{final.name[:12]}-", dir=base))
    vm = drivers.hypervisor(vm_config(image, accel, memory_mib, cmdline, work, cpus=cpus))
    proxy: ProcessHandle | None = None
    try:
        vm.start()
        proxy = drivers.start_proxy(work, vm.pid)
        vm.resume()
        started = proxy

        def casualty() -> str | None:
            if started.alive():
                return None
            return f"the agent proxy (pid {started.pid}) of the template VM died"

        with AgentClient(f"unix:{work / 'agent.sock'}", watch=casualty) as agent:
            agent.wait_healthy(timeout, alive=lambda: bool(vm.pids()))
            # Fewer non-zero pages in the state: less host memory in every restored pod.
            agent.prepare_template(PREPARE_TIMEOUT)
        fd = os.open(staging / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            vm.save_state(fd, SAVE_TIMEOUT)
            os.fsync(fd)
        finally:
            os.close(fd)
        meta = {
            "created": time.time(),
            "memory_mib": memory_mib,
            "cpus": cpus,
            "image": str(image.dir),
        }
        (staging / META_FILE).write_text(json.dumps(meta) + "\n")
        os.rename(staging, final)
    except JailError:
        raise  # the host's jail settings, not the template: the pod cannot start either
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


def disk_use(directory: Path) -> int:
    """Bytes of disk the files directly in ``directory`` take (allocated blocks)."""
    total = 0
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def collect(base: Path, keep: int, max_bytes: int, protect: str = "") -> list[str]:
    """Remove templates of ``base`` so that at most ``keep`` remain, taking at most
    ``max_bytes`` together, the most recently used kept first; the template named
    ``protect`` (just used) is kept whatever its size. Also removes build directories a
    killed builder left (older than an hour) and all but the :data:`KEEP_FAILED_LOGS`
    newest console logs of failed builds. The names of the removed templates.

    Safe while other processes build, restore from or collect the same templates: one whose
    lock is held is skipped, one used since it was listed (newer mtime) is kept, and a pod
    restoring from a removed one reads it through its open file (:func:`acquire`).
    """
    found = []
    for entry in base.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        with contextlib.suppress(OSError):
            found.append((entry.stat().st_mtime_ns, entry, disk_use(entry)))
    found.sort(key=lambda item: (item[1].name != protect, -item[0]))
    removed: list[str] = []
    kept = used = 0
    for mtime, directory, size in found:
        if directory.name == protect or (kept < keep and used + size <= max_bytes):
            kept += 1
            used += size
            continue
        if _evict(base, directory, mtime):
            removed.append(directory.name)
    for lock in base.glob("*.lock"):  # of templates discarded or never built
        if not (base / lock.name.removesuffix(".lock")).exists():
            _evict(base, base / lock.name.removesuffix(".lock"), None)
    now = time.time()
    for stale in base.glob(".build-*"):  # left by a builder that was killed
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    logs = []
    for log in base.glob("failed-*-console.log"):
        with contextlib.suppress(OSError):
            logs.append((log.stat().st_mtime_ns, log))
    for _mtime, log in sorted(logs, reverse=True)[KEEP_FAILED_LOGS:]:
        with contextlib.suppress(OSError):
            log.unlink()
    return removed


def _evict(base: Path, directory: Path, mtime: int | None) -> bool:
    """Remove one template unless its lock is held or it was used after ``mtime`` (None:
    only if there is no template, for a lock file left alone); its lock file goes with it,
    removed while held (waiters then lock the next one)."""
    lock = base / f"{directory.name}.lock"
    with _locked(lock, wait=False) as held:
        if not held:
            return False
        try:
            if directory.stat().st_mtime_ns != mtime:
                return False
        except FileNotFoundError:
            pass  # nothing to keep
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock.unlink()
        return True
