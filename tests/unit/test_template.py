"""Template VMs without a VM: the machine both sides build, the key, the agent's checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import restore
from hypervisor.qemu_args import build_argv
from sandbox.pod import template

IMAGE = SimpleNamespace(
    kernel=Path("/img/vmlinux"),
    initrd=Path("/img/initramfs.cpio"),
    rootfs=Path("/img/root.erofs"),
    rootfs_size=64 << 20,
    manifest={"inputs_hash": "abc"},
    dir=Path("/img"),
)


def test_template_machine_has_shared_ram_and_no_share_or_nic() -> None:
    argv = build_argv(template.vm_config(IMAGE, "tcg", 512, "console=ttyS0", Path("/d")))
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=" in joined and "share=on" in joined
    assert "vhost-user-fs" not in joined and "virtio-net" not in joined
    assert "-incoming" not in argv


def test_restored_machine_differs_only_by_incoming_and_paths() -> None:
    saved = build_argv(template.vm_config(IMAGE, "tcg", 512, "c", Path("/a")))
    restored = build_argv(
        template.vm_config(IMAGE, "tcg", 512, "c", Path("/b"), name="pod", incoming_fd=7)
    )
    assert restored[restored.index("-incoming") + 1] == "fd:7"
    strip = [a.replace("/a/", "/x/").replace("/b/", "/x/") for a in saved]
    rest = [a.replace("/b/", "/x/") for a in restored if a not in ("-incoming", "fd:7")]
    rest = [a if a != "pod" else "pysandbox-template" for a in rest]
    assert rest == strip


def test_key_covers_memory_cmdline_image_and_qemu(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"x")
    base = template.key(IMAGE, "tcg", 512, "c", qemu)
    assert base == template.key(IMAGE, "tcg", 512, "c", qemu)
    assert base != template.key(IMAGE, "tcg", 1024, "c", qemu)
    assert base != template.key(IMAGE, "tcg", 512, "c acpi=off", qemu)
    assert base == template.key(IMAGE, "tcg", 512, "c", qemu, cpus=1)
    assert base != template.key(IMAGE, "tcg", 512, "c", qemu, cpus=2)
    other = SimpleNamespace(**{**vars(IMAGE), "manifest": {"inputs_hash": "def"}})
    assert base != template.key(other, "tcg", 512, "c", qemu)
    qemu.write_bytes(b"xy")
    assert base != template.key(IMAGE, "tcg", 512, "c", qemu)


def test_key_covers_the_root_device(tmp_path: Path) -> None:
    """The machine's root device and its size are part of the key: a state saved with the
    root on virtio-blk, or with another size of image, is never restored into this one."""
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"x")
    argv = build_argv(template.vm_config(IMAGE, "tcg", 512, "c", Path("/d")))
    assert "virtio-pmem-pci,memdev=root-mem,id=root" in argv and "-drive" not in argv
    bigger = SimpleNamespace(**{**vars(IMAGE), "rootfs_size": 66 << 20})
    assert template.key(IMAGE, "tcg", 512, "c", qemu) != template.key(bigger, "tcg", 512, "c", qemu)


def test_key_covers_how_the_template_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A state saved without the guest's PrepareTemplate (an older recipe) is never reused.
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"x")
    base = template.key(IMAGE, "tcg", 512, "c", qemu)
    monkeypatch.setattr(template, "RECIPE", template.RECIPE - 1)
    assert base != template.key(IMAGE, "tcg", 512, "c", qemu)


def test_enabled_by_default_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSANDBOX_TEMPLATES", raising=False)
    assert template.enabled()
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "0")
    assert not template.enabled()


@pytest.mark.parametrize("size", [0, 15, 513])
def test_agent_rejects_bad_entropy_sizes(size: int) -> None:
    with pytest.raises(ValueError, match=r"entropy must be 16\.\.512 bytes"):
        restore.reseed(b"x" * size, device="/dev/null")


def test_agent_rejects_an_implausible_clock() -> None:
    with pytest.raises(ValueError, match="before 2020"):
        restore.set_clock(0)


@pytest.mark.parametrize("name", ["", "x" * 65, "é" * 33, "a\0b"])
def test_agent_rejects_a_hostname_sethostname_would_not_take(name: str) -> None:
    with pytest.raises(ValueError, match="invalid hostname"):
        restore.set_hostname(name)
