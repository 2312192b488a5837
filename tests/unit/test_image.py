"""find_image / validate / floor_initrd on fake image directories (no VM, no root)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from hypervisor import guest_image as image_mod
from hypervisor.errors import GuestImageError
from hypervisor.guest_image import find_image, floor_initrd, validate

FILES = {
    "vmlinux": b"\x7fELF kernel",
    "initramfs.cpio": b"070701 initrd",
    "root.erofs": b"erofs root".ljust(2 << 20, b"\0"),  # padded: the virtio-pmem root
    "floor-initramfs.cpio": b"070701 floor",
}


def _make(directory: Path, **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (directory / name).write_bytes(data)
    manifest: dict[str, Any] = {
        "format": 1,
        "inputs_hash": "0" * 64,
        "kernel": {"package": "linux-image-x", "version": "1", "file": "vmlinux", "boot": "pvh"},
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()},
        "sizes": {n: len(d) for n, d in FILES.items()},
        "root_device": "virtio-pmem",
    }
    manifest.update(overrides)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _one_line_lowercase(exc: pytest.ExceptionInfo[GuestImageError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert not message[0].isupper()
    assert not message.endswith(".")
    return message


def test_find_image_from_argument(tmp_path: Path) -> None:
    directory = _make(tmp_path / "img")
    image = find_image(directory)
    assert image.dir == directory
    assert image.kernel == directory / "vmlinux"
    assert image.initrd == directory / "initramfs.cpio"
    assert image.rootfs == directory / "root.erofs"
    assert image.rootfs_size == 2 << 20
    assert image.boot == "pvh"
    validate(image, verify_hashes=True)
    assert floor_initrd(image) == directory / "floor-initramfs.cpio"


def test_find_image_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _make(tmp_path / "env-img")
    monkeypatch.setenv("PYSANDBOX_GUEST_IMAGE", str(directory))
    assert find_image().dir == directory


def test_find_image_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSANDBOX_GUEST_IMAGE", raising=False)
    monkeypatch.setattr(image_mod, "DEFAULT_IMAGE_DIR", tmp_path / "nowhere")
    with pytest.raises(GuestImageError) as exc:
        find_image()
    message = _one_line_lowercase(exc)
    assert message.startswith(f"guest image not found in {tmp_path / 'nowhere'}")
    assert "make guest-image" in message


def test_bzimage_manifest(tmp_path: Path) -> None:
    directory = _make(tmp_path / "img", kernel={"file": "vmlinuz", "boot": "bzimage"})
    image = find_image(directory)
    assert image.boot == "bzimage"
    assert image.kernel == directory / "vmlinuz"


def test_missing_manifest(tmp_path: Path) -> None:
    directory = _make(tmp_path / "img")
    (directory / "manifest.json").unlink()
    with pytest.raises(GuestImageError, match=r"no manifest\.json: run 'make guest-image'"):
        find_image(directory)


@pytest.mark.parametrize(
    "overrides",
    [
        {"format": 99},
        {"kernel": {"file": "bzImage", "boot": "pvh"}},
        {"kernel": {"file": "vmlinux", "boot": "efi"}},
        {"kernel": None},
        {"files": None},
        {"root_device": None},
        {"sizes": {"root.erofs": 10}},
        {"sizes": None},
    ],
    ids=[
        "format",
        "kernel-file",
        "boot",
        "no-kernel",
        "no-files",
        "blk-root",
        "root-unpadded",
        "no-sizes",
    ],
)
def test_bad_manifest(tmp_path: Path, overrides: dict[str, Any]) -> None:
    with pytest.raises(GuestImageError) as exc:
        find_image(_make(tmp_path / "img", **overrides))
    assert "make guest-image" in _one_line_lowercase(exc)


def test_unparsable_manifest(tmp_path: Path) -> None:
    directory = _make(tmp_path / "img")
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(GuestImageError, match="cannot read"):
        find_image(directory)


@pytest.mark.parametrize("name", ["vmlinux", "initramfs.cpio", "root.erofs"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    directory = _make(tmp_path / "img")
    image = find_image(directory)
    (directory / name).unlink()
    with pytest.raises(GuestImageError) as exc:
        validate(image, verify_hashes=False)
    message = _one_line_lowercase(exc)
    assert f"{directory / name} is missing" in message
    assert "make guest-image" in message


def test_file_not_in_manifest(tmp_path: Path) -> None:
    files = {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items() if n != "root.erofs"}
    image = find_image(_make(tmp_path / "img", files=files))
    with pytest.raises(GuestImageError, match=r"does not list root\.erofs"):
        validate(image)


def test_hash_mismatch(tmp_path: Path) -> None:
    directory = _make(tmp_path / "img")
    image = find_image(directory)
    (directory / "root.erofs").write_bytes(b"tampered".ljust(2 << 20, b"\0"))
    validate(image, verify_hashes=False)  # presence and size only: passes
    with pytest.raises(GuestImageError) as exc:
        validate(image, verify_hashes=True)
    message = _one_line_lowercase(exc)
    assert "root.erofs is corrupt (sha256 mismatch)" in message
    assert "make guest-image" in message


def test_an_image_built_before_the_pmem_root_says_to_rebuild(tmp_path: Path) -> None:
    manifest = json.loads((_make(tmp_path / "img") / "manifest.json").read_text())
    del manifest["root_device"]
    (tmp_path / "img" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GuestImageError) as exc:
        find_image(tmp_path / "img")
    message = _one_line_lowercase(exc)
    assert "built before the virtio-pmem root device: run 'make guest-image'" in message


def test_root_image_of_another_size_than_recorded(tmp_path: Path) -> None:
    """QEMU maps the recorded size of the root image: a file cut short would fault the
    guest, so validate refuses it."""
    directory = _make(tmp_path / "img")
    image = find_image(directory)
    (directory / "root.erofs").write_bytes(b"erofs root")
    with pytest.raises(GuestImageError) as exc:
        validate(image, verify_hashes=False)
    message = _one_line_lowercase(exc)
    assert f"{directory / 'root.erofs'} is not the {2 << 20} bytes" in message


def test_floor_initrd_missing(tmp_path: Path) -> None:
    directory = _make(tmp_path / "img")
    (directory / "floor-initramfs.cpio").unlink()
    files = {n: h for n, h in find_image(directory).files.items() if n != "floor-initramfs.cpio"}
    image = find_image(_make(tmp_path / "img2", files=files))
    (image.dir / "floor-initramfs.cpio").unlink()
    with pytest.raises(GuestImageError, match="run 'make floor-image'"):
        floor_initrd(image)


def test_guest_image_is_frozen(tmp_path: Path) -> None:
    image = find_image(_make(tmp_path / "img"))
    with pytest.raises(AttributeError):
        image.boot = "bzimage"  # type: ignore[misc]
