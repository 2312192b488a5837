"""Images for ``pysandbox run``: where a root filesystem and its defaults come from.

Supported today: the built-in ``default`` image (busybox, built locally from Debian's
busybox-static on first use, so it works offline) and a plain root filesystem directory.
An image resolves to a read-only host directory plus its configuration (argv, env, cwd, user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.errors import ConfigError

IMAGE_STORE = Path(os.environ.get("PYSANDBOX_IMAGE_STORE", "/var/lib/pysandbox/images"))
DEFAULT_IMAGE = "default"
_BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


@dataclass(frozen=True)
class Image:
    """A resolved image: its root filesystem and run defaults."""

    name: str
    rootfs: Path
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=lambda: ["sh"])
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    cwd: str = "/"
    user: str = ""


def resolve(name: str, progress: bool = False) -> Image:
    """Resolve ``name`` (``default`` or a rootfs directory); ConfigError when unusable."""
    if name == DEFAULT_IMAGE:
        return Image(DEFAULT_IMAGE, ensure_default_image(progress))
    path = Path(name)
    if not path.exists():
        raise ConfigError(f"image {name} not found: give 'default' or a root filesystem directory")
    if path.is_dir():
        if (path / "oci-layout").exists():
            raise ConfigError(
                f"image {name}: OCI image layouts are not supported yet; "
                "unpack it to a root filesystem directory"
            )
        if not any((path / d).exists() for d in ("bin", "usr", "sbin")):
            raise ConfigError(
                f"image {name} does not look like a root filesystem (no bin, sbin or usr)"
            )
        return Image(str(path), path.resolve())
    raise ConfigError(
        f"image {name}: image archives are not supported yet; "
        "unpack it to a root filesystem directory"
    )


def ensure_default_image(progress: bool = False) -> Path:
    """Build the busybox default image once; return its root filesystem directory."""
    rootfs = IMAGE_STORE / DEFAULT_IMAGE / "rootfs"
    if (rootfs / "bin" / "busybox").exists():
        return rootfs
    busybox = next((p for p in _BUSYBOX_CANDIDATES if p.exists()), None)
    if busybox is None:
        raise ConfigError("the default image needs busybox: apt-get install busybox-static")
    if progress and sys.stderr.isatty():
        print("pysandbox: building the default image (busybox)...", file=sys.stderr)
    IMAGE_STORE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".default-", dir=IMAGE_STORE))
    try:
        tree = work / "rootfs"
        for sub in (
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "etc",
            "tmp",
            "root",
            "home",
            "proc",
            "sys",
            "dev",
            "run",
            "var/tmp",
        ):
            (tree / sub).mkdir(parents=True, exist_ok=True)
        (tree / "tmp").chmod(0o1777)
        shutil.copy2(busybox, tree / "bin" / "busybox")
        applets = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            link = tree / applet
            if not link.exists() and applet != "bin/busybox":
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
        (tree / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        )
        (tree / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (tree / "etc" / "hostname").write_text("pysandbox\n")
        target = IMAGE_STORE / DEFAULT_IMAGE
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return rootfs
