"""Locate and validate the guest image built by ``make guest-image``.

An image directory holds ``manifest.json`` plus the files it lists: the kernel (``vmlinux``
booted through PVH, or ``vmlinuz`` booted as a bzImage), ``initramfs.cpio``, the read-only root
``root.erofs`` and the benchmark floors ``floor-initramfs.cpio`` (boot) and
``floor-net-initramfs.cpio`` (networking). The builder writes the directory atomically, so a
directory with a readable manifest is complete unless files were removed or altered afterwards
(which :func:`validate` detects).

Every failure raises :class:`GuestImageError` whose message is one lowercase line saying what is
wrong and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from hypervisor.errors import GuestImageError

#: A virtio-pmem root image's size must be a multiple of this (bytes): the guest's libnvdimm
#: maps the device in 2 MiB sections, and the build pads ``root.erofs`` to it. (Here rather
#: than in :mod:`hypervisor.qemu_args`, which uses it too: a run that takes a VM of the warm
#: pool checks the image but builds no QEMU command line, ~18 ms of imports.)
PMEM_ALIGN = 2 << 20

#: Where ``make guest-image`` puts the image unless told otherwise.
DEFAULT_IMAGE_DIR = Path("/var/lib/pysandbox/guest")
#: Environment variable overriding :data:`DEFAULT_IMAGE_DIR`.
IMAGE_DIR_ENV = "PYSANDBOX_GUEST_IMAGE"
#: Manifest format this module understands.
MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
INITRD_NAME = "initramfs.cpio"
ROOTFS_NAME = "root.erofs"
FLOOR_INITRD_NAME = "floor-initramfs.cpio"
FLOOR_NET_INITRD_NAME = "floor-net-initramfs.cpio"
#: The manifest's ``root_device``: how the root image must be attached (its initramfs
#: mounts ``/dev/pmem0`` with DAX; docs/root-device.md). Images without it predate it.
ROOT_DEVICE = "virtio-pmem"

BootMethod = Literal["pvh", "bzimage"]
_FIX = "run 'make guest-image'"


@dataclass(frozen=True)
class GuestImage:
    """A guest image directory as described by its manifest.

    ``kernel`` is booted with QEMU ``-kernel``: through the PVH entry point when ``boot`` is
    ``"pvh"`` (an uncompressed ELF vmlinux), as a bzImage otherwise. ``initrd`` goes to
    ``-initrd`` and ``rootfs`` must be attached read-only as a virtio-pmem device
    (``/dev/pmem0`` in the guest; :class:`hypervisor.qemu_args.RootPmem`); ``rootfs_size`` is
    its size in bytes as the manifest records it, a multiple of
    :data:`PMEM_ALIGN`.
    """

    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    rootfs_size: int
    boot: BootMethod
    manifest: dict[str, Any] = field(compare=False, repr=False)

    @property
    def files(self) -> dict[str, str]:
        """File name → expected sha256 (hex), as recorded in the manifest."""
        return cast(dict[str, str], self.manifest.get("files", {}))


def _resolve_dir(directory: Path | str | None) -> Path:
    if directory is not None:
        return Path(directory)
    env = os.environ.get(IMAGE_DIR_ENV)
    if env:
        return Path(env)
    return DEFAULT_IMAGE_DIR


def _load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise GuestImageError(f"guest image not found in {directory}: {_FIX}")
    if not path.is_file():
        raise GuestImageError(f"guest image in {directory} has no {MANIFEST_NAME}: {_FIX}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GuestImageError(f"cannot read {path} ({exc}): {_FIX}") from exc
    if not isinstance(data, dict):
        raise GuestImageError(f"{path} is not a json object: {_FIX}")
    if data.get("format") != MANIFEST_FORMAT:
        raise GuestImageError(
            f"{path} has format {data.get('format')!r}, expected {MANIFEST_FORMAT}: {_FIX}"
        )
    return cast(dict[str, Any], data)


def find_image(directory: Path | str | None = None) -> GuestImage:
    """Return the guest image in ``directory``, else ``$PYSANDBOX_GUEST_IMAGE``, else the default.

    Reads only the manifest: files are not checked (see :func:`validate`). Raises
    :class:`GuestImageError` if the directory or its manifest is missing or unreadable, or the
    manifest lacks the kernel description.
    """
    root = _resolve_dir(directory)
    manifest = _load_manifest(root)
    kernel = manifest.get("kernel")
    if not isinstance(kernel, dict):
        raise GuestImageError(f"{root / MANIFEST_NAME} has no kernel entry: {_FIX}")
    kernel_file = kernel.get("file")
    boot = kernel.get("boot")
    if kernel_file not in ("vmlinux", "vmlinuz") or boot not in ("pvh", "bzimage"):
        raise GuestImageError(
            f"{root / MANIFEST_NAME} has an invalid kernel entry "
            f"(file={kernel_file!r}, boot={boot!r}): {_FIX}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise GuestImageError(f"{root / MANIFEST_NAME} has no files entry: {_FIX}")
    if manifest.get("root_device") != ROOT_DEVICE:
        raise GuestImageError(
            f"guest image in {root} was built before the {ROOT_DEVICE} root device: {_FIX}"
        )
    sizes = manifest.get("sizes")
    size = sizes.get(ROOTFS_NAME) if isinstance(sizes, dict) else None
    if type(size) is not int or size <= 0 or size % PMEM_ALIGN:
        raise GuestImageError(
            f"{root / MANIFEST_NAME} gives {ROOTFS_NAME} no size that is a multiple of "
            f"{PMEM_ALIGN} bytes: {_FIX}"
        )
    return GuestImage(
        dir=root,
        kernel=root / str(kernel_file),
        initrd=root / INITRD_NAME,
        rootfs=root / ROOTFS_NAME,
        rootfs_size=size,
        boot=cast(BootMethod, boot),
        manifest=manifest,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate(image: GuestImage, verify_hashes: bool = False) -> None:
    """Check that the kernel, initrd and rootfs exist, every manifest file is present and
    the rootfs has the size the manifest records (QEMU maps exactly that much of it).

    With ``verify_hashes`` also compare each file's sha256 with the manifest (reads ~120 MB).
    Returns None if all is well; raises :class:`GuestImageError` naming the first problem found.
    """
    required = {image.kernel.name, image.initrd.name, image.rootfs.name}
    missing_from_manifest = sorted(required - set(image.files))
    if missing_from_manifest:
        raise GuestImageError(
            f"{image.dir / MANIFEST_NAME} does not list {', '.join(missing_from_manifest)}: {_FIX}"
        )
    for name in sorted(image.files):
        path = image.dir / name
        if not path.is_file():
            raise GuestImageError(f"guest image file {path} is missing: {_FIX}")
    if image.rootfs.stat().st_size != image.rootfs_size:
        raise GuestImageError(
            f"guest image file {image.rootfs} is not the {image.rootfs_size} bytes its "
            f"manifest records: run 'make guest-image GUEST_IMAGE_FLAGS=--force'"
        )
    if verify_hashes:
        for name, expected in sorted(image.files.items()):
            path = image.dir / name
            try:
                actual = _sha256(path)
            except OSError as exc:
                raise GuestImageError(
                    f"cannot read guest image file {path} ({exc}): {_FIX}"
                ) from exc
            if actual != expected:
                raise GuestImageError(
                    f"guest image file {path} is corrupt (sha256 mismatch): "
                    f"run 'make guest-image GUEST_IMAGE_FLAGS=--force'"
                )


def floor_initrd(image: GuestImage) -> Path:
    """Path of the busybox-only benchmark initramfs booted with ``image.kernel``.

    The floor /init prints ``PYSANDBOX-FLOOR-READY`` on the serial console and powers off.
    Raises :class:`GuestImageError` if the file is absent.
    """
    path = image.dir / FLOOR_INITRD_NAME
    if not path.is_file():
        raise GuestImageError(f"floor initramfs {path} is missing: run 'make floor-image'")
    return path


def floor_net_initrd(image: GuestImage) -> Path:
    """Path of the networking floor: the floor initramfs plus the virtio-net driver and the
    busybox ``ip``/``nc``/``dd``/``wc`` applets (bench/network.py).

    Booted with ``floor_net=IP/PREFIX floor_gw=IP`` on the kernel command line, its /init
    configures eth0, prints ``PYSANDBOX-FLOOR-NET-READY`` and runs one busybox ``sh`` per
    connection to TCP port 5000. Raises :class:`GuestImageError` if the file is absent (an
    image built before it existed).
    """
    path = image.dir / FLOOR_NET_INITRD_NAME
    if not path.is_file():
        raise GuestImageError(f"networking floor {path} is missing: {_FIX}")
    return path
