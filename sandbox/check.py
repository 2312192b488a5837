"""``pysandbox check``: can this host run sandboxes, and if not, what fixes it.

Each check yields a line with a verdict and, when something is missing, the command that
fixes it. The report is "ok" when every *required* check passes; informational ones (such as
vhost-vsock, for which virtio-serial is a full substitute) never fail it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor import accel
from hypervisor.errors import GuestImageError, HypervisorError
from hypervisor.guest_image import find_image, validate


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    #: A non-required check that failed on purpose (an opt-out): rendered as ``warn``.
    warning: bool = False


@dataclass
class Report:
    """All checks; ``ok`` when every required check passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def render(self) -> str:
        lines = []
        for check in self.checks:
            mark = "ok" if check.ok else ("FAIL" if check.required else "info")
            if check.warning and not check.ok:
                mark = "warn"
            lines.append(f"[{mark:>4}] {check.name}: {check.detail}")
            if check.fix and not check.ok:
                lines.append(f"       fix: {check.fix}")
        verdict = "this host can run pysandbox" if self.ok else "this host cannot run pysandbox"
        lines.append(verdict)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "detail": c.detail,
                    "fix": c.fix,
                    "required": c.required,
                }
                for c in self.checks
            ],
        }


def _qemu() -> Check:
    from hypervisor.qemu import find_qemu

    try:
        binary = find_qemu()
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()
        version = out[0] if out else "unknown version"
    except (HypervisorError, OSError, subprocess.TimeoutExpired) as exc:
        return Check("qemu", False, str(exc), "apt-get install qemu-system-x86")
    return Check("qemu", True, f"{binary} ({version})")


def _virtiofsd() -> Check:
    from hypervisor.virtiofsd import find_virtiofsd

    try:
        return Check("virtiofsd", True, str(find_virtiofsd()))
    except HypervisorError as exc:
        return Check("virtiofsd", False, str(exc), "apt-get install qemu-system-common")


def _jail() -> Check:
    """The VMM jail: its settings, and a jailed ``qemu --version`` as proof it can be set up."""
    import tempfile

    from hypervisor import jail, jail_ids
    from hypervisor.qemu import find_qemu

    name = "vmm jail"
    try:
        settings = jail_ids.settings()
    except HypervisorError as exc:
        return Check(name, False, str(exc))
    if not settings.enabled:
        return Check(
            name,
            False,
            f"{settings.describe()}; a guest that escapes into QEMU is root on this host",
            f"unset {jail_ids.ENV_JAIL} and drop --no-jail",
            required=False,
            warning=True,
        )
    try:
        binary = find_qemu()
        with tempfile.TemporaryDirectory(prefix="psb-check-jail-") as owner:
            identity = jail_ids.allocate(settings, Path(owner))
            try:
                with tempfile.TemporaryFile() as out:
                    handle = jail.spawn(
                        [str(binary), "--version"],
                        jail.JailSpec(identity, tuple(jail.default_binds(binary))),
                        stdout=out,
                        what="qemu --version",
                    )
                    exited = handle.wait(10.0)
                    out.seek(0)
                    version = out.read().decode(errors="replace").strip()
            finally:
                jail_ids.release(identity, Path(owner))
    except (HypervisorError, OSError) as exc:
        return Check(name, False, str(exc), "run as root on a host that allows namespaces")
    if not exited or "QEMU" not in version:
        return Check(name, False, f"a jailed qemu --version printed {version[:80]!r}")
    return Check(
        name,
        True,
        f"on: {settings.describe()}; own mount/pid/ipc/uts/net namespaces, no capabilities, "
        "no_new_privs, seccomp (a jailed qemu --version ran)",
    )


def _accel() -> Check:
    try:
        report = accel.detect()
    except HypervisorError as exc:
        return Check("acceleration", False, str(exc), "set PYSANDBOX_ACCEL to kvm, tcg or auto")
    return Check("acceleration", True, f"{report.chosen} ({report.reason})")


def _vsock() -> Check:
    if accel.has_vhost_vsock():
        return Check("agent channel", True, "vsock (/dev/vhost-vsock present)", required=False)
    return Check(
        "agent channel",
        True,
        "virtio-serial (/dev/vhost-vsock missing; vsock would need 'modprobe vhost_vsock')",
        required=False,
    )


def _templates() -> Check:
    from sandbox.pod import template

    if not template.enabled():
        return Check("pod start", True, "cold boots (PYSANDBOX_TEMPLATES=0)", required=False)
    directory = template.template_dir()
    saved = sorted(directory.glob(f"*/{template.STATE_FILE}")) if directory.is_dir() else []
    return Check(
        "pod start",
        True,
        f"restored from template VMs in {directory} ({len(saved)} saved; "
        "the first pod of each memory size builds one)",
        required=False,
    )


def _port_forward() -> Check:
    import shutil

    found = shutil.which("iptables") or (
        "/usr/sbin/iptables" if Path("/usr/sbin/iptables").exists() else None
    )
    if found:
        return Check("port-forward", True, f"kubectl port-forward via {found}", required=False)
    return Check(
        "port-forward",
        False,
        "iptables missing: kubectl port-forward into pods will not connect",
        "apt-get install iptables",
        required=False,
    )


def _image() -> Check:
    try:
        image = find_image()
        validate(image, verify_hashes=True)
    except GuestImageError as exc:
        return Check("guest image", False, str(exc), "make guest-image")
    kernel = image.manifest.get("kernel", {})
    return Check(
        "guest image",
        True,
        f"{image.dir} (kernel {kernel.get('version', '?')}, boot {image.boot}, "
        f"root on virtio-pmem with DAX: {image.rootfs_size >> 20} MiB shared by every VM)",
    )


def _boot(root: Path) -> Check:
    from sandbox.errors import SandboxError
    from sandbox.pod.lifecycle import Pod

    pod_id = f"check-{int(time.time() * 1000)}"
    started = time.monotonic()
    try:
        pod = Pod.boot(root, pod_id)
    except (SandboxError, HypervisorError) as exc:
        return Check("boot", False, str(exc), "see the console log named above")
    try:
        with pod.client() as agent:
            info = agent.info()
        elapsed = time.monotonic() - started
    finally:
        pod.stop()
    return Check(
        "boot",
        True,
        f"agent {info.agent_version} healthy in {elapsed:.2f}s "
        f"({info.kernel_release}, {info.transport}, {pod.record.boot or '?'})",
    )


def _cgroups() -> Check:
    """The host cgroup controllers a pod's VM is held in (docs/cgroups.md "Host cgroups")."""
    from sandbox.pod import host_cgroup

    ok, detail = host_cgroup.report()
    fix = (
        "mount the missing v1 controllers (mount -t cgroup -o memory cgroup "
        "/sys/fs/cgroup/memory, likewise cpu) or, on cgroup v2, enable them in "
        "/sys/fs/cgroup/cgroup.subtree_control"
    )
    return Check("host cgroups", ok, detail, fix)


def run_checks(boot: bool = False, root: Path | None = None) -> Report:
    """Run every check; with ``boot`` also boot a throwaway pod under ``root``."""
    report = Report(
        [
            _qemu(),
            _virtiofsd(),
            _jail(),
            _accel(),
            _vsock(),
            _port_forward(),
            _image(),
            _templates(),
            _cgroups(),
        ]
    )
    if boot and report.ok and root is not None:
        report.checks.append(_boot(root))
    return report
