"""Detect whether a kernel ELF image can be booted through QEMU's PVH entry point.

QEMU's ``-kernel`` accepts an uncompressed ELF ``vmlinux`` only when it carries the Xen ELF note
``XEN_ELFNOTE_PHYS32_ENTRY`` (owner ``"Xen"``, type 18), which gives the 32-bit physical entry
address of the PVH boot path. Booting that way skips the bzImage decompressor, which under TCG
saves seconds per boot. Without the note the caller must boot the compressed bzImage instead.
"""

from __future__ import annotations

import struct
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

#: ``XEN_ELFNOTE_PHYS32_ENTRY`` from ``include/xen/interface/elfnote.h``.
XEN_ELFNOTE_PHYS32_ENTRY = 18
#: Owner (``n_name``) of Xen ELF notes.
XEN_NOTE_OWNER = "Xen"

_SHT_NOTE = "SHT_NOTE"
_PT_NOTE = "PT_NOTE"


def _note_areas(elf: ELFFile) -> list[tuple[int, int]]:
    """Return ``(file offset, size)`` of every note section and note segment, deduplicated."""
    areas: set[tuple[int, int]] = set()
    for section in elf.iter_sections():
        if section["sh_type"] == _SHT_NOTE and section["sh_size"] > 0:
            areas.add((int(section["sh_offset"]), int(section["sh_size"])))
    for segment in elf.iter_segments():
        if segment["p_type"] == _PT_NOTE and segment["p_filesz"] > 0:
            areas.add((int(segment["p_offset"]), int(segment["p_filesz"])))
    return sorted(areas)


def _iter_raw_notes(data: bytes, little_endian: bool) -> list[tuple[str, int, bytes]]:
    """Parse an ELF note area into ``(owner, type, descriptor)`` tuples.

    Note headers are three 32-bit words in both ELF classes; name and descriptor are padded
    to 4 bytes. Parsing stops silently at a truncated or malformed note.
    """
    fmt = "<III" if little_endian else ">III"
    notes: list[tuple[str, int, bytes]] = []
    offset = 0
    while offset + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(fmt, data, offset)
        offset += 12
        name_end = offset + namesz
        desc_start = offset + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            break
        owner = data[offset:name_end].rstrip(b"\0").decode("ascii", errors="replace")
        notes.append((owner, ntype, data[desc_start:desc_end]))
        offset = desc_start + ((descsz + 3) & ~3)
    return notes


def pvh_entry(path: Path | str) -> int | None:
    """Return the PVH 32-bit physical entry address of the ELF at ``path``, or ``None``.

    ``None`` means the file is not an ELF, cannot be read as one, or has no
    ``XEN_ELFNOTE_PHYS32_ENTRY`` note in any note section or note segment.
    Never raises for malformed input; raises ``OSError`` only if ``path`` cannot be opened.
    """
    with open(path, "rb") as stream:
        try:
            elf = ELFFile(stream)
            little = bool(elf.little_endian)
            areas = _note_areas(elf)
        except (ELFError, ConstructError, struct.error, ValueError, EOFError):
            return None
        for offset, size in areas:
            stream.seek(offset)
            data = stream.read(size)
            for owner, ntype, desc in _iter_raw_notes(data, little):
                if owner == XEN_NOTE_OWNER and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                    if len(desc) >= 8:
                        return int.from_bytes(desc[:8], "little" if little else "big")
                    if len(desc) >= 4:
                        return int.from_bytes(desc[:4], "little" if little else "big")
                    return None
    return None


def has_pvh_note(path: Path | str) -> bool:
    """Return True if the ELF at ``path`` has a Xen ``PHYS32_ENTRY`` note (PVH-bootable).

    False for non-ELF files (e.g. a bzImage) and ELF files without the note.
    Raises ``OSError`` only if ``path`` cannot be opened.
    """
    return pvh_entry(path) is not None
