"""PVH note detection on tiny hand-made ELF files (no kernel, no VM)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hypervisor.pvh import XEN_ELFNOTE_PHYS32_ENTRY, has_pvh_note, pvh_entry

ENTRY = 0x1000370


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _note(owner: bytes, ntype: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    return struct.pack("<III", len(name), len(desc), ntype) + _pad(name) + _pad(desc)


def _elf(notes: bytes, *, segment: bool = True, section: bool = True) -> bytes:
    """A minimal ELF64 little-endian x86-64 file carrying ``notes`` in a segment and/or section."""
    ehsize, phentsize, shentsize = 64, 56, 64
    phnum = 1 if segment else 0
    notes_off = ehsize + phentsize * phnum
    shstrtab = b"\0.note.Xen\0.shstrtab\0"
    shstr_off = notes_off + len(notes)
    shoff = shstr_off + len(shstrtab)
    shoff += -shoff % 8
    shnum = 3 if section else 0
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        0,  # e_entry
        ehsize if segment else 0,  # e_phoff
        shoff if section else 0,
        0,
        ehsize,
        phentsize,
        phnum,
        shentsize,
        shnum,
        2 if section else 0,  # e_shstrndx
    )
    out = bytearray(header)
    if segment:
        out += struct.pack("<IIQQQQQQ", 4, 4, notes_off, 0, 0, len(notes), len(notes), 4)
    out += notes + shstrtab
    out += b"\0" * (shoff - len(out))
    if section:
        out += b"\0" * shentsize  # SHN_UNDEF
        out += struct.pack("<IIQQQQIIQQ", 1, 7, 2, 0, notes_off, len(notes), 0, 0, 4, 0)
        out += struct.pack("<IIQQQQIIQQ", 11, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)
    return bytes(out)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(data)
    return path


PVH = _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", ENTRY))
OTHER = _note(b"GNU", 3, b"\x12" * 20) + _note(b"Xen", 6, b"linux\0")


@pytest.mark.parametrize(
    ("segment", "section"), [(True, True), (True, False), (False, True)], ids=["both", "seg", "sec"]
)
def test_detects_pvh_note(tmp_path: Path, segment: bool, section: bool) -> None:
    path = _write(tmp_path, _elf(OTHER + PVH, segment=segment, section=section))
    assert has_pvh_note(path)
    assert pvh_entry(path) == ENTRY


def test_no_pvh_note(tmp_path: Path) -> None:
    assert not has_pvh_note(_write(tmp_path, _elf(OTHER)))


def test_type_18_from_another_owner_is_not_pvh(tmp_path: Path) -> None:
    notes = _note(b"GNU", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", ENTRY))
    assert not has_pvh_note(_write(tmp_path, _elf(notes)))


def test_elf_without_notes(tmp_path: Path) -> None:
    assert not has_pvh_note(_write(tmp_path, _elf(b"", segment=False, section=False)))


@pytest.mark.parametrize(
    "data", [b"", b"MZ\x00\x00" + b"\0" * 600, b"\x7fELF\x02\x01\x01" + b"\0" * 5], ids=str
)
def test_not_an_elf(tmp_path: Path, data: bytes) -> None:
    assert not has_pvh_note(_write(tmp_path, data))


def test_truncated_note_is_ignored(tmp_path: Path) -> None:
    data = bytearray(_elf(PVH, section=False))
    path = _write(tmp_path, bytes(data[: 64 + 56 + 14]))
    assert not has_pvh_note(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        has_pvh_note(tmp_path / "absent")
