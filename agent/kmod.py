"""Loading kernel modules on demand in the guest.

Modules, ``modules.dep`` and ``modules.alias`` live under /lib/modules/<release>/ in the
read-only root. The agent loads what it needs itself (:func:`ensure`: finit_module(2) after
the dependencies, in the order modules.dep gives). What the *kernel* asks for on behalf of a
container (a privileged one creating a bridge: ``request_module("rtnl-link-bridge")``) goes to
the kernel's usermode helper, which :func:`install_kernel_helper` points at the image's
busybox modprobe (it resolves aliases through modules.alias).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

_SYS_FINIT_MODULE = 313  # x86_64
_EEXIST = 17
_lock = threading.Lock()


#: The guest image's modprobe (guest-image/build.py MODPROBE_HELPER).
MODPROBE = "/usr/lib/pysandbox/bin/modprobe"


def install_kernel_helper(sysctl: str = "/proc/sys/kernel/modprobe") -> None:
    """Make :data:`MODPROBE` the kernel's module loader (modprobe path, kernel/kmod.c).

    Without it the kernel runs /sbin/modprobe, which the image lacks, and a container's
    ``ip link add type bridge`` or ``brctl addbr`` fails ("Package not installed"). Does
    nothing when the image has no helper (an image built before it existed).
    """
    if os.path.exists(MODPROBE):
        with open(sysctl, "w", encoding="ascii") as knob:
            knob.write(MODPROBE)


def _loaded() -> set[str]:
    with open("/proc/modules", encoding="ascii") as modules:
        return {line.split()[0] for line in modules}


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def _dependencies(base: str) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    with open(f"{base}/modules.dep", encoding="utf-8") as depfile:
        for line in depfile:
            target, _, rest = line.partition(":")
            deps[_module_name(target)] = [target, *rest.split()]
    return deps


def ensure(name: str) -> None:
    """Load module ``name`` and its dependencies unless built in or loaded already.

    Raises OSError naming the module when it cannot be found or loaded.
    """
    name = name.replace("-", "_")
    with _lock:
        if name in _loaded() or os.path.isdir(f"/sys/module/{name}"):
            return
        base = f"/lib/modules/{platform.release()}"
        deps = _dependencies(base)
        if name not in deps:
            raise OSError(f"kernel module {name} not found in {base}")
        path, *requires = deps[name]
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        for rel in [*reversed(requires), path]:
            if _module_name(rel) in _loaded():
                continue
            fd = os.open(f"{base}/{rel}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.syscall(_SYS_FINIT_MODULE, fd, b"", 0) != 0:
                    err = ctypes.get_errno()
                    if err != _EEXIST:
                        raise OSError(err, f"loading kernel module {rel}: {os.strerror(err)}")
            finally:
                os.close(fd)
