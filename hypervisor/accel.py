"""Choose the accelerator: KVM when it can boot a normal guest, TCG otherwise.

Rules (read from files only; nothing is booted, nothing can hang):

1. ``$PYSANDBOX_ACCEL`` = ``kvm`` | ``tcg`` forces the choice; ``auto`` or unset detects;
   any other value raises :class:`~hypervisor.errors.AccelError`.
2. KVM is usable when ``/dev/kvm`` exists, ``/proc/cpuinfo`` has the ``vmx`` or ``svm``
   flag, and ``/sys/module/kvm_pvm`` is absent. A PVM host (kvm_pvm loaded) exposes
   ``/dev/kvm`` but only boots PVM-enabled guest kernels: a normal kernel hangs at
   "Booting from ROM" with a host core spinning, so it counts as unusable.
3. Otherwise TCG, with the reason recorded in :class:`AccelReport`.

Every path is resolved under ``sysroot`` so tests can use a fake tree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hypervisor.errors import AccelError
from hypervisor.qemu_args import Accelerator

ENV_VAR = "PYSANDBOX_ACCEL"
_CHOICES = ("kvm", "tcg", "auto")


@dataclass(frozen=True)
class AccelReport:
    """Result of :func:`detect`.

    ``kvm_usable``: KVM could boot a normal guest here. ``chosen``: the accelerator to use
    (the override wins even against detection). ``reason``: one lowercase line explaining
    the choice, for ``pysandbox check`` and logs.
    """

    kvm_usable: bool
    chosen: Accelerator
    reason: str
    forced: bool = False


def _under(sysroot: Path, path: str) -> Path:
    return sysroot / path.lstrip("/")


def _cpu_flags(sysroot: Path) -> set[str]:
    try:
        text = _under(sysroot, "/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def kvm_status(sysroot: Path = Path("/")) -> tuple[bool, str]:
    """Whether KVM can boot a normal guest under ``sysroot``, and why (rule 2)."""
    if not _under(sysroot, "/dev/kvm").exists():
        return False, "/dev/kvm does not exist"
    if _under(sysroot, "/sys/module/kvm_pvm").exists():
        return False, "/dev/kvm is PVM (kvm_pvm loaded), which cannot boot normal guest kernels"
    flags = _cpu_flags(sysroot)
    if not flags & {"vmx", "svm"}:
        return False, "cpu has no vmx or svm flag (no hardware virtualization exposed)"
    flag = "vmx" if "vmx" in flags else "svm"
    return True, f"/dev/kvm present with {flag}"


def requested(environ: Mapping[str, str] | None = None) -> str:
    """The override from ``$PYSANDBOX_ACCEL``: ``kvm``, ``tcg`` or ``auto``.

    Raises AccelError for any other value.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise AccelError(f"{ENV_VAR}={env.get(ENV_VAR)!r} is invalid; set it to kvm, tcg or auto")
    return value


def detect(sysroot: Path = Path("/"), environ: Mapping[str, str] | None = None) -> AccelReport:
    """Choose the accelerator for this host (see the module docstring for the rules)."""
    choice = requested(environ)
    usable, why = kvm_status(sysroot)
    if choice == "kvm":
        return AccelReport(usable, "kvm", f"forced by {ENV_VAR}=kvm ({why})", forced=True)
    if choice == "tcg":
        return AccelReport(usable, "tcg", f"forced by {ENV_VAR}=tcg ({why})", forced=True)
    if usable:
        return AccelReport(True, "kvm", why)
    return AccelReport(False, "tcg", f"tcg because {why}")


def has_vhost_vsock(sysroot: Path = Path("/")) -> bool:
    """True when ``/dev/vhost-vsock`` exists (needed by the vsock agent transport)."""
    return _under(sysroot, "/dev/vhost-vsock").exists()
