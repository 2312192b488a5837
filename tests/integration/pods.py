"""Where VM tests get their pods: a :class:`PodFactory` that records every pod a test uses and,
when a test that used it failed, keeps their logs.

A factory boots pods itself (:meth:`PodFactory.__call__`) and watches ``--root`` directories
where a CLI, a shim or a daemon boots them (:meth:`PodFactory.new_root`,
:meth:`PodFactory.watch`). :meth:`PodFactory.keep_logs` copies, for every pod still there, its
serial console log, agent proxy log, virtiofsd log and boot notes, and the console logs that
failed boots left under ``<root>/logs/``, into one directory per failed test.
tests/integration/conftest.py decides when (the report of a failed test) and for which
factories (those the test used, directly or through other fixtures).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sandbox.pod.hostfs import mounts_below
from sandbox.pod.lifecycle import Pod

#: Where logs of failed tests go (pods' here, containerd's in tests/integration/containerd_env.py).
KEEP_LOGS = Path(os.environ.get("PYSANDBOX_KEEP_LOGS_DIR", "/tmp/pysandbox-test-logs"))
#: What a pod directory holds that tells why a test failed (a missing one is skipped).
POD_LOGS = ("console.log", "proxy.log", "virtiofsd.log", "boot.log")


def safe_name(text: str, limit: int = 80) -> str:
    """``text`` reduced to a file name (and pod id): letters, digits, ``_.-`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit] or "x"


class PodFactory:
    """Boots pods and watches roots for a test (or a module, or the session).

    ``vm_root`` is the --root pods are booted under unless told otherwise, and the parent of
    :meth:`new_root` directories; ``label`` (a test's name) makes the ids of pods booted
    without one; ``keep_dir`` receives the logs (:meth:`keep_logs`).
    """

    def __init__(self, vm_root: Path, label: str, keep_dir: Path) -> None:
        self.vm_root = vm_root
        digest = hashlib.sha256(label.encode()).hexdigest()[:6]  # distinct if truncated alike
        self.label = f"{safe_name(label, 40)}-{digest}"
        self.keep_dir = keep_dir
        self.pods: list[Pod] = []
        self.roots: list[Path] = []
        self._own_roots: list[Path] = []
        self._failed_boots: list[Path] = []
        self._ids = itertools.count()

    def __call__(
        self, pod_id: str | None = None, *, root: Path | None = None, **options: object
    ) -> Pod:
        """``Pod.boot(root or vm_root, pod_id or a fresh id, **options)``, recorded.

        A boot that fails raises as :meth:`Pod.boot` does; the console log it kept under
        ``<root>/logs/`` is remembered for :meth:`keep_logs`.
        """
        pod_id = pod_id or f"{self.label}-{next(self._ids)}"
        root = root or self.vm_root
        try:
            pod = Pod.boot(root, pod_id, **options)  # type: ignore[arg-type]
        except BaseException:
            kept = root / "logs" / f"{pod_id}-console.log"
            if kept.exists():
                self._failed_boots.append(kept)
            raise
        self.pods.append(pod)
        return pod

    def new_root(self, prefix: str = "r") -> Path:
        """A fresh, empty --root below ``vm_root`` (short: sockets live below it), watched;
        its pods are destroyed and it is removed by :meth:`close`."""
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=self.vm_root))
        self._own_roots.append(root)
        self.watch(root)
        return root

    def watch(self, root: Path) -> None:
        """Also keep the logs of pods that others boot under ``root`` (or under one level of
        subdirectories of it: a containerd runtime root holds one --root per namespace)."""
        self.roots.append(root)

    def pod_dirs(self) -> Iterator[tuple[str, Path]]:
        """(pod id, pod directory) of every pod booted or watched here that still exists."""
        seen: set[Path] = set()
        candidates = [pod.dir for pod in self.pods]
        for root in self.roots:
            candidates += sorted(root.glob("p/*")) + sorted(root.glob("*/p/*"))
        for directory in candidates:
            if directory in seen or not directory.is_dir():
                continue
            seen.add(directory)
            yield _pod_id(directory), directory

    def failed_boot_logs(self) -> list[Path]:
        """Console logs kept by boots that failed (``<root>/logs/*-console.log``)."""
        found = list(self._failed_boots)
        for root in self.roots:
            found += sorted(root.glob("logs/*-console.log")) + sorted(
                root.glob("*/logs/*-console.log")
            )
        return sorted(set(found))

    def keep_logs(self, test: str) -> Path | None:
        """Copy the logs of every pod here to ``keep_dir/<test>/``; that directory, or None
        when there was nothing to copy."""
        target = self.keep_dir / safe_name(test, 150)
        copied = False
        for pod_id, directory in self.pod_dirs():
            for name in POD_LOGS:
                copied |= _copy(directory / name, target / f"{safe_name(pod_id)}-{name}")
        for log in self.failed_boot_logs():
            copied |= _copy(log, target / f"failed-boot-{log.name}")
        return target if copied else None

    def close(self) -> None:
        """Destroy every pod booted here and left under the roots made here; remove those roots.

        Every pod is attempted; the first error is raised afterwards.
        """
        errors: list[BaseException] = []
        pods = list(self.pods)
        for root in self._own_roots:
            pods += Pod.list(root)
        for pod in pods:
            try:
                pod.destroy()
            except Exception as exc:  # the others still get destroyed
                errors.append(exc)
        for root in self._own_roots:
            if not mounts_below(root):  # never rmtree across a mount
                shutil.rmtree(root, ignore_errors=True)
        if errors:
            raise errors[0]


def _pod_id(directory: Path) -> str:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return str(json.loads((directory / "pod.json").read_text())["id"])
    return directory.name


def _copy(source: Path, target: Path) -> bool:
    if not source.is_file():
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError:
        return False
    return True
